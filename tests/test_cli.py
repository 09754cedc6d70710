import json
import shutil

import pytest
import torch

from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from cli import main
from thanos.linears import weight_view
from tests.thanos.helpers import assert_nm

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--device", "cpu", "--quiet"]


def test_help_teaches_with_examples():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "Quick start" in top.output
    prune = runner.invoke(main, ["prune", "--help"])
    assert prune.exit_code == 0
    assert "thanos-export prune --pattern 2:4" in prune.output and "resumes" in prune.output


def test_prune_then_eval(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    runner = CliRunner()
    result = runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--pattern", "4:8", "--eval-windows", "2",
                                  "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "4:8" in result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_nm(weight_view(model.model.layers[1].mlp.down_proj), 4, 8)

    evaluated = runner.invoke(main, ["eval", str(out), "--seqlen", "32", "--windows", "2", "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((out / "thanos_report.json").read_text())
    assert json.loads(evaluated.stdout)["perplexity"] == report["perplexity_after"]["value"]


def test_bad_options_are_one_clear_line(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--pattern", "2:4", "--sparsity", "0.3",
                                  "--out", str(tmp_path / "o"), *SMALL])
    assert result.exit_code == 1
    assert "Error: pattern 2:4 fixes the sparsity at 0.5" in result.output
    assert "Traceback" not in result.output
    missing = runner.invoke(main, ["prune", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *SMALL])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    # a window of one token predicts nothing (its perplexity divided by zero)
    for flag, value in (("--calib-samples", "0"), ("--seqlen", "1"), ("--eval-windows", "-1")):
        refused = runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *SMALL,
                                       flag, value])
        assert refused.exit_code == 2 and flag in refused.output, refused.output  # click's usage error


def test_inspect_table_and_json(tmp_path, tiny_llama_dir):
    runner = CliRunner()
    out = tmp_path / "p"
    assert runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--no-eval", "--out", str(out), *SMALL]).exit_code == 0
    table = runner.invoke(main, ["inspect", str(out)])
    assert table.exit_code == 0 and "21 of 21 linear layers qualify" in table.stdout
    layers = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).stdout)
    assert len(layers) == 21 and all(l["pattern"] == "2:4" for l in layers)


@pytest.mark.onnx
def test_export_onnx_then_inspect_it(tmp_path, tiny_llama_dir):
    runner = CliRunner()
    pruned = tmp_path / "p"
    runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--no-eval", "--out", str(pruned), *SMALL])
    result = runner.invoke(main, ["export", str(pruned), "--target", "onnx", "--dtype", "float32", "--with-cache",
                                  "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "verified   largest logit difference" in result.stdout
    assert "100% of 8 greedy tokens as PyTorch" in result.stdout
    for graph in ("model.onnx", "model_with_cache.onnx"):
        inspected = runner.invoke(main, ["inspect", str(tmp_path / "onnx" / graph)])
        assert "21 of" in inspected.stdout


def test_prune_and_build_refuses_4of8_for_tensorrt_before_pruning(tmp_path, tiny_llama_dir):
    result = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--pattern", "4:8",
                                       "--target", "tensorrt", "--out", str(tmp_path / "b"), *SMALL])
    assert result.exit_code == 1 and "--allow-dense" in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.onnx
def test_prune_and_build_onnx(tmp_path, tiny_llama_dir, monkeypatch):
    import runtime_bench.bench

    def no_reload(*args, **kwargs):
        raise AssertionError("the bench read the pruned model back from disk")

    monkeypatch.setattr(runtime_bench.bench, "_load_target", no_reload)  # it has the model in memory
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "auto",
                                       "--dtype", "float32", "--eval-windows", "1", "--bench", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["target"] == "onnx"  # no GPU + TensorRT here
    assert (out / "onnx" / "model.onnx").is_file() and (out / "pruned" / "thanos_report.json").is_file()
    assert summary["export_summary"]["validation"]["max_abs_diff"] <= summary["export_summary"]["validation"]["tolerance"]
    bench = json.loads((out / "bench" / "report.json").read_text())
    assert any(r["status"] == "ok" and r["level"] == "gemm" for r in bench["results"])
    assert any(r["status"] == "ok" and r["level"] == "model" and r["backend"] == "torch-dense" for r in bench["results"])


