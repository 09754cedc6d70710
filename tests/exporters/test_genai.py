"""`--target genai`: folders that ONNX Runtime GenAI loads and generates the same tokens from."""
import json
import shutil

import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (the onnx extra)")
pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the genai extra)")

from exporters import ExportOptions, export  # noqa: E402
from exporters.genai import (GenaiModel, _tokenizer_hint, check_genai_folder, first_divergence,  # noqa: E402
                             transformers_greedy, verification_prompts)
from exporters.source import load_pruned  # noqa: E402
from tests.conftest import FAMILIES, TRACED_FAMILIES  # noqa: E402
from thanos.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def genai_folder(tmp_path_factory, pruned_llama_2of4):
    out = tmp_path_factory.mktemp("genai") / "fp32"
    summary = export("genai", pruned_llama_2of4, out, ExportOptions(dtype="float32"))
    return out, summary


def test_genai_generates_transformers_greedy_tokens(genai_folder, pruned_llama_2of4):
    out, summary = genai_folder
    generation = summary["generation"]
    assert generation["identical"] and len(generation["prompts"]) == 3
    assert all(p["new_tokens"] == 32 for p in generation["prompts"])
    assert summary["layers_with_nm_pattern"] == 3 * 7  # every pruned linear is 2:4 in the graph's initializers
    # The same check, independently of the export's own: a fresh runtime on the written folder.
    model, tokenizer, _ = load_pruned(pruned_llama_2of4, "float32")
    runtime = GenaiModel(out)
    for text in verification_prompts(tokenizer, model.config.max_position_embeddings)[:2]:
        ids = tokenizer(text)["input_ids"]
        assert [int(t) for t in runtime.tokenizer().encode(text)] == ids
        assert runtime.generate(ids, 16) == transformers_greedy(model, ids, 16)


