import importlib.util
import json
import os

import pytest
import torch
from click.testing import CliRunner

from cli import main
from runtime_bench.bench import BenchSettings, run_bench
from runtime_bench.gemm import crossovers, two_four_weight
from runtime_bench.protocol import measure
from tests.thanos.helpers import assert_nm
from thanos.errors import InputError


def test_protocol_reports_median_p90_and_memory():
    calls = []
    t = measure(lambda: calls.append(torch.randn(64, 64) @ torch.randn(64, 64)), "cpu", warmup=2, min_repeats=4,
                max_repeats=4)
    assert len(calls) == 6 and t.repeats == 4  # warm-up runs are not counted
    assert 0 < t.median_ms <= t.p90_ms
    assert t.peak_memory_bytes > 0 and t.memory_kind == "process RSS peak"


def test_two_four_weights_are_exact():
    assert_nm(two_four_weight(32, 64, torch.float32, "cpu"), 2, 4)


def test_crossover_is_where_sparse_stays_faster():
    recs = [dict(level="gemm", status="ok", backend="b", dtype="float16", shape=[8, 8], tokens=m, speedup=s)
            for m, s in [(1, 0.6), (16, 1.1), (64, 0.9), (256, 1.3), (1024, 1.5)]]
    (row,) = crossovers(recs)
    assert row["crossover_tokens"] == 256 and row["best_speedup"] == 1.5


@pytest.mark.onnx
def test_cpu_bench_writes_reports(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench"
    summary = run_bench(BenchSettings(target=str(tiny_llama_dir), out=str(out), tokens=(1, 32), dtypes=("float32",),
                                      grid=((1, 16), (2, 16)), device="cpu", decode_steps=2))
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["torch"] == torch.__version__ and "cpu" in report["machine"]
    assert report["results"] == json.loads(json.dumps(summary["results"], default=str))
    ok = [r for r in report["results"] if r["status"] == "ok"]
    runtimes = {"onnxruntime"} | ({"genai"} if importlib.util.find_spec("onnxruntime_genai") else set())
    assert {r["backend"] for r in ok} >= {"torch-dense"} | runtimes
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in ok)
    assert all(r["provider"] for r in ok if r["backend"] in runtimes)  # which provider ran is recorded
    decode = [r for r in ok if r.get("phase") == "decode"]
    assert {r["backend"] for r in decode} == {"torch-dense"} | runtimes  # the runtimes on their KV-cache graphs
    assert all(r["tokens_per_s"] > 0 for r in decode)
    skipped = [r for r in report["results"] if r["status"] == "skipped"]
    if not torch.cuda.is_available():
        assert {"torch-2:4", "tensorrt-sparse", "torch-2:4-cusparselt", "onnxruntime-tensorrt"} <= \
            {r["backend"] for r in skipped}
    assert all(r["reason"] for r in skipped)
    md = (out / "report.md").read_text()
    assert "## Model level" in md and "## Skipped" in md and "![model_latency.png]" in md
    assert (out / "model_latency.png").stat().st_size > 1000


def test_bench_cli_rejects_unknown_shape_set(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), "--shapes", "gpt5", "--levels", "gemm",
                                       "--device", "cpu", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 1 and "unknown shape set 'gpt5'" in result.output


@pytest.mark.gpu
def test_gpu_gemm_measures_semi_structured(tmp_path):
    summary = run_bench(BenchSettings(target="random:smollm2-135m", out=str(tmp_path), tokens=(1, 1024),
                                      levels=("gemm",), dtypes=("float16",)))
    assert any(r["status"] == "ok" and "speedup" in r for r in summary["results"])


@pytest.mark.onnx
def test_model_level_leaves_the_callers_model_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime_bench.model import run_model

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    records = run_model(model, [(1, 8)], "cpu", ["onnxruntime", "tensorrt-sparse"])
    assert next(model.parameters()).dtype == torch.bfloat16  # the fp32 ONNX export used a copy
    assert [(r["backend"], r.get("phase"), r["status"]) for r in records] == [
        ("onnxruntime", "prefill", "ok"), ("onnxruntime", "decode", "ok"), ("tensorrt-sparse", None, "skipped")]