@pytest.mark.parametrize("quantized", [False, True])
def test_genai_generation_line_says_checked_or_compared_and_the_speed(quantized, capsys):
    """The 8-bit graph's tokens are compared, not checked (its linears are); tokens/s is the runtime's own."""
    from cli import echo_export_summary

    prompts = [dict(prompt_tokens=n, new_tokens=32, first_divergence=None,
                    genai_tokens_per_s=rate) for n, rate in [(16, 1.46), (64, 1.52)]]
    generation = dict(runtime="onnxruntime-genai 0.18.0 (cpu)", prompts=prompts, identical=True, first_divergence=None)
    if quantized:
        generation["quantized_linears"] = dict(linears=21, inputs_checked=10, inputs_on_a_rounding_boundary=0,
                                               largest_error_over_bound=0.01)
    for export_dtype in ("float16", "float32"):
        echo_export_summary(dict(format="genai", onnx="g/model.onnx", generation=generation,
                                 dtype=dict(source="float32", export=export_dtype),
                                 quantization=dict(format="int8", linears=21, opset=19, activation_quantizers=21,
                                                   largest_scale_rounding=0.0) if quantized else None))
        shown = capsys.readouterr().out.splitlines()
        line = next(l for l in shown if "onnxruntime-genai" in l)
        assert line.startswith("compared " if quantized else "verified ")
        assert "1.5-1.5 tokens/s" in line and ("not a pass/fail check" in line) == quantized
        # INT8 in a float16 graph has no 8-bit kernel on onnxruntime's CPU provider: the line says what does
        assert any("export with --dtype float32" in l for l in shown) == (quantized and export_dtype == "float16")
    echo_export_summary(dict(format="genai", dtype=dict(source="float32", export="float32", default="INT8 in a GenAI folder")))
    assert "dtype      float32, the default for INT8 in a GenAI folder" in capsys.readouterr().out


@pytest.mark.parametrize("target, keeps", [("genai", "float32"), ("onnx", "float32"), ("torch", "bfloat16"),
                                           ("tensorrt", "bfloat16")])
def test_a_cast_names_a_dtype_the_target_has_that_keeps_the_values(target, keeps, capsys):
    """bfloat16 weights cast to float16: the ONNX targets have no bfloat16, float32 holds every bfloat16 value."""
    from cli import echo_export_summary

    echo_export_summary(dict(format=target, dtype=dict(source="bfloat16", export="float16")))
    assert f"cast       weights bfloat16 -> float16 (--dtype {keeps} keeps their values)" in capsys.readouterr().out
    # an 8-bit model's values are its 8-bit ones: every dtype keeps them (each weight dequantized anew)
    echo_export_summary(dict(format=target, dtype=dict(source="bfloat16", export="float16"),
                             quantization=dict(format="fp8", linears=21, opset=19, activation_quantizers=21,
                                               largest_scale_rounding=0.0)))
    assert ("cast       weights bfloat16 -> float16: their 8-bit values and scales kept, each dequantized anew in "
            "float16") in capsys.readouterr().out


def test_prune_and_build_refuses_an_option_of_another_target_before_pruning(tmp_path, tiny_llama_dir):
    result = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "safetensors",
                                       "--with-cache", "--out", str(tmp_path / "b"), *SMALL])
    assert result.exit_code == 1 and "--with-cache applies to the onnx / tensorrt targets" in result.output
    assert not (tmp_path / "b" / "pruned").exists()


@pytest.mark.parametrize("opset", ["5", "99"])
def test_an_opset_the_exporter_cannot_write_is_refused_before_pruning(tmp_path, tiny_llama_dir, opset):
    """torch's exporter failed deep inside the trace (opset 5: arange; 99: unsupported) after the pruning."""
    result = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "onnx",
                                       "--opset", opset, "--out", str(tmp_path / "b"), *SMALL])
    assert result.exit_code == 1 and f"--opset {opset} is outside what the export can write here: 14 to" in result.output
    assert not (tmp_path / "b" / "pruned").exists()