def test_genai_config_describes_the_graph_and_the_model(genai_folder, pruned_llama_2of4):
    out, _ = genai_folder
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    source = json.loads((pruned_llama_2of4 / "config.json").read_text())
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"]) == \
        (source["num_hidden_layers"], source["num_attention_heads"], source["num_key_value_heads"])
    assert decoder["head_size"] * decoder["num_attention_heads"] == source["hidden_size"]
    assert config["model"]["context_length"] == source["max_position_embeddings"]
    graph = onnx.load(str(out / decoder["filename"]), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    layers = decoder["num_hidden_layers"]
    assert {"input_ids", "attention_mask", "position_ids"} <= inputs and "logits" in outputs
    assert {decoder["inputs"]["past_key_names"] % i for i in range(layers)} <= inputs
    assert {decoder["outputs"]["present_value_names"] % i for i in range(layers)} <= outputs
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"


def test_float16_export_reports_where_tokens_first_differ(pruned_llama_2of4, tmp_path):
    summary = export("genai", pruned_llama_2of4, tmp_path / "fp16", ExportOptions(dtype="float16"))
    generation = summary["generation"]
    worst = generation["first_divergence"]
    assert generation["identical"] == (worst is None)
    assert worst is None or worst >= 8
    assert summary["dtype"]["export"] == "float16"


@pytest.mark.parametrize("damage, named", [
    ("tokenizer.json", "tokenizer.json"),
    ("model.onnx", "model.onnx"),
    ("genai_config.json", "genai_config.json"),
    ("rename", "genai_config.json"),
])
def test_a_damaged_folder_names_the_file(genai_folder, tmp_path, damage, named):
    folder = tmp_path / "copy"
    shutil.copytree(genai_folder[0], folder)
    if damage == "rename":  # a config that names cache inputs the graph does not have
        path = folder / "genai_config.json"
        config = json.loads(path.read_text())
        config["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.key"
        path.write_text(json.dumps(config))
    else:
        (folder / damage).unlink()
    with pytest.raises(InputError, match=named.replace(".", r"\.")) as error:
        GenaiModel(folder)
    assert "export the folder again" in str(error.value)
    if damage == "rename":
        assert "past.0.key" in str(error.value)


def test_split_dense_rows_and_compact_checkpoints_export_too(pruned_with_outliers, pruned_llama_2of4, tmp_path):
    split = export("genai", pruned_with_outliers, tmp_path / "split", ExportOptions(dtype="float32",
                                                                                    split_dense_rows=True))
    assert split["generation"]["identical"] and split["split_rows"]
    export("safetensors", pruned_llama_2of4, tmp_path / "compact")
    compact = export("genai", tmp_path / "compact", tmp_path / "from-compact", ExportOptions(dtype="float32"))
    assert compact["generation"]["identical"] and compact["layers_with_nm_pattern"] == 3 * 7


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 5, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize("version, hinted", [("5.17.0", True), ("5.16.1", True), ("5.18.0", False), ("5.24.0", False),
                                             ("6.0.0.dev0", False)])
def test_a_tokenizer_mismatch_names_the_transformers_that_causes_it(monkeypatch, version, hinted):
    # transformers 5.16-5.17 wrote the default model's tokenizer.json so that GenAI read 50 tokens for 16 (seen here)
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert ("transformers>=5.18" in _tokenizer_hint()) == hinted


def test_check_accepts_a_folder_without_tokenizer_only_when_told(genai_folder, tmp_path):
    folder = tmp_path / "ids-only"
    shutil.copytree(genai_folder[0], folder)
    (folder / "tokenizer.json").unlink()
    assert check_genai_folder(folder, tokenizer=False)["model"]["type"] == "llama"
    with pytest.raises(InputError, match="tokenizer"):
        check_genai_folder(folder)


def test_generate_streams_text_from_every_kind_of_target(genai_folder, pruned_llama_2of4, tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from cli import main

    export("safetensors", pruned_llama_2of4, tmp_path / "compact")
    export("onnx", pruned_llama_2of4, tmp_path / "onnx", ExportOptions(dtype="float32", validate=False))
    export("onnx", pruned_llama_2of4, tmp_path / "cached", ExportOptions(dtype="float32", with_cache=True,
                                                                         validate=False))
    runner = CliRunner()
    outputs = {}
    # the ONNX exports: the full-sequence graph run again at every step, and the KV-cache graph
    for target in (genai_folder[0], pruned_llama_2of4, tmp_path / "compact", tmp_path / "onnx", tmp_path / "cached"):
        result = runner.invoke(main, ["generate", str(target), "--prompt", "The import statement",
                                      "--max-new-tokens", "12", "--compare", str(tiny_llama_dir)])
        assert result.exit_code == 0, result.output
        assert result.stdout.count("The import statement") == 2  # the pruned model's text, then the dense one's
        assert result.stderr.count("tokens/s") == 2
        outputs[target] = result.stdout.split("\n")[0]
    assert "model_with_cache.onnx through onnxruntime" in runner.invoke(
        main, ["generate", str(tmp_path / "cached"), "--prompt", "x", "--max-new-tokens", "1"]).stderr
    # Greedy: the five forms of one pruned model continue the prompt alike.
    assert len(set(outputs.values())) == 1 and len(outputs[genai_folder[0]]) > len("The import statement")
    missing = runner.invoke(main, ["generate", str(tmp_path / "nothing"), "--prompt", "x"])
    assert missing.exit_code != 0 and "does not exist" in missing.output


@pytest.mark.slow
def test_default_model_serves_from_genai(default_model_build, tmp_path):
    summary = export("genai", default_model_build / "pruned", tmp_path / "genai")  # float16, the serving default
    generation = summary["generation"]
    assert [p["prompt_tokens"] for p in generation["prompts"]][-1] > 300  # the long prompt is long
    assert generation["first_divergence"] is None or generation["first_divergence"] >= 8
    assert summary["layers_with_nm_pattern"] == 30 * 7


def test_prune_and_build_genai(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from cli import main

    result = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "genai",
                                       "--dtype", "float32", "--calib-samples", "4", "--seqlen", "32", "--device",
                                       "cpu", "--quiet", "--out", str(tmp_path / "build")])
    assert result.exit_code == 0, result.output
    assert "the same greedy tokens as transformers" in result.output
    summary = json.loads((tmp_path / "build" / "build_summary.json").read_text())
    assert summary["target"] == "genai" and summary["export_summary"]["generation"]["identical"]
    assert GenaiModel(tmp_path / "build" / "genai").config["model"]["type"] == "llama"


def test_external_data_folder_loads_and_generates(pruned_llama_2of4, tmp_path):
    from exporters.genai import write_genai_folder

    model, tokenizer, _ = load_pruned(pruned_llama_2of4, "float32")
    write_genai_folder(model, tokenizer, tmp_path, external_data_threshold=0)  # as a model past 2 GB is written
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    ids = tokenizer("The import statement")["input_ids"]
    assert GenaiModel(tmp_path).generate(ids, 8) == transformers_greedy(model, ids, 8)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../x.onnx", "../outside.onnx"])
def test_a_config_naming_a_file_outside_the_folder_is_refused_before_opening_it(genai_folder, tmp_path, monkeypatch,
                                                                              name):
    folder = tmp_path / "copy"
    shutil.copytree(genai_folder[0], folder)
    shutil.copy(folder / "model.onnx", tmp_path / "outside.onnx")  # a real graph, but not the folder's own
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["filename"] = name
    path.write_text(json.dumps(config))

    def opened(*args, **kwargs):
        raise AssertionError("a file outside the folder was opened")

    monkeypatch.setattr(onnx, "load", opened)
    with pytest.raises(InputError, match="lies outside"):
        GenaiModel(folder)



@pytest.mark.parametrize("family", TRACED_FAMILIES + ["gpt2", "opt"])
def test_every_supported_family_serves_from_genai(family, tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """Each architecture thanos.models.ADAPTERS names beyond LLaMA, pruned and exported: GenAI must
    generate transformers' tokens. The sliding-window ones (16 tokens) are checked past their window
    by the export's 64- and 216-token prompts; GenAI needs every present as long as past + new tokens.
    Families GenAI has no name for (OLMo 2, OPT) or runs another way (GPT-2) go as its generic decoder."""
    from exporters.genai import GENAI_TYPES
    from tests.conftest import _pruned, _save_tiny

    pruned = _pruned(tmp_path_factory, _save_tiny(family, tmp_path_factory, tiny_tokenizer_dir), "2:4", preset="fast")
    summary = export("genai", pruned, tmp_path / "genai", ExportOptions(dtype="float32"))
    assert summary["generation"]["identical"]
    written = json.loads((tmp_path / "genai" / "genai_config.json").read_text())["model"]["type"]
    assert written == (family if family in GENAI_TYPES else "decoder")
    assert ("crosses 56 tokens" in summary.get("note", "")) == (family == "phi3")  # longrope: said where it parts
    assert max(p["prompt_tokens"] for p in summary["generation"]["prompts"]) > FAMILIES.get(family, {}).get("sliding_window", 0)
