"""Nothing the user has is lost: outputs never replace their inputs, and --overwrite waits for success."""
import json
import shutil

from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from cli import main
from exporters import ExportOptions, export

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--device", "cpu", "--quiet", "--no-eval"]


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prune_refuses_an_output_that_is_or_holds_the_input_model(tiny_llama_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    before = _files(model)
    runner = CliRunner()
    for out in (model, tmp_path, model / "inner"):
        result = runner.invoke(main, ["prune", "--model", str(model), "--out", str(out), "--overwrite", *SMALL])
        assert result.exit_code == 1, result.output
        assert "the input" in result.output and "Traceback" not in result.output
    assert _files(model) == before


def test_failed_overwrite_keeps_the_finished_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    runner = CliRunner()
    assert runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), *SMALL]).exit_code == 0
    before = _files(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    failed = runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), "--overwrite",
                                  "--calib-file", str(empty), *SMALL])
    assert failed.exit_code == 1 and "holds no text" in failed.output
    assert _files(out) == before
    replaced = runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), "--overwrite",
                                    "--pattern", "4:8", *SMALL])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "thanos_report.json").read_text())["config"]["pattern"] == "4:8"
    assert not list(tmp_path.glob(".pruned.*")), "staging or replaced folders left behind"


def test_export_refuses_to_write_into_its_source_or_a_foreign_folder(pruned_llama_2of4, tmp_path):
    before = _files(pruned_llama_2of4)
    runner = CliRunner()
    into_source = runner.invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors",
                                       "--out", str(pruned_llama_2of4)])
    assert into_source.exit_code == 1 and "is the input" in into_source.output
    assert "Traceback" not in into_source.output
    assert _files(pruned_llama_2of4) == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    refused = runner.invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(foreign)])
    assert refused.exit_code == 1 and "not empty" in refused.output
    assert _files(foreign) == {foreign.relative_to(foreign) / "mine.txt": b"keep me"}


def test_export_replaces_an_earlier_export_only_with_overwrite(pruned_llama_2of4, tmp_path):
    out = tmp_path / "compact"
    export("safetensors", pruned_llama_2of4, out, ExportOptions(dtype="float16"))
    again = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    replaced = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(out),
                                         "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "export_summary.json").read_text())["dtype"]["export"] == "float32"


def test_a_refused_export_leaves_no_folder(pruned_llama_4of8, tmp_path):
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["export", str(pruned_llama_4of8), "--target", "tensorrt", "--out", str(out)])
    assert result.exit_code == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_compact_export_keeps_the_source_dtype_by_default(pruned_llama_2of4, tmp_path):
    out = tmp_path / "compact"
    result = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cast" not in result.output
    source = AutoModelForCausalLM.from_pretrained(pruned_llama_2of4).state_dict()
    from exporters import load_compact

    reloaded = load_compact(out).state_dict()
    assert all(reloaded[k].dtype == v.dtype and (reloaded[k] == v).all() for k, v in source.items())


def test_onnx_export_reports_its_cast(pruned_llama_2of4, tmp_path):
    result = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "onnx", "--out",
                                       str(tmp_path / "onnx"), "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "cast       weights float32 -> float16" in result.output


def test_inspect_never_runs_a_folders_code(tmp_path, pruned_llama_2of4):
    folder = tmp_path / "remote"
    shutil.copytree(pruned_llama_2of4, folder)
    config = json.loads((folder / "config.json").read_text())
    # An architecture transformers does not know, so only the folder's code could load it.
    config["model_type"] = "evil_arch"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n")
    runner = CliRunner()
    for command in (["inspect", str(folder)], ["eval", str(folder), "--device", "cpu"],
                    ["export", str(folder), "--target", "safetensors", "--out", str(tmp_path / "e")]):
        result = runner.invoke(main, command, input="y\ny\n")  # a user who would answer yes to a prompt
        assert not marker.exists(), command
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
