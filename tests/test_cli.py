import json

from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from cli import main
from thanos.models import weight_view
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
    for flag, value in (("--calib-samples", "0"), ("--seqlen", "0"), ("--eval-windows", "-1")):
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


def test_prune_and_build_onnx(tmp_path, tiny_llama_dir):
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


def test_prune_and_build_refuses_an_option_of_another_target_before_pruning(tmp_path, tiny_llama_dir):
    result = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "safetensors",
                                       "--with-cache", "--out", str(tmp_path / "b"), *SMALL])
    assert result.exit_code == 1 and "--with-cache applies to the onnx / tensorrt targets" in result.output
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