@pytest.mark.parametrize("family", ["qwen3_5_text", "minimax"])
def test_model_level_times_a_hybrid_model_in_torch_and_says_why_not_in_the_graph_runtimes(family, tmp_path_factory,
                                                                                            tiny_tokenizer_dir):
    """Qwen3.5's and MiniMax's linear-attention layers keep a recurrent state beside the KV cache:
    torch decodes it (in the cache the model builds: MiniMax refuses any other class), the runtimes
    of exported graphs are skipped with the reason instead of failing inside the export."""
    from runtime_bench.model import run_model
    from tests.conftest import _save_tiny
    from thanos.models import load_model

    model, _ = load_model(str(_save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)))
    records = run_model(model, [(1, 8)], "cpu", ["torch-dense", "onnxruntime", "genai"], decode_steps=2)
    assert [(r["backend"], r.get("phase"), r["status"]) for r in records] == [
        ("torch-dense", "prefill", "ok"), ("torch-dense", "decode", "ok"), ("onnxruntime", None, "skipped"),
        ("genai", None, "skipped")]
    assert all("linear-attention, Mamba or convolution layers" in r["reason"] for r in records[2:])


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_gpu_model_level_times_tensorrt_engines(tmp_path, quantize):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this GPU machine")
    summary = run_bench(BenchSettings(target="random:smollm2-135m", out=str(tmp_path), levels=("model",),
                                      grid=((1, 64),), backends=("tensorrt-dense", "tensorrt-sparse"),
                                      quantize=quantize))
    timed = {r["backend"]: r for r in summary["results"] if r["status"] == "ok"}
    assert set(timed) == {"tensorrt-dense", "tensorrt-sparse"}
    assert timed["tensorrt-sparse"]["sparse_eligible"] > 0 and timed["tensorrt-dense"]["engine_device_bytes"] > 0
    assert timed["tensorrt-sparse"]["quantization"] == quantize


@pytest.mark.gpu
def test_gpu_model_level_times_the_8bit_two_four_linears():
    """The torch target's FP8 / INT8 cuSPARSELt linears in a whole model, or the reason this GPU has none."""
    from runtime_bench.model import random_model, run_model

    for fmt in ("int8", "fp8"):
        model = random_model("smollm2-135m", torch.float16, "cuda", quantize=fmt)
        records = run_model(model, [(1, 64)], "cuda", ["torch-2:4"], decode_steps=2)
        ok = [r for r in records if r["status"] == "ok"]
        if not ok:
            assert "cuSPARSELt" in records[0]["reason"] or "capability" in records[0]["reason"], records
            continue
        assert all(r["quantization"] == fmt for r in ok) and ok[-1]["converted_linears"] == 210, ok


def test_interrupted_bench_keeps_what_it_measured(tiny_llama_dir, tmp_path):
    def stop_after_first_model_figure(stage, done, total):
        if stage == "torch-dense":
            raise KeyboardInterrupt

    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchSettings(target=str(tiny_llama_dir), out=str(out), tokens=(1, 8), dtypes=("float32",),
                                grid=((1, 16), (2, 16)), device="cpu"), stop_after_first_model_figure)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["complete"] is False
    levels = [r["level"] for r in report["results"] if r["status"] == "ok"]
    assert levels.count("gemm") >= 2 and levels.count("model") == 1  # the GEMMs and the first prefill figure


def test_a_bench_killed_outright_keeps_the_figures_measured_before(tmp_path):
    """A kernel's crash or a SIGKILL at a time limit ends the process with no exception to write the
    report on: report.json is rewritten, whole, as each figure arrives."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bench"
    script = f"""
import os, signal
from runtime_bench.bench import BenchSettings, run_bench

def kill_after_the_third_shape(stage, done, total):  # called once a shape is timed
    if done == 3:
        os.kill(os.getpid(), signal.SIGKILL)

run_bench(BenchSettings(target="random:smollm2-135m", out={str(out)!r}, levels=("gemm",), tokens=(1,),
                        dtypes=("float32",), device="cpu"), kill_after_the_third_shape)
