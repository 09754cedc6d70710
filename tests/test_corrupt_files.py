"""Every kind of file the tool reads, damaged: one line that names the file and the fix, no traceback."""
import json
import pickle
import shutil

import pytest
from click.testing import CliRunner

from cli import main

SMALL = ["--calib-samples", "2", "--seqlen", "32", "--device", "cpu", "--quiet", "--no-eval"]


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture
def truncated_model(tmp_path, pruned_llama_2of4):
    folder = tmp_path / "truncated"
    shutil.copytree(pruned_llama_2of4, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_a_truncated_safetensors_file_is_named_on_every_command(truncated_model, tmp_path):
    runner = CliRunner()
    _one_line_error(runner.invoke(main, ["inspect", str(truncated_model)]), "model.safetensors", "truncated")
    _one_line_error(runner.invoke(main, ["eval", str(truncated_model), "--device", "cpu"]), str(truncated_model),
                    "truncated")
    _one_line_error(runner.invoke(main, ["prune", "--model", str(truncated_model), "--out", str(tmp_path / "o"),
                                         *SMALL]), str(truncated_model))
    _one_line_error(runner.invoke(main, ["export", str(truncated_model), "--target", "safetensors", "--out",
                                         str(tmp_path / "e")]), str(truncated_model))
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_a_pickle_checkpoint_is_refused_with_a_message(tmp_path, pruned_llama_2of4):
    folder = tmp_path / "pickled"
    shutil.copytree(pruned_llama_2of4, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    _one_line_error(CliRunner().invoke(main, ["eval", str(folder), "--device", "cpu"]), str(folder))


@pytest.mark.onnx
def test_junk_onnx_is_named(tmp_path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf" * 10)
    _one_line_error(CliRunner().invoke(main, ["inspect", str(junk)]), str(junk), "export it again")


def _interrupted_run(tiny_llama_dir, out):
    from thanos.pipeline import PruneJob, prune_to_directory

    class Killed(Exception):
        pass

    def die(stage, done, total):
        if stage == "layers" and done == 2:
            raise Killed

    with pytest.raises(Killed):
        prune_to_directory(PruneJob(out=str(out), model=str(tiny_llama_dir), evaluate=False, calib_samples=2,
                                    seqlen=32, device="cpu"), progress=die)
    return out / ".thanos_partial"


def test_a_damaged_saved_layer_names_the_file_to_delete(tiny_llama_dir, tmp_path):
    partial = _interrupted_run(tiny_llama_dir, tmp_path / "run")
    layer = partial / "layer_00001.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])
    result = CliRunner().invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "run"),
                                       *SMALL])
    _one_line_error(result, "layer_00001.safetensors", "delete that file")
    layer.unlink()  # the advice works: the rerun prunes that layer again and finishes
    again = CliRunner().invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "run"), *SMALL])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run" / "thanos_report.json").read_text())["sparsity"] > 0.4


def test_an_empty_run_file_says_how_to_start_over(tiny_llama_dir, tmp_path):
    partial = _interrupted_run(tiny_llama_dir, tmp_path / "run")
    (partial / "run.json").write_text("")
    result = CliRunner().invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "run"),
                                       *SMALL])
    _one_line_error(result, "run.json", "start the run over")


def _edited_copy(source, folder, **config_changes):
    shutil.copytree(source, folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return folder


@pytest.mark.parametrize("changes, fragments", [
    (dict(num_hidden_layers=4), ("lack", "model.layers.3.")),  # transformers would make layer 3 random
    (dict(num_hidden_layers=2), ("hold", "model.layers.2.")),  # ... or drop layer 2
    (dict(intermediate_size=96), ("mlp.down_proj.weight is 64x128 in the weight files", "makes it 64x96")),
], ids=["missing-layer", "extra-layer", "intermediate-size"])
def test_weights_that_do_not_match_the_config_are_refused_by_name(tiny_llama_dir, tmp_path, changes, fragments):
    import transformers

    if "intermediate_size" in changes and int(transformers.__version__.split(".")[0]) < 5:
        fragments = ("mlp.down_proj.weight has another shape in the weight files",)  # 4.x gives no shapes
    folder = _edited_copy(tiny_llama_dir, tmp_path / "edited", **changes)
    runner = CliRunner()
    _one_line_error(runner.invoke(main, ["prune", "--model", str(folder), "--out", str(tmp_path / "o"), *SMALL]),
                    str(folder), "config.json", *fragments)
    _one_line_error(runner.invoke(main, ["eval", str(folder), "--device", "cpu"]), *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mismatched", [
    [("model.layers.0.mlp.up_proj.weight", (128, 64), (96, 64)), ("model.layers.0.mlp.down_proj.weight", (64, 128), (64, 96))],
    ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"],  # transformers 4.x: names only
], ids=["transformers-5", "transformers-4"])
def test_mismatched_sizes_are_named_in_either_transformers_form(mismatched, tmp_path):
    from thanos.models import ModelError, _check_loading_info

    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.down_proj\.weight .*\(1 more tensors differ\); "
                                         r"config\.json does not match"):
        _check_loading_info(tmp_path, {"mismatched_keys": mismatched})


def test_nan_in_the_source_weights_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(tiny_llama_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    weights["model.layers.1.mlp.up_proj.weight"][4, 5] = float("inf")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for preset in ("fast", "default"):
        _one_line_error(CliRunner().invoke(main, ["prune", "--model", str(folder), "--preset", preset, "--out",
                                                  str(tmp_path / "o"), *SMALL]),
                        "model.layers.1.mlp.up_proj.weight holds 2 NaN or infinite values", "source model")


def test_running_out_of_memory_while_loading_is_not_called_a_damaged_file(pruned_llama_2of4, monkeypatch):
    import torch
    import transformers

    from thanos.models import load_model

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # its own message and traceback, not "download it again"
        load_model(str(pruned_llama_2of4))