def test_own_errors_are_one_line_and_everything_else_keeps_its_traceback(monkeypatch, tmp_path):
    import thanos.pipeline
    from thanos.errors import InputError

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(thanos.pipeline, "prune_to_directory", out_of_memory)
    crashed = CliRunner().invoke(main, ["prune", "--out", str(tmp_path / "o"), *SMALL])
    assert isinstance(crashed.exception, RuntimeError)  # not turned into a one-line "Error:"
    assert "Error: CUDA out of memory" not in crashed.output

    def bad_input(*args, **kwargs):
        raise InputError("the thing is wrong; pass the right thing")

    monkeypatch.setattr(thanos.pipeline, "prune_to_directory", bad_input)
    refused = CliRunner().invoke(main, ["prune", "--out", str(tmp_path / "o"), *SMALL])
    assert refused.exit_code == 1 and refused.output == "Error: the thing is wrong; pass the right thing\n"


def test_progress_redirected_to_a_file_is_plain_lines(tiny_llama_dir, tmp_path):
    runner = CliRunner()  # its stderr is not a terminal, as with `2> log`
    args = ["prune", "--model", str(tiny_llama_dir), "--no-eval", "--out", str(tmp_path / "p"),
            *[a for a in SMALL if a != "--quiet"]]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.stderr and "layer 3/3 done" in result.stderr


def test_impossible_numbers_and_patterns_are_one_clear_line(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    base = ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *SMALL]
    for value in ("nan", "inf", "-1"):
        refused = runner.invoke(main, [*base, "--damp", value])
        assert refused.exit_code == 1 and "damp must be a positive finite number" in refused.output, refused.output
    for pattern, expected in (("4:4", "for example '2:4'"), ("2:0", "for example '2:4'"), ("4:2", "did you mean '2:4'")):
        refused = runner.invoke(main, [*base, "--pattern", pattern])
        assert refused.exit_code == 1 and expected in refused.output, refused.output
        assert "did you mean '4:4'" not in refused.output and "'0:2'" not in refused.output
    folder = tmp_path / "texts"
    folder.mkdir()
    refused = runner.invoke(main, [*base, "--calib-file", str(folder)])
    assert refused.exit_code == 1 and "is a directory" in refused.output, refused.output
    assert not (tmp_path / "o").exists()


def test_eval_refuses_windows_past_the_context(pruned_llama_2of4):
    refused = CliRunner().invoke(main, ["eval", str(pruned_llama_2of4), "--seqlen", "4096", "--device", "cpu"])
    assert refused.exit_code == 1 and "context of 256 tokens" in refused.output and "--seqlen 256" in refused.output