"""
    root = Path(__file__).resolve().parents[2]
    ended = subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                           capture_output=True, text=True, timeout=300)
    assert ended.returncode == -9, ended.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["complete"] is False and not (out / "report.md").exists()
    shapes = {tuple(r["shape"]) for r in report["results"] if r["status"] == "ok"}
    assert len(shapes) == 3  # the three shapes timed before the kill


def test_gemm_only_bench_of_a_named_model_does_not_build_it(tmp_path):
    summary = run_bench(BenchSettings(target="random:llama2-70b", out=str(tmp_path), levels=("gemm",), tokens=(1,),
                                      dtypes=("float32",), device="cpu"))  # 138 GB of weights if it were built
    assert summary["settings"]["gemm_shapes"] == [[8192, 8192], [1024, 8192], [28672, 8192], [8192, 28672]]
    assert [r["shape"] for r in summary["results"] if r["status"] == "ok"] == summary["settings"]["gemm_shapes"]


def test_gemm_shapes_can_come_from_a_model_directory(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """--shapes DIR: the distinct linears of the directory's family at its sizes (here Phi-3's fused
    q/k/v and gate/up), read from config.json alone."""
    from tests.conftest import _save_tiny

    source = _save_tiny("phi3", tmp_path_factory, tiny_tokenizer_dir)
    (source / "model.safetensors").unlink()
    summary = run_bench(BenchSettings(target="random:smollm2-135m", out=str(tmp_path), levels=("gemm",), tokens=(1,),
                                      dtypes=("float32",), device="cpu", shapes=(str(source),)))
    # qkv_proj (64 + 2 x 2 x 16 rows), o_proj, gate_up_proj (2 x 128), down_proj, after the named model's
    assert summary["settings"]["gemm_shapes"][4:] == [[64, 64], [64, 128], [128, 64], [256, 64]]


def test_cpu_bench_defaults_to_float32_gemms(tmp_path):
    summary = run_bench(BenchSettings(target="random:llama2-7b", out=str(tmp_path), levels=("gemm",), tokens=(1,),
                                      device="cpu"))
    assert summary["settings"]["dtypes"] == ["float32"]
    assert {r["dtype"] for r in summary["results"] if r["status"] == "ok"} == {"float32"}


def test_a_random_model_can_be_made_8bit_for_the_model_level(monkeypatch):
    """bench random:NAME --quantize: every decoder linear 8-bit as a pruned and quantized one is (its
    weights on the grid of its scales, still 2:4, a static input scale that covers its inputs), so
    the 8-bit runtimes can be timed on real shapes without pruning a real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime_bench.model import quantize_random_
    from thanos.models import LayerSelection, prunable_linears
    from thanos.quantize import FORMATS, grid_of
    from thanos.quantized_model import describe, quantization_of

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)
    model = LlamaForCausalLM(config).eval()
    linears = [mod for layer in prunable_linears(model, LayerSelection()).values() for mod in layer.values()]
    with torch.no_grad():
        for mod in linears:
            mod.weight.copy_(two_four_weight(*mod.weight.shape, torch.float32, "cpu"))
    inputs = {}
    hooks = [mod.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0].abs().amax()))
             for mod in linears]
    torch.manual_seed(0)
    quantize_random_(model, "int8")
    for hook in hooks:
        hook.remove()
    assert describe(model) == dict(format="int8", inputs="static", linears=len(linears), activations_simulated=True)
    for mod in linears:
        quant = quantization_of(mod)
        assert grid_of(mod.weight, quant.weight_scale, FORMATS["int8"]) is not None
        assert_nm(mod.weight, 2, 4)
        # the largest magnitude over 127 and back: two fp32 roundings
        assert float(quant.input_scale) * 127 == pytest.approx(float(inputs[mod]), rel=2 * torch.finfo(torch.float32).eps)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 96, (1, 8))).logits).all()
    with pytest.raises(InputError, match="unknown 8-bit format 'int4'"):
        quantize_random_(model, "int4")


def test_bench_quantize_is_for_random_targets_and_adds_the_8bit_gemms(tiny_llama_dir, tmp_path):
    with pytest.raises(InputError, match="applies to random: targets.*prune --quantize"):
        run_bench(BenchSettings(target=str(tiny_llama_dir), out=str(tmp_path), quantize="fp8", device="cpu"))
    summary = run_bench(BenchSettings(target="random:smollm2-135m", out=str(tmp_path), levels=("gemm",), tokens=(1,),
                                      device="cpu", quantize="int8"))
    assert summary["settings"]["dtypes"] == ["float32", "int8"]


def test_bench_rejects_an_unknown_backend(tiny_llama_dir, tmp_path):
    with pytest.raises(InputError, match="unknown backend 'onnx'.*genai"):
        run_bench(BenchSettings(target=str(tiny_llama_dir), out=str(tmp_path), backends=("onnx",), device="cpu"))


@pytest.mark.parametrize("settings, message", [
    (dict(levels=("gem",)), "unknown level 'gem'"),
    (dict(levels=()), "no level to measure"),
    (dict(levels=("gemm",), tokens=(0, 16)), "token counts must be 1 or more"),
    (dict(grid=((0, 5),)), "batch x sequence length, both 1 or more.*not 0x5"),
    (dict(grid=((1,),)), "batch x sequence length"),
    (dict(grid=((1, 64),), decode_steps=0), "--decode-steps must be 1 or more"),
    # the tiny model covers 256 positions: a prefill past them, or the decode's prompt plus its steps
    (dict(grid=((1, 300),)), "covers 256 positions, and the grid asks for 316"),
    (dict(grid=((1, 250), (1, 16)), decode_steps=8), "asks for 258"),
])
def test_bench_refuses_what_would_measure_nothing_or_fail_in_a_runtime(tiny_llama_dir, tmp_path, settings, message):
    with pytest.raises(InputError, match=message):
        run_bench(BenchSettings(target=str(tiny_llama_dir), out=str(tmp_path), device="cpu", **settings))
    assert not (tmp_path / "report.json").exists()


