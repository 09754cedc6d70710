"""Whole models pruned with the 8-bit step: the saved directory, its scales, and what reads it."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cli import main
from tests.thanos.helpers import assert_nm
from tests.thanos.test_driver import SMALL, pruned_weights
from thanos import PruneConfig
from thanos.errors import InputError
from thanos.linears import weight_view
from thanos.models import LayerSelection, load_model, prunable_linears
from thanos.pipeline import PruneJob, evaluate_directory, prune_to_directory
from thanos.quantize import FORMATS, grid_of
from thanos.quantized_model import (QUANTIZATION_FILE, describe, quantization_of, quantized_linears,
                                    stop_simulating_activations_)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("fp8") / "m"
    report = prune_to_directory(PruneJob(out=str(out), model=str(tiny_llama_dir), config=PruneConfig(quantize="fp8"),
                                         **SMALL))
    return out, report


def test_the_quantized_directory_is_a_plain_model_plus_its_scales(fp8_dir):
    out, report = fp8_dir
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers alone: no unknown tensors, nothing missing
    model, _ = load_model(str(out))
    assert describe(model) == dict(format="fp8", inputs="static", linears=len(pruned_weights(model)),
                                   activations_simulated=True)
    weights = pruned_weights(plain)
    for name, mod in quantized_linears(model).items():
        assert torch.equal(weights[name], weight_view(mod))
        quant = quantization_of(mod)
        assert grid_of(weight_view(mod), quant.weight_scale, FORMATS["fp8"]) is not None  # bit-exact 8-bit values
        assert_nm(weight_view(mod), 2, 4)
        assert float(quant.input_scale) > 0
    assert report["recipe"]["steps"][-1] == dict(step="quantize", format="fp8", rounding="compensated", smoothing=0.0,
                                                 inputs="static")
    for layer in report["layers"]:
        q = layer["quantization"]
        assert q["error"] <= q["nearest_error"] and q["input_scale"] == pytest.approx(q["input_amax"] / 448)
    assert PruneConfig.from_recipe(report["recipe"]).recipe == PruneConfig(quantize="fp8").recipe


def test_inspect_names_the_8bit_step(fp8_dir, tiny_llama_dir):
    out, report = fp8_dir
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert f"8-bit: {report['quantization']['linears']} linears quantized to fp8" in shown.output
    assert "8-bit" not in CliRunner().invoke(main, ["inspect", str(tiny_llama_dir)]).output


def test_eval_of_the_directory_is_the_8bit_model_the_run_measured(fp8_dir):
    out, report = fp8_dir
    # same process and thread count as the run: the loaded model computes exactly what it measured
    evaluated = evaluate_directory(str(out), seqlen=SMALL["seqlen"], device="cpu", max_windows=SMALL["eval_windows"])
    assert evaluated["perplexity"] == report["perplexity_after"]["value"]
    model, tokenizer = load_model(str(out))
    ids = torch.tensor([tokenizer("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        rounded = model(ids).logits
        stop_simulating_activations_(model)
        unrounded = model(ids).logits
    assert not torch.equal(rounded, unrounded)  # the inputs really are rounded


def test_weights_or_scales_changed_after_quantizing_are_refused(fp8_dir, tmp_path):
    out, _ = fp8_dir
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    weights = load_file(edited / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name].view(-1)[weights[name].view(-1).nonzero()[0]] *= 1.01
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="model.layers.1.mlp.down_proj.weight is not its fp8 values"):
        load_model(str(edited))

    shutil.copy(out / "model.safetensors", edited / "model.safetensors")
    scales = load_file(edited / QUANTIZATION_FILE)
    del scales["model.layers.0.self_attn.q_proj.input_scale"]
    save_file(scales, edited / QUANTIZATION_FILE, metadata={"format": "fp8"})
    with pytest.raises(InputError, match="model.layers.0.self_attn.q_proj do not match"):
        load_model(str(edited))


def test_what_cannot_run_an_8bit_model_here_refuses_it_before_any_work(fp8_dir, tmp_path):
    out, _ = fp8_dir
    if not torch.cuda.is_available():  # the torch target's 8-bit linears need cuSPARSELt
        result = CliRunner().invoke(main, ["export", str(out), "--target", "torch", "--out", str(tmp_path / "t")])
        assert result.exit_code == 1 and "needs a CUDA GPU" in result.output, result.output
        assert not (tmp_path / "t").exists()
        result = CliRunner().invoke(main, ["prune-and-build", "--recipe", str(out / "thanos_report.json"), "--target",
                                           "torch", "--out", str(tmp_path / "build"), "--no-eval"])
        assert result.exit_code == 1 and "needs a CUDA GPU" in result.output, result.output
        assert not (tmp_path / "build").exists()


@pytest.mark.onnx
def test_the_model_level_times_an_8bit_model_as_each_runtime_serves_it(fp8_dir, tmp_path):
    """onnxruntime (and GenAI where installed) run the FP8 QuantizeLinear / DequantizeLinear graphs,
    read back from what was timed; PyTorch dense times the same weights in float32; what cannot
    take the 8-bit model here says why."""
    import importlib.util

    out, _ = fp8_dir
    bench = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", str(out), "--levels", "model", "--grid", "1x16", "--device", "cpu",
                                       "--decode-steps", "2", "--out", str(bench), "--quiet"])
    assert result.exit_code == 0, result.output
    records = json.loads((bench / "report.json").read_text())["results"]
    ok = {(r["backend"], r["phase"]): r for r in records if r["status"] == "ok"}
    runtimes = ["onnxruntime"] + (["genai"] if importlib.util.find_spec("onnxruntime_genai") else [])
    for backend in runtimes:
        for phase in ("prefill", "decode"):
            assert ok[(backend, phase)]["quantization"] == "fp8" and ok[(backend, phase)]["dtype"] == "float32"
    assert ok[("torch-dense", "prefill")]["dtype"] == "float32" and not ok[("torch-dense", "prefill")].get("quantization")
    skipped = {r["backend"]: r["reason"] for r in records if r["status"] == "skipped"}
    assert "QuantizeLinear" in skipped["onnxruntime-tensorrt"]
    if not torch.cuda.is_available():
        assert "CUDA" in skipped["torch-2:4"]
    assert "| onnxruntime | CPUExecutionProvider | fp8 + float32 | prefill | 1x16 |" in (bench / "report.md").read_text()
    from runtime_bench.bench import BenchSettings, run_bench  # the GEMM level adds the model's 8-bit products

    gemm = run_bench(BenchSettings(target=str(out), out=str(tmp_path / "gemm"), levels=("gemm",), tokens=(1,),
                                   device="cpu"))
    assert gemm["settings"]["dtypes"] == ["float32", "float8_e4m3fn"]


def test_cli_prunes_to_int8_and_names_the_step(tiny_llama_dir, tmp_path):
    out = tmp_path / "int8"
    args = ["prune", "--model", str(tiny_llama_dir), "--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2",
            "--device", "cpu", "--quiet", "--quantize", "int8", "--quantize-rounding", "nearest", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "int8 weights and inputs, nearest rounding" in result.output and "8-bit      int8" in result.output
    report = json.loads((out / "thanos_report.json").read_text())
    assert {layer["quantization"]["rounding"] for layer in report["layers"]} == {"nearest"}
    refused = CliRunner().invoke(main, ["prune", "--quantize-rounding", "nearest", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 1 and "quantize_rounding applies to the 8-bit step" in refused.output


@pytest.fixture(scope="module")
def bf16_llama_dir(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_bf16")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_precision_models_quantize_exactly_in_their_dtype(bf16_llama_dir, tmp_path, fmt):
    out = tmp_path / fmt
    prune_to_directory(PruneJob(out=str(out), model=str(bf16_llama_dir), config=PruneConfig(quantize=fmt),
                                evaluate=False, **SMALL))
    model, _ = load_model(str(out))
    for name, mod in quantized_linears(model).items():
        weight = weight_view(mod)
        assert weight.dtype == torch.bfloat16 and torch.isfinite(weight).all()
        assert grid_of(weight, quantization_of(mod).weight_scale, FORMATS[fmt]) is not None, name
        assert_nm(weight, 2, 4)
    assert len(quantized_linears(model)) == sum(len(v) for v in prunable_linears(model, LayerSelection()).values())


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_compact_8bit_checkpoint_is_bit_exact_and_a_third_of_fp16(fp8_dir, tmp_path, dtype):
    from exporters import ExportOptions, export

    out, _ = fp8_dir
    summary = export("safetensors", out, tmp_path / "c", ExportOptions(dtype=dtype))
    assert summary["round_trip"] == "bit-exact"
    model, _ = load_model(str(out))
    reloaded, _ = load_model(str(tmp_path / "c"))
    assert describe(reloaded) == describe(model)
    weights = rows = 0
    for name, mod in quantized_linears(model).items():
        other = reloaded.get_submodule(name)
        expected = weight_view(mod).to(getattr(torch, dtype)) if dtype else weight_view(mod)
        assert torch.equal(weight_view(other), expected), name
        assert torch.equal(quantization_of(other).weight_scale, quantization_of(mod).weight_scale)
        assert torch.equal(quantization_of(other).input_scale, quantization_of(mod).input_scale)
        weights += weight_view(mod).numel()
        rows += weight_view(mod).shape[0]
    # one byte per kept value (half of them) and one bit per position, plus an fp32 scale per row
    assert summary["compact_bytes"] <= 0.3125 * 2 * weights + 4 * rows


def test_best_quantizes_the_reconstructed_weights(tiny_llama_dir):
    from thanos.calibration import sample_windows, tokenize_split
    from thanos.driver import prune_model_

    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    reports = prune_model_(model, samples, PruneConfig(preset="best", quantize="fp8"), "cpu")
    assert all("reconstruction" in r and "quantization" in r for r in reports)
    for name, mod in quantized_linears(model).items():  # the step ran on the final (reconstructed) weights
        assert grid_of(weight_view(mod), quantization_of(mod).weight_scale, FORMATS["fp8"]) is not None, name
        assert_nm(weight_view(mod), 2, 4)


def test_the_next_layer_is_calibrated_on_the_8bit_layers_outputs(tiny_llama_dir, monkeypatch):
    """Layer 1's statistics come from layer 0 as the 8-bit runtime computes it (its weights and its
    inputs rounded with the scales just set), not from layer 0 with full-precision inputs; and no
    rounding hook is left on the model afterwards."""
    import thanos.driver as driver
    from thanos.calibration import sample_windows, tokenize_split
    from thanos.quantized_model import inputs_rounded

    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    seen = []
    collect = driver.collect_statistics
    monkeypatch.setattr(driver, "collect_statistics",
                        lambda layer, linears, inputs, *a, **k: seen.append([x.clone() for x in inputs])
                        or collect(layer, linears, inputs, *a, **k))
    driver.prune_model_(model, samples, PruneConfig(preset="fast", quantize="fp8"), "cpu")
    assert not any(hasattr(mod, "_thanos_activation_hook") for mod in model.modules())
    layer0 = driver.decoder_layers(model)[0]
    args, kwargs = driver.capture_layer_inputs(model, samples, torch.device("cpu"), torch.device("cpu"))[1:]
    linears0 = {name: mod for name, mod in layer0.named_modules() if quantization_of(mod) is not None}
    with inputs_rounded(linears0.values()):
        rounded = driver.run_layer(layer0, seen[0], args, kwargs, "cpu", "cpu")
    unrounded = driver.run_layer(layer0, seen[0], args, kwargs, "cpu", "cpu")
    assert all(torch.equal(a, b) for a, b in zip(seen[1], rounded))
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], unrounded))


@pytest.fixture(scope="module")
def per_token_dir(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("fp8_per_token") / "m"
    config = PruneConfig(quantize="fp8", quantize_inputs="per-token")
    return out, prune_to_directory(PruneJob(out=str(out), model=str(tiny_llama_dir), config=config, **SMALL))


def test_per_token_inputs_are_saved_without_input_scales_and_rounded_token_by_token(per_token_dir):
    from safetensors import safe_open

    out, report = per_token_dir
    with safe_open(str(out / QUANTIZATION_FILE), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["inputs"] == "per-token" and not [k for k in keys if k.endswith(".input_scale")]
    assert report["recipe"]["steps"][-1]["inputs"] == "per-token"
    assert all(layer["quantization"]["inputs"] == "per-token" and layer["quantization"]["input_scale"] is None
               for layer in report["layers"])
    assert PruneConfig.from_recipe(report["recipe"]).recipe == PruneConfig(quantize="fp8",
                                                                           quantize_inputs="per-token").recipe
    model, _ = load_model(str(out))
    assert describe(model)["inputs"] == "per-token" and describe(model)["activations_simulated"]
    name, mod = next(iter(quantized_linears(model).items()))
    seen = []
    hook = mod.register_forward_hook(lambda m, args, output: seen.append(args[0]))
    x = torch.randn(2, mod.in_features, generator=torch.Generator().manual_seed(0))
    x[1] *= 1e-3  # a quiet token: one scale for both would leave it a few grid steps
    with torch.no_grad():
        mod(x)
    hook.remove()
    scale = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(seen[0], (x / scale).to(torch.float8_e4m3fn).float() * scale)
    # the loaded directory computes what the run measured (same process and thread count)
    evaluated = evaluate_directory(str(out), seqlen=SMALL["seqlen"], device="cpu", max_windows=SMALL["eval_windows"])
    assert evaluated["perplexity"] == report["perplexity_after"]["value"]


def test_a_layer_checkpoint_keeps_per_token_inputs(per_token_dir):
    from thanos.quantized_model import layer_tensors, restore_layer_, set_quantization

    model, _ = load_model(str(per_token_dir[0]))
    layer = model.model.layers[0]
    tensors, formats = layer_tensors(layer)
    assert formats and not [k for k in tensors if k.endswith(".input_scale")]
    for name in formats:
        set_quantization(layer.get_submodule(name), None)
    restore_layer_(layer, tensors, formats)
    assert {quantization_of(layer.get_submodule(name)).inputs for name in formats} == {"per-token"}


def test_per_token_compact_checkpoint_round_trips_and_qdq_targets_refuse_it(per_token_dir, tmp_path):
    from exporters import ExportError, export

    out, _ = per_token_dir
    summary = export("safetensors", out, tmp_path / "c")
    assert summary["round_trip"] == "bit-exact"
    model, _ = load_model(str(out))
    reloaded, _ = load_model(str(tmp_path / "c"))
    assert describe(reloaded) == describe(model)
    for target in ("onnx", "genai", "tensorrt"):  # refused before any work, whatever is installed
        with pytest.raises(ExportError, match=f"--target {target} .* cannot carry per-token input scales"):
            export(target, out, tmp_path / target)
        assert not (tmp_path / target).exists()


def test_prune_and_build_refuses_per_token_inputs_for_a_qdq_target_before_pruning(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--quantize", "fp8",
                                       "--quantize-inputs", "per-token", "--target", "onnx", "--out",
                                       str(tmp_path / "b"), "--no-eval", "--device", "cpu"])
    assert result.exit_code == 1 and "cannot carry per-token input scales" in result.output, result.output
    assert "--target torch or safetensors" in result.output and not (tmp_path / "b").exists()
    refused = CliRunner().invoke(main, ["prune", "--quantize-inputs", "per-token", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 1 and "quantize_inputs applies to the 8-bit step" in refused.output


def test_per_token_inputs_are_reported_where_the_8bit_step_runs_at_the_layers_end(tiny_llama_dir):
    # one pass (no group-by-group solves): the step runs at the layer's end, and no range pass sets scales
    from thanos.calibration import sample_windows, tokenize_split
    from thanos.driver import prune_model_

    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    config = PruneConfig(quantize="fp8", quantize_inputs="per-token", sequential=False)
    reports = prune_model_(model, samples, config, "cpu")
    assert {r["quantization"]["inputs"] for r in reports} == {"per-token"}
    assert {quantization_of(mod).inputs for mod in quantized_linears(model).values()} == {"per-token"}


@pytest.mark.onnx
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bfloat16_8bit_model_exports_to_float16_and_float32(bf16_llama_dir, tmp_path, fmt):
    """Most checkpoints ship in bfloat16, and ONNX runs float16 or float32: the cast dequantizes each
    8-bit weight anew in the export's dtype (a plain cast rounded bfloat16's values again, which are
    then not the 8-bit values times the scales, and the export refused every such model)."""
    from exporters import ExportOptions, export
    from thanos.quantize import dequantize
    from thanos.quantized_model import cast_model_

    out = tmp_path / "m"
    prune_to_directory(PruneJob(out=str(out), model=str(bf16_llama_dir), config=PruneConfig(quantize=fmt,
                                                                                            preset="fast"),
                                evaluate=False, **SMALL))
    model, _ = load_model(str(out))
    grids = {name: grid_of(weight_view(mod), quantization_of(mod).weight_scale, FORMATS[fmt])
             for name, mod in quantized_linears(model).items()}
    assert any(not torch.equal(dequantize(grids[name], quantization_of(mod).weight_scale, torch.float16),
                               weight_view(mod).to(torch.float16)) for name, mod in quantized_linears(model).items())
    cast_model_(model, torch.float16)
    for name, mod in quantized_linears(model).items():  # the same 8-bit values, exact in float16
        assert torch.equal(grid_of(weight_view(mod), quantization_of(mod).weight_scale, FORMATS[fmt]), grids[name])
    for dtype in ("float16", "float32"):
        summary = export("onnx", out, tmp_path / dtype, ExportOptions(dtype=dtype))
        assert summary["quantization"]["linears"] == summary["validation"]["quantized_linears"]["linears"] == 21