def test_default_windows_are_cut_to_the_context(pruned_llama_2of4):
    # the CPU's default of 512 tokens against this model's 256: cut, not refused (only --seqlen is refused)
    result = CliRunner().invoke(main, ["eval", str(pruned_llama_2of4), "--windows", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["seqlen"] == 256


def test_generate_refuses_an_empty_prompt_and_a_missing_gpu(pruned_llama_2of4):
    import torch

    runner = CliRunner()
    for prompt in ("", "   "):
        refused = runner.invoke(main, ["generate", str(pruned_llama_2of4), "--prompt", prompt])
        assert refused.exit_code == 1 and "--prompt is empty" in refused.output, refused.output
    if not torch.cuda.is_available():
        refused = runner.invoke(main, ["generate", str(pruned_llama_2of4), "--prompt", "x", "--device", "cuda"])
        assert refused.exit_code == 1 and "torch sees no CUDA GPU" in refused.output, refused.output
        assert "Traceback" not in refused.output


def test_sigterm_during_prune_says_what_is_kept_and_the_rerun_resumes(tiny_llama_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "p"
    command = [sys.executable, "-m", "cli", "prune", "--model", str(tiny_llama_dir), "--out", str(out), "--no-eval",
               "--calib-samples", "32", "--seqlen", "128", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    run = subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in run.stderr:  # plain progress lines: stderr is a pipe
        if line.startswith("layer 1/3 done"):
            run.send_signal(signal.SIGTERM)
            break
    stderr = run.stderr.read()
    assert run.wait(timeout=120) == 128 + signal.SIGTERM, stderr
    assert "Stopped (SIGTERM)" in stderr and "run the same command again to resume" in stderr, stderr
    assert str(out / ".thanos_partial") in stderr and "Traceback" not in stderr
    assert subprocess.run(command, cwd=root, env=env, capture_output=True).returncode == 0
    assert (out / "thanos_report.json").is_file()


def _remote_code_model(source, folder, marker):
    """A copy of `source` that only its own Python code can load; the code leaves `marker` when it runs."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tiny_custom"
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_llama.py").write_text(
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):  # a family the pruner knows, behind a type only this code loads\n"
        "    model_type = 'llama'\n\n"
        "    def __init__(self, **kwargs):\n        kwargs.pop('model_type', None)\n        super().__init__(**kwargs)\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return folder


def test_every_command_that_loads_a_model_takes_trust_remote_code(tiny_llama_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = _remote_code_model(tiny_llama_dir, tmp_path / "custom", marker)
    runner = CliRunner()
    commands = {
        "prune": ["prune", "--model", str(folder), "--out", str(tmp_path / "p"), *SMALL, "--no-eval"],
        "prune-and-build": ["prune-and-build", "--model", str(folder), "--target", "safetensors",
                            "--out", str(tmp_path / "b"), *SMALL, "--no-eval"],
        "eval": ["eval", str(folder), "--device", "cpu", "--seqlen", "32", "--windows", "1"],
        "export": ["export", str(folder), "--target", "safetensors", "--out", str(tmp_path / "e")],
        "generate": ["generate", str(folder), "--prompt", "def", "--max-new-tokens", "2"],
        "inspect": ["inspect", str(folder)],
    }
    for name, args in commands.items():
        refused = runner.invoke(main, args)
        assert refused.exit_code == 1 and "pass --trust-remote-code" in refused.output, (name, refused.output)
        assert "hf.co" not in refused.output and "truncated" not in refused.output, (name, refused.output)
        assert not marker.exists(), name
    for name, args in commands.items():
        allowed = runner.invoke(main, [*args, "--trust-remote-code"])
        assert allowed.exit_code == 0, (name, allowed.output)
    assert marker.exists()
    assert (tmp_path / "b" / "build_summary.json").is_file() and (tmp_path / "e" / "export_summary.json").is_file()


def test_a_report_repeats_its_run_with_recipe(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    first = tmp_path / "first"
    args = ["prune", "--model", str(tiny_llama_dir), "--no-eval", *SMALL]
    done = runner.invoke(main, [*args, "--preset", "best", "--refit-iterations", "3", "--reconstruct-target", "dense",
                                "--out", str(first)])
    assert done.exit_code == 0, done.output
    assert "preset best: channels permuted, block 32, mask search 30, refit 3, reconstruction 2 x towards the " \
           "dense target" in done.output
    again = runner.invoke(main, [*args, "--recipe", str(first / "thanos_report.json"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    reports = [json.loads((tmp_path / name / "thanos_report.json").read_text()) for name in ("first", "again")]
    assert reports[0]["recipe"] == reports[1]["recipe"] and reports[0]["config"] == reports[1]["config"]
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict() for name in ("first", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one process, one thread count
    changed = runner.invoke(main, [*args, "--recipe", str(first / "thanos_report.json"), "--refit-iterations", "4",
                                   "--out", str(tmp_path / "changed")])
    assert changed.exit_code == 0 and "refit 4" in changed.output
    both = runner.invoke(main, [*args, "--recipe", str(first / "thanos_report.json"), "--preset", "fast",
                                "--out", str(tmp_path / "both")])
    assert both.exit_code == 2 and "--preset and --recipe" in both.output
    for refused, message in ((["--method", "wanda", "--preset", "best"], "presets are Thanos recipes"),
                             (["--reconstruct-target", "dense"], "applies to the reconstruction")):
        result = runner.invoke(main, [*args, *refused, "--out", str(tmp_path / "refused")])
        assert result.exit_code == 1 and message in result.output, result.output


def test_tensorrt_summary_says_what_the_engine_gave(capsys):
    from cli import echo_export_summary

    echo_export_summary(dict(format="tensorrt", onnx="e/model.onnx", eligible=["a", "b"], sparse_implementation=["a"],
                             engine_check=dict(prompts=2, tokens=40, max_abs_diff=0.0123, top_token_agrees=0.975,
                                               onnx_bound=0.21)))
    out = capsys.readouterr().out
    assert "tensorrt   2 layers eligible for sparse math, 1 given a sparse kernel" in out
    assert ("compared   the engine on 2 prompts: largest logit difference 0.0123 from PyTorch (the ONNX check's "
            "bound 0.21), top token the same at 98% of positions") in out


@pytest.mark.parametrize("exact", [True, False])
def test_a_portable_int8_genai_folder_points_to_fused_int8_where_this_cpu_has_it(exact, monkeypatch, capsys):
    import exporters.onnx_qdq
    from cli import echo_export_summary

    monkeypatch.setattr(exporters.onnx_qdq, "fused_int8_is_exact", lambda: exact)
    generation = dict(runtime="onnxruntime-genai 0.18.0 (cpu)", identical=False, first_divergence=3,
                      prompts=[dict(prompt_tokens=16, new_tokens=32, first_divergence=3, genai_tokens_per_s=50.0)],
                      quantized_linears=dict(linears=21, inputs_checked=10, inputs_on_a_rounding_boundary=0,
                                             largest_error_over_bound=0.01))
    qdq = dict(format="int8", linears=21, opset=19, activation_quantizers=21, largest_scale_rounding=0.0)
    for fused in (False, True):
        echo_export_summary(dict(format="genai", onnx="g/model.onnx", generation=generation, quantization=qdq,
                                 fused_int8=fused, dtype=dict(source="float32", export="float32")))
        shown = "--fused-int8 runs them as integer kernels" in capsys.readouterr().out
        assert shown == (exact and not fused)


# per vision-language family: its class, its language linears in the tiny model (Qwen3.5's per-head
# gates stay dense), where its vision tower's tensors are
VISION_LANGUAGE = {"gemma3": ("Gemma3ForConditionalGeneration", 14, ("vision_tower", "multi_modal_projector")),
                   # its full-attention layer's keys are its values: no v_proj
                   "gemma4": ("Gemma4ForConditionalGeneration", 13, ("vision_tower", "embed_vision")),
                   "qwen3_5": ("Qwen3_5ForConditionalGeneration", 13, ("model.visual.",)),
                   "qwen3_vl": ("Qwen3VLForConditionalGeneration", 14, ("model.visual.",)),
                   # a dense first layer, then 4 experts
                   "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", 7 + 4 + 4 * 3, ("model.visual.",))}


@pytest.mark.parametrize("family", sorted(VISION_LANGUAGE))
def test_a_vision_language_checkpoint_prunes_its_language_model_and_keeps_its_vision_tower(family, tmp_path,
                                                                                          tmp_path_factory,
                                                                                          tiny_tokenizer_dir):
    """Gemma 3 from 4B up and Qwen3.5 ship a vision tower beside the language model: the language
    model's linears are pruned (INT8 included), the vision tower is left bit for bit, the directory
    loads as the same multimodal model (Qwen3.5's tower was dropped by AutoModelForCausalLM, without a
    word), the compact checkpoint carries it whole; the ONNX-based targets, which export text-only
    models, are refused before any work (prune-and-build: before pruning)."""
    from safetensors.torch import load_file

    from tests.conftest import _save_tiny
    from thanos.model_config import auto_class
    from thanos.models import LayerSelection, load_model, prunable_linears

    kind, count, tower = VISION_LANGUAGE[family]
    source = _save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)
    runner = CliRunner()
    out = tmp_path / "p"
    pruned = runner.invoke(main, ["prune", "--model", str(source), "--pattern", "2:4", "--quantize", "int8",
                                  "--out", str(out), *SMALL])
    assert pruned.exit_code == 0, pruned.output
    assert type(auto_class(json.loads((out / "config.json").read_text())).from_pretrained(out)).__name__ == kind
    model, _ = load_model(str(out))  # experts as linears of their own, as pruning sees them
    linears = [m for layer in prunable_linears(model, LayerSelection()).values() for m in layer.values()]
    assert len(linears) == count
    for linear in linears:
        assert_nm(weight_view(linear), 2, 4)
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [name for name in before if any(part in name for part in tower)]
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    # Gemma 3's files name the language model's tensors as older transformers did ("language_model.model.layers...")
    inspected = runner.invoke(main, ["inspect", str(out)])
    assert inspected.exit_code == 0 and f"{count} of {count} linear layers qualify" in inspected.output, \
        inspected.output
    planned = runner.invoke(main, ["plan", "--config", str(out), "--count-only"])  # the language model's layer
    assert planned.exit_code == 0 and "| mlp.down_proj | 64 x 128 |" in planned.output, planned.output
    _compact_evaluates(runner, out, tmp_path / "c")
    _graph_targets_refused(runner, source, out, tmp_path, "vision-language checkpoint")


def test_linear_attention_layers_prune_but_keep_their_head_gates_and_refuse_the_graph_targets(tmp_path, tmp_path_factory,
                                                                                               tiny_tokenizer_dir):
    """Qwen3.5's Gated DeltaNet layers: their projections are pruned, the two that give each value head
    its decay and write strength (one row per head) stay as they were, and the ONNX-based targets,
    whose graphs carry a KV cache and no recurrent state, are refused before any work."""
    from safetensors.torch import load_file

    runner, out = CliRunner(), tmp_path / "p"
    source, names = _pruned_tiny("qwen3_5_text", tmp_path_factory, tiny_tokenizer_dir, out)
    assert "model.layers.0.linear_attn.in_proj_qkv" in names and "model.layers.1.self_attn.q_proj" in names
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    gates = [name for name in before if name.endswith(("in_proj_a.weight", "in_proj_b.weight"))]
    assert gates and not any(name[:-len(".weight")] in names for name in gates)
    assert all(torch.equal(before[name], after[name]) for name in gates)
    _graph_targets_refused(runner, source, out, tmp_path, "linear-attention, Mamba or convolution layers")


def _pruned_tiny(family: str, tmp_path_factory, tokenizer_dir, out) -> tuple:
    """A tiny `family` model pruned 2:4 from the command line into `out`: (its source, the linears the
    report lists)."""
    from tests.conftest import _save_tiny

    source = _save_tiny(family, tmp_path_factory, tokenizer_dir)
    pruned = CliRunner().invoke(main, ["prune", "--model", str(source), "--pattern", "2:4", "--out", str(out), *SMALL])
    assert pruned.exit_code == 0, pruned.output
    return source, [layer["name"] for layer in json.loads((out / "thanos_report.json").read_text())["layers"]]


def _compact_evaluates(runner, pruned, out) -> None:
    """The compact export of `pruned` reloads bit-exact, and evaluates."""
    compact = runner.invoke(main, ["export", str(pruned), "--target", "safetensors", "--out", str(out)])
    assert compact.exit_code == 0 and "round trip bit-exact" in compact.output, compact.output
    evaluated = runner.invoke(main, ["eval", str(out), "--seqlen", "32", "--windows", "1", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output


def _graph_targets_refused(runner, source, pruned, tmp_path, reason: str) -> None:
    """The ONNX-based targets refuse the model for `reason`, before any work: export writes nothing,
    prune-and-build stops before pruning."""
    refused = runner.invoke(main, ["export", str(pruned), "--target", "onnx", "--out", str(tmp_path / "o")])
    assert refused.exit_code == 1 and reason in refused.output and "--target safetensors" in refused.output, \
        refused.output
    assert not (tmp_path / "o").exists()
    build = runner.invoke(main, ["prune-and-build", "--model", str(source), "--target", "genai", "--out",
                                 str(tmp_path / "b"), *SMALL])
    assert build.exit_code == 1 and reason in build.output and not (tmp_path / "b").exists()


def test_gemma4_prunes_every_kind_of_layer_and_refuses_the_graph_targets(tmp_path, tmp_path_factory,
                                                                          tiny_tokenizer_dir):
    """Gemma 4: a sliding layer, then a full-attention one with heads twice as wide whose keys are its
    values (no v_proj), each pruned 2:4 and timed by the plan as a kind of its own; the ONNX-based
    targets (one head size for all layers in their KV cache) are refused before any work. The
    configurations of its small releases (per-layer inputs, shared keys and values) prune too."""
    from tests.conftest import _save_tiny

    runner, out = CliRunner(), tmp_path / "p"
    source, names = _pruned_tiny("gemma4_text", tmp_path_factory, tiny_tokenizer_dir, out)
    report = {layer["name"]: layer for layer in json.loads((out / "thanos_report.json").read_text())["layers"]}
    assert "model.layers.0.self_attn.v_proj" in report and "model.layers.1.self_attn.v_proj" not in report
    assert report["model.layers.0.self_attn.q_proj"]["shape"] == [64, 64]
    assert report["model.layers.1.self_attn.q_proj"]["shape"] == [128, 64]
    assert all(layer["sparsity"] == 0.5 for layer in report.values())
    # o_proj's channels reordered with v_proj's rows, within the sliding layer's heads; none to move with
    # in the full layer
    assert "permutation" in report["model.layers.0.self_attn.o_proj"]
    assert "permutation" not in report["model.layers.1.self_attn.o_proj"]
    planned = runner.invoke(main, ["plan", "--config", str(out), "--count-only"])
    assert planned.exit_code == 0 and "2 decoder layers: 1 sliding attention, 1 full attention" in planned.output, \
        planned.output
    _compact_evaluates(runner, out, tmp_path / "c")
    _graph_targets_refused(runner, source, out, tmp_path, "differ in their attention's shape")
    # as its small releases: each layer reads its own embedding of the tokens through two more linears,
    # and the last layer reuses the keys and values of the one before it (no k_proj, v_proj of its own)
    _, names = _pruned_tiny("gemma4_text_ple", tmp_path_factory, tiny_tokenizer_dir, tmp_path / "ple")
    assert {"model.layers.0.per_layer_input_gate", "model.layers.1.per_layer_projection"} <= set(names)
    assert [name.rsplit(".", 1)[1] for name in names if name.startswith("model.layers.1.self_attn")] == \
        ["q_proj", "o_proj"]
    _compact_evaluates(runner, tmp_path / "ple", tmp_path / "ple_c")


def test_a_mixture_of_experts_prunes_each_expert_and_goes_to_the_targets_that_carry_it(tmp_path, tmp_path_factory,
                                                                                    tiny_tokenizer_dir):
    """Mixtral from the command line: every expert's projections in the report, the compact checkpoint
    bit-exact and evaluated, the ONNX-based targets refused before any work; FP8 too."""
    runner, out = CliRunner(), tmp_path / "p"
    source, names = _pruned_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir, out)
    assert len(names) == 2 * (4 + 4 * 3) and "model.layers.1.mlp.experts.3.down_proj" in names
    inspected = runner.invoke(main, ["inspect", str(out)])  # Mixtral's files name its experts w1/w2/w3
    assert inspected.exit_code == 0 and "32 of 32 linear layers qualify" in inspected.output, inspected.output
    _compact_evaluates(runner, out, tmp_path / "c")
    _graph_targets_refused(runner, source, out, tmp_path, "mixture-of-experts model")
    quantized = runner.invoke(main, ["prune", "--model", str(source), "--quantize", "fp8", "--out", str(tmp_path / "q"),
                                     *SMALL])
    assert quantized.exit_code == 0, quantized.output
    inspected = runner.invoke(main, ["inspect", str(tmp_path / "q")])
    assert inspected.exit_code == 0 and "32 of 32 linear layers qualify" in inspected.output, inspected.output


@pytest.mark.parametrize("family", ["qwen3_5_text", "minimax", "mixtral"])
def test_generate_decodes_hybrid_and_expert_models_in_the_cache_they_build(family, tmp_path_factory,
                                                                           tiny_tokenizer_dir):
    """`generate` on transformers takes the cache each model builds on its first call (MiniMax refuses
    any other class; linear-attention layers keep their states in it): greedy tokens as transformers'
    own generate gives them."""
    from transformers import AutoTokenizer

    from runtime_bench.generate import generate_text
    from tests.conftest import _save_tiny
    from thanos.models import load_model

    source = _save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)
    generated = generate_text(str(source), "The import statement", 6)
    model, _ = load_model(str(source))
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer("The import statement", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert generated.text == tokenizer.decode(expected, skip_special_tokens=True)