def test_bench_cli_names_the_option_of_a_malformed_list(tiny_llama_dir, tmp_path):
    for option, value in (("--grid", "1x"), ("--tokens", "1,a")):
        result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), option, value, "--out", str(tmp_path)])
        assert result.exit_code == 2 and f"Invalid value for {option}" in result.output, result.output


def test_a_kernel_that_fails_at_one_shape_is_skipped_there_only(monkeypatch):
    """Reasons are kept per shape: a conversion or a first product that fails at one shape voids nothing else."""
    from runtime_bench import gemm

    monkeypatch.setattr(gemm, "sparse_backends", lambda device: {"torch-2:4-cusparselt": None})

    def fussy(weight, backend):
        if weight.shape == (8, 16):
            raise RuntimeError("conversion refused at this shape")
        if weight.shape == (16, 32):
            return lambda x: (_ for _ in ()).throw(RuntimeError("the first product failed"))
        return lambda x: torch.nn.functional.linear(x, weight)

    monkeypatch.setattr(gemm, "_sparse_linear", fussy)
    records = gemm.run_gemm([(8, 16), (16, 32), (32, 64)], [1, 4], ["float32"], "cpu", budget_s=0.01)
    sparse = {(tuple(r["shape"]), r.get("tokens"), r["status"]): r for r in records
              if r["backend"] == "torch-2:4-cusparselt"}
    assert "conversion refused" in sparse[((8, 16), None, "skipped")]["reason"]
    assert "first product failed" in sparse[((16, 32), 1, "skipped")]["reason"]
    assert ((32, 64), 1, "ok") in sparse and ((32, 64), 4, "ok") in sparse  # the later shape is still timed
    dense = [r for r in records if r["backend"] == "torch-dense" and r["status"] == "ok"]
    assert len(dense) == 6


def test_a_backend_that_fails_at_the_model_level_is_recorded_and_the_rest_run(monkeypatch):
    from runtime_bench import model as model_level

    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime fell over")

    monkeypatch.setattr(model_level, "_onnxruntime", broken)
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=64)).eval()
    records = model_level.run_model(tiny, [(1, 8)], "cpu", ["onnxruntime", "torch-dense"], decode_steps=2)
    assert {r["backend"]: r["status"] for r in records} == {"onnxruntime": "skipped", "torch-dense": "ok"}
    assert "onnxruntime fell over" in next(r["reason"] for r in records if r["backend"] == "onnxruntime")


def test_fp8_dense_kernel_computes_the_product_and_pads_small_token_counts():
    """The FP8 row of the GEMM level, run where torch has an FP8 matmul (the CPU here): the product of
    the FP8 values to bf16 round-off, M padded to 16, the 2:4 kernel skipped with its reason."""
    from runtime_bench import gemm

    weight = gemm.two_four_weight(32, 64, torch.float8_e4m3fn, "cpu")
    kernels, reasons = gemm.fp8_kernels(weight, {"torch-2:4-cusparselt": "needs a CUDA GPU"})
    x = torch.randn(16, 64).to(torch.float8_e4m3fn)
    expected = x.float() @ weight.float().t()
    try:
        got = kernels["torch-dense"](x).float()
    except NotImplementedError:  # torch 2.6 has it on CUDA only
        pytest.skip(f"torch {torch.__version__} has no FP8 matmul (torch._scaled_mm) on the CPU")
    assert (got - expected).abs().max() <= 2 ** -7 * expected.abs().max()  # bf16 keeps 8 significant bits
    assert reasons == {"torch-2:4-cusparselt": "needs a CUDA GPU"}
    records = []
    gemm._time_shape(32, 64, gemm.FP8, [1, 20], "cpu", {"torch-2:4-cusparselt": "needs a CUDA GPU"}, 0.01, records,
                     lambda: None)
    ok = [r for r in records if r["status"] == "ok" and r["backend"] == "torch-dense"]  # the products
    assert [(r["tokens"], r["computed_tokens"]) for r in ok] == [(1, 16), (20, 32)]
    assert ok[0]["weight_bytes"] == 32 * 64  # one byte a weight
    assert any(r["status"] == "skipped" and r["backend"] == "torch-2:4-cusparselt" for r in records)


