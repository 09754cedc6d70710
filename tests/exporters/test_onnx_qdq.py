"""Models pruned with --quantize, exported as QuantizeLinear / DequantizeLinear graphs and run by onnxruntime."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

onnx = pytest.importorskip("onnx", reason="onnx is not installed (the onnx extra)")
from onnx import numpy_helper

from cli import main
from exporters import ExportOptions, export
from exporters.base import BackendMissingError, default_dtype
from exporters.genai import genai_config
from exporters.onnx_graph import TOLERANCE, onnx_weight_patterns, run_onnxruntime
from exporters.onnx_qdq import (FP8_SAFE_SESSION, INT8_SAFE_SESSION, _rounding_hint, holds_fp8, onnxruntime_session,
                                served_probe, weight_formats)
from exporters.source import load_pruned, prompts
from exporters.tensorrt_engine import require_8bit_gpu
from tests.conftest import TRACED_FAMILIES, _save_tiny
from tests.thanos.test_driver import SMALL
from thanos import PruneConfig
from thanos.errors import InputError
from thanos.linears import weight_view
from thanos.pipeline import PruneJob, prune_to_directory
from thanos.quantize import FORMATS, grid_of
from thanos.quantized_model import activations_unrounded, quantization_of, quantized_linears

pytestmark = pytest.mark.onnx

ONNX_8BIT = {"fp8": onnx.TensorProto.FLOAT8E4M3FN, "int8": onnx.TensorProto.INT8}


@pytest.fixture(scope="module", params=["fp8", "int8"])
def quantized_dir(request, tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp(request.param) / "m"
    prune_to_directory(PruneJob(out=str(out), model=str(tiny_llama_dir), config=PruneConfig(quantize=request.param),
                                **SMALL))
    return out, request.param


@pytest.fixture(scope="module")
def float32_export(quantized_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qdq") / "onnx"
    summary = export("onnx", quantized_dir[0], out, ExportOptions(dtype="float32", with_cache=True))
    return out, summary


def test_each_linear_has_its_own_input_pair_which_onnxruntime_fuses_for_int8(quantized_dir, float32_export, tmp_path):
    """q/k/v (and gate/up) read one input; a pair shared by several MatMuls is left unfused by onnxruntime's CPU
    provider, which then dequantizes every weight at every step (docs/results/onnx_qdq_cpu.md)."""
    import collections

    import onnxruntime

    out, summary = float32_export
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    readers = collections.Counter(name for node in proto.graph.node for name in node.input)
    pairs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith(".qdq.input_dq")]
    assert len(pairs) == summary["quantization"]["activation_quantizers"] == 21
    assert all(readers[n.output[0]] == 1 for n in pairs)
    if quantized_dir[1] != "int8":
        return  # onnxruntime's CPU provider has no FP8 kernels to fuse into
    for graph in (out / "model.onnx", served_probe(out / "model.onnx")):  # the export's check runs the fused kernels
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        onnxruntime.InferenceSession(graph.SerializeToString() if isinstance(graph, onnx.ModelProto) else str(graph),
                                     options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
        assert sum(n.op_type == "MatMulIntegerToFloat" for n in optimized.graph.node) == 21


def test_the_served_check_allows_a_step_only_for_inputs_on_a_rounding_boundary(quantized_dir):
    """Fused kernels quantize the input themselves: an input on a boundary may round either way, no other."""
    from exporters.onnx_qdq import ValidationError, _LinearCheck, _step_at

    name, mod = next(iter(quantized_linears(load_pruned(quantized_dir[0])[0]).items()))
    x = torch.randn(3, mod.in_features)
    check = _LinearCheck(name, mod, "float32")
    step = float(_step_at(torch.tensor(2.0), check.fmt))  # 2 is on both grids, and even: a tie rounds to it
    x[1, 5], x[1, 6] = (2 + step / 2) * check.s_in, 2 * check.s_in  # on a boundary, and on a grid value
    ours = check.grid(x.numpy())
    assert ours[1, 5] == ours[1, 6] == 2
    for flipped, allowed in ((5, True), (6, False)):
        theirs = ours.clone()
        theirs[1, flipped] += step
        y = ((theirs.double() * check.s_in) @ check.weight.T).numpy()
        if allowed:
            assert check.product(ours, y, "p", slack=check.flip_slack(x.numpy(), ours)) <= 1
        else:
            with pytest.raises(ValidationError, match=f"{name}: onnxruntime's p"):
                check.product(ours, y, "p", slack=check.flip_slack(x.numpy(), ours))
    y = ((ours.double() * check.s_in) @ check.weight.T).numpy()
    y[2, 0] = np.nan  # an overflow in the runtime: no bound may let it through
    with pytest.raises(ValidationError, match=f"{name}: onnxruntime's p"):
        check.product(ours, y, "p")


def test_every_8bit_linear_is_a_qdq_matmul_holding_its_8bit_values(quantized_dir, float32_export):
    model_dir, fmt = quantized_dir
    out, summary = float32_export
    model = load_pruned(model_dir)[0]
    linears = quantized_linears(model)
    assert summary["quantization"]["format"] == fmt and summary["quantization"]["linears"] == len(linears) == 21
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    stored = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        weight_dq = producers.get(node.input[1])
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
            continue  # attention's activation x activation products
        values = inits[weight_dq.input[0]]
        assert values.data_type == ONNX_8BIT[fmt]
        assert [a.i for a in weight_dq.attribute if a.name == "axis"] == [1]  # per output channel of (K, N)
        input_dq = producers[node.input[0]]
        assert input_dq.op_type == "DequantizeLinear" and producers[input_dq.input[0]].op_type == "QuantizeLinear"
        array = numpy_helper.to_array(values)
        stored[weight_dq.input[0]] = torch.from_numpy(array.view(np.uint8).copy() if fmt == "fp8" else array.copy())
    assert len(stored) == len(linears)
    # the initializers are the 8-bit values themselves, bit for bit, transposed to (K, N)
    expected = {name: grid_of(weight_view(mod), quantization_of(mod).weight_scale, FORMATS[fmt])
                for name, mod in linears.items()}
    for name, grid in expected.items():
        bits = grid.view(torch.uint8) if fmt == "fp8" else grid
        assert torch.equal(stored[f"{name}.qdq.weight"], bits.T.contiguous()), name
    # no float copy of a quantized weight stays behind, and the 2:4 groups read back through the dequantization
    shapes = {tuple(weight_view(mod).T.shape) for mod in linears.values()}
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in shapes]
    patterns = [l for l in onnx_weight_patterns(out / "model.onnx") if l.pattern]
    assert len(patterns) == 21 and {l.pattern for l in patterns} == {"2:4"}


def test_onnxruntime_runs_the_8bit_model_and_not_the_unrounded_one(quantized_dir, float32_export):
    model_dir, _ = quantized_dir
    out, summary = float32_export
    validation = summary["validation"]
    for check in (validation["quantized_linears"], summary["with_cache"]["quantized_linears"]):
        assert check["linears"] == 21 and check["largest_error_over_bound"] <= 1
    # on this 3-layer model no input sits on a rounding boundary, so the whole graph equals PyTorch's 8-bit model
    # to float32 round-off (the tolerance of the unquantized export), its greedy tokens too
    assert validation["quantized_linears"]["inputs_on_a_rounding_boundary"] == 0
    assert validation["top_token_agrees"] == 1.0 and summary["with_cache"]["validation"]["greedy_tokens_agree"] == 1.0
    model, tokenizer, _ = load_pruned(model_dir)
    ids = prompts(tokenizer)
    got = run_onnxruntime(out / "model.onnx", ids, torch.ones_like(ids))
    with torch.no_grad():
        rounded = model(ids).logits.numpy()
        with activations_unrounded(model):
            unrounded = model(ids).logits.numpy()
    difference = np.abs(got - rounded).max()
    assert difference <= TOLERANCE["float32"] * np.abs(rounded).max()
    assert np.abs(got - unrounded).max() > 10 * difference  # the graph does round the inputs


def test_sessions_and_genai_folders_carry_the_settings_each_8bit_format_needs(quantized_dir, float32_export,
                                                                             monkeypatch):
    # onnxruntime before 1.32 turns an FP8 DequantizeLinear -> MatMul into an integer-only op and refuses the graph
    # it made (seen with 1.29-1.31.1 on the fp8 graph here): FP8 graphs are opened without that pass. onnxruntime's
    # fused INT8 kernel saturates on x86 CPUs without VNNI: INT8 graphs are kept out of it there, and in GenAI
    # folders, which may be served on any CPU
    import exporters.onnx_qdq as onnx_qdq

    model_dir, fmt = quantized_dir
    path = float32_export[0] / "model.onnx"
    assert holds_fp8(path) == (fmt == "fp8") and weight_formats(path) == {fmt}
    genai_session = genai_config(load_pruned(model_dir)[0])["model"]["decoder"]["session_options"]
    for exact in (True, False):
        monkeypatch.setattr(onnx_qdq, "fused_int8_is_exact", lambda exact=exact: exact)
        options = onnxruntime_session(path).get_session_options()
        wanted = {**(FP8_SAFE_SESSION if fmt == "fp8" else {}), **(INT8_SAFE_SESSION if fmt == "int8" and not exact
                                                                   else {})}
        for key, value in {**FP8_SAFE_SESSION, **INT8_SAFE_SESSION}.items():
            if key in wanted:
                assert options.get_session_config_entry(key) == value
            else:
                with pytest.raises(RuntimeError, match="does not have configuration"):
                    options.get_session_config_entry(key)
    assert {k: genai_session[k] for k in {**FP8_SAFE_SESSION, **INT8_SAFE_SESSION} if k in genai_session} == (
        FP8_SAFE_SESSION if fmt == "fp8" else INT8_SAFE_SESSION)


@pytest.mark.parametrize("machine, features, exact", [
    ("x86_64", dict(AVX2=True, AVX512F=False, AVX512VNNI=False), False),  # Haswell to Zen 3: 16-bit pair sums
    ("x86_64", dict(AVX2=True, AVX512F=True, AVX512VNNI=True), True),
    ("AMD64", dict(AVX2=True, AVXVNNI=True), True),
    ("x86_64", {}, False),  # nothing known: the exact path
    ("aarch64", {}, True),
])
def test_the_fused_int8_kernel_counts_as_exact_only_where_it_is(machine, features, exact, monkeypatch):
    import exporters.onnx_qdq as onnx_qdq

    monkeypatch.setattr(onnx_qdq.platform, "machine", lambda: machine)
    assert onnx_qdq.fused_int8_is_exact(features) is exact


def test_avx_vnni_of_client_cpus_is_read_from_linux_flags(monkeypatch):
    """numpy's feature table has AVX-512 VNNI but not the AVX-VNNI of Alder Lake and later client
    CPUs, where onnxruntime's fused INT8 kernel is exact too: Linux's flags name it."""
    import exporters.onnx_qdq as onnx_qdq

    alder_lake = ("processor\t: 0\nmodel name\t: 12th Gen Intel(R) Core(TM) i7-12700\n"
                  "flags\t\t: fpu sse2 avx f16c avx2 fma avx_vnni sha_ni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags = onnx_qdq.cpuinfo_flags(alder_lake)
    assert {"avx2", "avx_vnni"} <= flags and "avx512_vnni" not in flags
    assert onnx_qdq.cpuinfo_flags("processor\t: 0\n") == set()
    monkeypatch.setattr(onnx_qdq.platform, "machine", lambda: "x86_64")
    haswell = dict(AVX2=True, FMA3=True, F16C=True, AVX512F=False, AVX512VNNI=False)
    monkeypatch.setattr(onnx_qdq, "_numpy_cpu_features", lambda: dict(haswell))
    # the last: an emulated Haswell (qemu-user) on a host with AVX-512, whose /proc/cpuinfo it shows
    for found, exact in ((flags, True), (flags - {"avx_vnni"}, False), (flags | {"avx512f", "avx512_vnni"}, False),
                         (set(), False)):
        monkeypatch.setattr(onnx_qdq, "cpuinfo_flags", lambda found=found: found)
        assert onnx_qdq.fused_int8_is_exact() is exact, found


@pytest.mark.parametrize("version, dtype, fmt, hinted", [
    ("1.29.0", "float16", "int8", True), ("1.19.2", "float16", "int8", True), ("1.30.0", "float16", "int8", False),
    ("1.29.0", "float32", "int8", False), ("1.29.0", "float16", "fp8", False)])
def test_an_input_mismatch_names_the_onnxruntime_that_rounds_float16_toward_zero(monkeypatch, version, dtype, fmt,
                                                                                hinted):
    # onnxruntime 1.19-1.29 gave 0 for a float16 input at 0.8 of the INT8 step, 1.30 gives 1 (seen here)
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", version)
    assert ("onnxruntime>=1.30" in _rounding_hint(dtype, fmt)) == hinted


def test_float16_graph_carries_the_8bit_model(quantized_dir, tmp_path):
    model_dir, fmt = quantized_dir
    summary = export("onnx", model_dir, tmp_path, ExportOptions(dtype="float16"))
    assert summary["validation"]["quantized_linears"]["largest_error_over_bound"] <= 1
    assert "float16" in summary["quantization"]["scale_dtypes"]
    # the fp32 scales rounded once to fp16 (subnormal ones by more than 2^-11 of their value)
    scales = torch.cat([torch.cat([q.weight_scale, q.input_scale.reshape(1)]) for q in
                        map(quantization_of, quantized_linears(load_pruned(model_dir)[0]).values())])
    rounding = float(((scales.half().float() - scales).abs() / scales).max())
    assert 0 < summary["quantization"]["largest_scale_rounding"] <= rounding


def test_genai_generates_the_8bit_models_tokens(quantized_dir, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="the genai target needs onnxruntime-genai")
    model_dir, fmt = quantized_dir
    # no dtype asked: INT8 folders default to float32, the only dtype with 8-bit kernels on the CPU
    summary = export("genai", model_dir, tmp_path, ExportOptions(dtype=None if fmt == "int8" else "float32"))
    assert summary["dtype"]["export"] == "float32" and ("default" in summary["dtype"]) == (fmt == "int8")
    assert summary["quantization"]["linears"] == 21
    assert summary["generation"]["quantized_linears"]["linears"] == 21
    assert summary["generation"]["identical"]  # on this small model: GenAI's greedy tokens = transformers' 8-bit ones


def test_fused_int8_genai_folders_only_where_the_kernel_is_exact(quantized_dir, tmp_path, monkeypatch):
    """--fused-int8 leaves INT8 linears to onnxruntime's fused integer kernel (faster on the CPU), which
    is exact only with VNNI or on Arm: refused where it saturates, for FP8 models and float16 graphs
    (no such kernel), and on other targets; where it applies, the folder runs the fused kernel."""
    pytest.importorskip("onnxruntime_genai", reason="the genai target needs onnxruntime-genai")
    import exporters.genai
    from exporters import ExportError
    from exporters.onnx_qdq import fused_int8_is_exact

    model_dir, fmt = quantized_dir
    fused = ExportOptions(fused_int8=True)
    with pytest.raises(ExportError, match="--fused-int8 applies to the genai targets"):
        export("onnx", model_dir, tmp_path / "o", fused)
    if fmt == "fp8":
        with pytest.raises(ExportError, match="applies to models pruned with --quantize int8; this one is fp8"):
            export("genai", model_dir, tmp_path / "f", fused)
        return
    with pytest.raises(ExportError, match="--fused-int8 needs --dtype float32"):
        export("genai", model_dir, tmp_path / "h", ExportOptions(fused_int8=True, dtype="float16"))
    with monkeypatch.context() as patched:
        patched.setattr(exporters.genai, "fused_int8_is_exact", lambda: False)
        with pytest.raises(ExportError, match="this CPU has no VNNI"):
            export("genai", model_dir, tmp_path / "v", fused)
    assert not any((tmp_path / name).exists() for name in ("o", "f", "h", "v"))  # all before any work
    if not fused_int8_is_exact():  # this CPU: the real check refuses too
        with pytest.raises(ExportError, match="this CPU has no VNNI"):
            export("genai", model_dir, tmp_path / "g", fused)
        return
    summary = export("genai", model_dir, tmp_path / "g", fused)
    session = json.loads((tmp_path / "g" / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert not set(INT8_SAFE_SESSION) & set(session) and summary["fused_int8"] is True
    assert summary["generation"]["quantized_linears"]["linears"] == 21


def test_the_model_level_times_an_int8_genai_folder_as_exported_and_fused_where_exact(quantized_dir):
    pytest.importorskip("onnxruntime_genai", reason="the genai backend needs onnxruntime-genai")
    from exporters.onnx_qdq import fused_int8_is_exact
    from runtime_bench.model import run_model
    from runtime_bench.report import _precision
    from thanos.models import load_model

    model_dir, fmt = quantized_dir
    records = run_model(load_model(str(model_dir))[0], [(1, 16)], "cpu", ["genai"], decode_steps=2)
    fused = [r.get("fused_int8", False) for r in records]
    assert all(r["status"] == "ok" and r["quantization"] == fmt for r in records)
    assert fused == [False, False] + ([True, True] if fmt == "int8" and fused_int8_is_exact() else [])
    assert {_precision(r) for r in records} == {f"{fmt} + float32"} | ({"int8 fused + float32"} if any(fused)
                                                                       else set())


def test_default_dtype_is_half_precision_but_float32_for_int8_genai():
    assert default_dtype("genai", "int8")[0] == "float32" and default_dtype("genai", "int8")[1]
    for fmt, quantized in (("genai", "fp8"), ("genai", None), ("onnx", "int8"), ("tensorrt", "int8")):
        assert default_dtype(fmt, quantized) == ("float16", None)
    assert default_dtype("safetensors", "int8") == (None, None)


def test_split_dense_rows_is_refused_for_an_8bit_model_before_any_work(quantized_dir, tmp_path):
    model_dir, _ = quantized_dir
    with pytest.raises(InputError, match="--split-dense-rows would replace them"):
        export("onnx", model_dir, tmp_path / "o", ExportOptions(split_dense_rows=True))


def test_tensorrt_refuses_fp8_below_compute_capability_8_9():
    with pytest.raises(BackendMissingError, match=r"8\.6, and TensorRT's FP8 kernels need 8\.9 .*--quantize int8"):
        require_8bit_gpu("fp8", (8, 6), "NVIDIA A10")
    with pytest.raises(BackendMissingError, match=r"INT8 kernels need 8\.0"):
        require_8bit_gpu("int8", (7, 5), "Tesla T4")
    require_8bit_gpu("fp8", (9, 0), "NVIDIA H200")
    require_8bit_gpu("int8", (8, 0), "NVIDIA A100")


def test_prune_and_build_carries_8bit_to_onnx(tiny_llama_dir, tmp_path):
    base = ["prune-and-build", "--model", str(tiny_llama_dir), "--calib-samples", "4", "--seqlen", "32",
            "--device", "cpu", "--no-eval", "--quiet", "--quantize", "fp8"]
    # the export casts the model it holds to float16; the bench then times it in float32 (CPU): each cast
    # dequantizes the 8-bit weights anew, else the bench's graphs refused them
    result = CliRunner().invoke(main, [*base, "--target", "onnx", "--bench",
                                       "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "8-bit      fp8: 21 linears as QuantizeLinear / DequantizeLinear" in result.output
    # what it prints names the files where they end up, not the staging folder they were written in
    assert f"exported   onnx -> {tmp_path / 'b' / 'onnx' / 'model.onnx'}" in result.output
    assert ".staging" not in result.output
    build = json.loads((tmp_path / "b" / "build_summary.json").read_text())
    assert build["export_summary"]["quantization"]["linears"] == 21
    # the quick bench times the 8-bit model as the runtimes serve it, and the FP8 products beside fp32's
    bench = json.loads((tmp_path / "b" / "bench" / "report.json").read_text())
    assert {r["dtype"] for r in bench["results"] if r["level"] == "gemm"} >= {"float32", "float8_e4m3fn"}
    served = [r for r in bench["results"] if r["level"] == "model" and r["backend"] == "onnxruntime"]
    assert served and all(r["status"] == "ok" and r["quantization"] == "fp8" for r in served)
    refusals = [] if torch.cuda.is_available() else [("needs a CUDA GPU", ["--target", "torch"])]
    if importlib.util.find_spec("onnxruntime_genai"):
        refusals.append(("--fused-int8 applies to models pruned with --quantize int8", ["--target", "genai",
                                                                                      "--fused-int8"]))
    for refused, extra in refusals:
        result = CliRunner().invoke(main, [*base, *extra, "--out", str(tmp_path / "r")])
        assert result.exit_code == 1 and refused in result.output, result.output
        assert not (tmp_path / "r").exists()  # before any pruning


@pytest.mark.parametrize("fixture, linears", [("tiny_gpt2_dir", 8), ("tiny_opt_dir", 12)])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_linears_traced_to_gemm_are_quantized_too(request, fixture, linears, fmt, tmp_path):
    """OPT's fc1 / fc2 and GPT-2's Conv1D run on 2-D inputs, which torch.onnx traces to Gemm: they
    become MatMul + Add with their QDQ pairs, and the export's check runs each one."""
    model_dir = tmp_path / "m"
    prune_to_directory(PruneJob(out=str(model_dir), model=str(request.getfixturevalue(fixture)),
                                config=PruneConfig(quantize=fmt, preset="fast"), **{**SMALL, "eval_windows": 1}))
    summary = export("onnx", model_dir, tmp_path / "onnx", ExportOptions(dtype="float32"))
    assert summary["quantization"]["linears"] == summary["validation"]["quantized_linears"]["linears"] == linears
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert not [n for n in graph.graph.node if n.op_type == "Gemm"]  # no linear left unquantized as a Gemm


@pytest.mark.parametrize("family", TRACED_FAMILIES)
def test_every_supported_family_exports_its_int8_model_as_qdq(family, tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """Each family's smoothed INT8 2:4 model (its norms, biases and fused linears as they are) traced to
    QDQ ONNX: every linear of its decoder layers carries its pair, and the export's check runs each
    on onnxruntime's own inputs and the whole graph against the 8-bit PyTorch model."""
    model_dir = tmp_path / "m"
    prune_to_directory(PruneJob(out=str(model_dir), model=str(_save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)),
                                config=PruneConfig(quantize="int8", preset="fast"), **{**SMALL, "eval_windows": 1}))
    summary = export("onnx", model_dir, tmp_path / "onnx", ExportOptions(dtype="float32"))
    linears = len(json.loads((model_dir / "thanos_report.json").read_text())["layers"])
    assert summary["quantization"]["linears"] == summary["validation"]["quantized_linears"]["linears"] == linears