def test_int8_dense_kernel_is_the_exact_integer_product():
    """The INT8 row of the GEMM level on the CPU: int32 products exactly, M padded to 32."""
    from runtime_bench import gemm

    weight = gemm.two_four_weight(32, 64, torch.int8, "cpu")
    kernels, reasons = gemm.int8_kernels(weight, {"torch-2:4-cusparselt": "needs a CUDA GPU"})
    x = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    assert torch.equal(kernels["torch-dense"](x), x.int() @ weight.int().t())
    assert reasons == {"torch-2:4-cusparselt": "needs a CUDA GPU"}
    records = []
    gemm._time_shape(32, 64, gemm.INT8, [1, 40], "cpu", {"torch-2:4-cusparselt": "needs a CUDA GPU"}, 0.01,
                     records, lambda: None)
    ok = [r for r in records if r["status"] == "ok" and r["backend"] == "torch-dense"]  # the products
    assert [(r["tokens"], r["computed_tokens"]) for r in ok] == [(1, 32), (40, 64)]


@pytest.mark.gpu
def test_gpu_int8_two_four_is_the_dense_product_or_says_why():
    from runtime_bench import gemm

    weight = gemm.two_four_weight(256, 512, torch.int8, "cuda")
    kernels, reasons = gemm.int8_kernels(weight, {"torch-2:4-cusparselt": None})
    x = torch.randint(-127, 128, (64, 512), dtype=torch.int8, device="cuda")
    if "torch-2:4-cusparselt" not in kernels:
        pytest.skip(f"this torch build has no INT8 2:4 kernel: {reasons['torch-2:4-cusparselt']}")
    assert torch.equal(kernels["torch-2:4-cusparselt"](x), kernels["torch-dense"](x))  # integers: exact


@pytest.mark.gpu
def test_gpu_fp8_two_four_matches_dense_or_says_why():
    from runtime_bench import gemm

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    weight = gemm.two_four_weight(256, 512, torch.float8_e4m3fn, "cuda")
    kernels, reasons = gemm.fp8_kernels(weight, {"torch-2:4-cusparselt": None})
    x = torch.randn(64, 512, device="cuda").to(torch.float8_e4m3fn)
    dense = kernels["torch-dense"](x).float()
    if "torch-2:4-cusparselt" not in kernels:
        pytest.skip(f"this torch build has no FP8 2:4 kernel: {reasons['torch-2:4-cusparselt']}")
    sparse = kernels["torch-2:4-cusparselt"](x).float()
    assert sparse.shape == dense.shape
    assert (sparse - dense).abs().max() <= 2 ** -7 * dense.abs().max()


def test_8bit_gemm_rows_time_the_inputs_quantization_as_the_torch_target_does_it():
    from exporters.torch_8bit import Kernel, Sparse8bitLinear
    from runtime_bench.gemm import FP8, INT8, _time_shape, input_quantizers
    from runtime_bench.report import _markdown
    from thanos.quantize import FORMATS

    x = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    kernel = Kernel("identity", lambda grid: grid, lambda prepared, q: q)  # only quantize_input is used
    for dtype_name, fmt in ((FP8, FORMATS["fp8"]), (INT8, FORMATS["int8"])):
        grid = torch.zeros(8, 64).to(fmt.dtype)
        quantizers = input_quantizers(dtype_name)
        for name, scale in (("input-quantize-static", 1.0), ("input-quantize-per-token", None)):
            module = Sparse8bitLinear(grid, torch.ones(8), scale, fmt, None, torch.bfloat16, kernel)
            assert torch.equal(quantizers[name](x).float(), module.quantize_input(x)[0].float()), (dtype_name, name)
        records = []  # on the CPU the 8-bit products themselves may be missing; the quantizers are timed anyway
        _time_shape(64, 64, dtype_name, [1, 40], "cpu", {}, 0.02, records, lambda: None)
        timed = [r for r in records if r["backend"].startswith("input-quantize") and r["status"] == "ok"]
        assert sorted((r["backend"], r["tokens"], r["computed_tokens"]) for r in timed) == sorted(
            (name, m, -(-m // (16 if dtype_name == FP8 else 32)) * (16 if dtype_name == FP8 else 32))
            for name in quantizers for m in (1, 40))
        assert all(r["median_ms"] > 0 for r in timed)
        records.append(dict(timed[-1], share_of_dense_product=0.125))  # as on a GPU, where the product ran
        table = _markdown(dict(machine={}, settings={}, results=records, crossovers=[]), [])
        assert f"| input-quantize-per-token | {dtype_name} | 64x64 | 40 |" in table and "| 0.12 of dense |" in table
