import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from thanos import HessianAccumulator, PruneConfig
from thanos.calibration import CalibrationError, sample_windows, tokenize_split
from thanos.checkpoint import OutputDirError
from thanos.driver import prune_model_
from thanos.models import LayerSelection, ModelError, decoder_layers, load_model, prunable_linears
from thanos.linears import weight_view
from thanos.errors import InputError
from thanos.pipeline import PruneJob, prune, prune_to_directory
from tests.conftest import FAMILIES, MOE, VISION_LANGUAGE, _save_tiny
from tests.thanos.helpers import assert_nm

EPS = torch.finfo(torch.float32).eps

SMALL = dict(calib_samples=4, seqlen=32, eval_windows=2, device="cpu")


def pruned_weights(model):
    return {name: weight_view(mod).clone() for layer in prunable_linears(model, LayerSelection()).values()
            for name, mod in layer.items()}


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_driver_prunes_every_family(request, fixture, pattern):
    model, tokenizer = load_model(str(request.getfixturevalue(fixture)))
    before = {n: w.shape for n, w in pruned_weights(model).items()}
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    reports = prune_model_(model, samples, PruneConfig(pattern=pattern, sparsity=0.5 if pattern != "2:4" else None))
    after = pruned_weights(model)
    assert {n: w.shape for n, w in after.items()} == before
    assert [r["name"] for r in reports] == list(after)
    for name, weight in after.items():
        if pattern == "2:4":
            assert_nm(weight, 2, 4)  # along the input (K) dimension, Conv1D transposes included
        else:
            assert int((weight == 0).sum()) == weight.numel() // 2, name
    assert all(r["error"] is not None and r["error"] < 1 for r in reports)
    assert torch.isfinite(model(samples[:1]).logits).all()


def test_selection_leaves_excluded_layers_dense(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    dense_before = weight_view(model.model.layers[0].self_attn.q_proj).clone()
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    reports = prune_model_(model, samples, PruneConfig(), selection=LayerSelection(exclude=("*.self_attn.*",)))
    assert all(".mlp." in r["name"] for r in reports)
    assert torch.equal(weight_view(model.model.layers[0].self_attn.q_proj), dense_before)


def test_prune_to_directory_loads_with_transformers(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    report = prune_to_directory(PruneJob(out=str(out), model=str(tiny_llama_dir), **SMALL))
    model = AutoModelForCausalLM.from_pretrained(out)
    for weight in pruned_weights(model).values():
        assert_nm(weight, 2, 4)
    on_disk = json.loads((out / "thanos_report.json").read_text())
    assert on_disk["config"]["pattern"] == "2:4"
    assert on_disk["sparsity"] == pytest.approx(0.5)
    assert len(on_disk["layers"]) == 3 * 7
    assert on_disk["perplexity_after"]["value"] > 1 and on_disk["perplexity_before"]["windows"] == 2
    assert {"torch", "transformers", "python"} <= set(on_disk["versions"])
    assert not (out / ".thanos_partial").exists()
    assert report["calibration"]["samples"] == 4
    # 4 samples x 32 tokens x 64 hidden x fp32, inputs and outputs; a CPU run keeps them where they are
    assert report["activations"] == {"bytes": 2 * 4 * 32 * 64 * 4, "kept_on": "cpu"}


class _Killed(Exception):
    pass


RESUME_CONFIGS = {
    "default": PruneConfig(),
    "fast": PruneConfig(preset="fast"),
    "best": PruneConfig(preset="best"),
    "reconstruction towards the dense model": PruneConfig(reconstruct_epochs=1, reconstruct_lr=1e-3,
                                                          reconstruct_target="dense"),
    "8-bit": PruneConfig(quantize="int8"),  # solved group by group, smoothed and quantized at each layer's end
    "8-bit group by group": PruneConfig(quantize="fp8"),  # each group quantized once solved
}


@pytest.mark.parametrize("config", RESUME_CONFIGS.values(), ids=RESUME_CONFIGS.keys())
def test_resume_equals_uninterrupted(tiny_llama_dir, tmp_path, config):
    job = PruneJob(out=str(tmp_path / "full"), model=str(tiny_llama_dir), evaluate=False, config=config, **SMALL)
    prune_to_directory(job)

    def die_after_two_layers(stage, done, total):
        if stage == "layers" and done == 2:
            raise _Killed

    partial = PruneJob(out=str(tmp_path / "resumed"), model=str(tiny_llama_dir), evaluate=False, config=config,
                       **SMALL)
    with pytest.raises(_Killed):
        prune_to_directory(partial, progress=die_after_two_layers)
    saved = sorted(p.name for p in (tmp_path / "resumed" / ".thanos_partial").iterdir())
    assert saved == ["elapsed.json", "layer_00000.safetensors", "layer_00001.safetensors", "run.json"]

    solved = []
    prune_to_directory(partial, progress=lambda stage, done, total: solved.append((stage, done)))
    assert ("samples", 1) in solved  # the third layer was pruned, so its statistics were gathered
    full = pruned_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "full"))
    resumed = pruned_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "resumed"))
    assert all(torch.equal(full[n], resumed[n]) for n in full)
    assert_same_scales(tmp_path / "full", tmp_path / "resumed")


def assert_same_scales(path_a: Path, path_b: Path) -> None:
    """The 8-bit scales of two pruned directories, bit for bit (both without any is the same too)."""
    from safetensors.torch import load_file

    from thanos.quantized_model import QUANTIZATION_FILE

    files = [p / QUANTIZATION_FILE for p in (path_a, path_b)]
    assert files[0].is_file() == files[1].is_file()
    if files[0].is_file():
        a, b = (load_file(f) for f in files)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_different_settings(tiny_llama_dir, tmp_path):
    job = PruneJob(out=str(tmp_path / "run"), model=str(tiny_llama_dir), evaluate=False, **SMALL)

    def die(stage, done, total):
        if stage == "layers":
            raise _Killed

    with pytest.raises(_Killed):
        prune_to_directory(job, progress=die)
    changed = PruneJob(out=str(tmp_path / "run"), model=str(tiny_llama_dir), evaluate=False, seed=1,
                       **SMALL)
    with pytest.raises(OutputDirError, match="different settings \\(calibration_digest, seed\\)"):
        prune_to_directory(changed)


def test_resume_refuses_a_calibration_file_rewritten_in_between(tiny_llama_dir, tmp_path):
    """Same file name, other text: the layers depend on the tokens, so the fingerprint holds their digest."""
    from thanos.calibration import default_text

    text = tmp_path / "calib.txt"
    text.write_text(default_text()[:60_000])
    job = PruneJob(out=str(tmp_path / "run"), model=str(tiny_llama_dir), calib_file=str(text), evaluate=False,
                   **SMALL)
    _interrupt_after_two_layers(job)
    text.write_text(default_text()[60_000:120_000])
    with pytest.raises(OutputDirError, match="different settings \\(calibration_digest\\)"):
        prune_to_directory(job)
    text.write_text(default_text()[:60_000])  # the text the finished layers were pruned on: resumes
    report = prune_to_directory(job)
    assert report["calibration"]["digest"] == report["fingerprint"]["calibration_digest"]


def _interrupt_after_two_layers(job) -> float:
    """Run `job` until two layers are saved; returns the seconds the partial run recorded."""
    def die_after_two_layers(stage, done, total):
        if stage == "layers" and done == 2:
            raise _Killed

    with pytest.raises(_Killed):
        prune_to_directory(job, progress=die_after_two_layers)
    return json.loads((Path(job.out) / ".thanos_partial" / "elapsed.json").read_text())["seconds"]


def test_resume_refuses_a_model_changed_in_place(tiny_llama_dir, tmp_path):
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    job = PruneJob(out=str(tmp_path / "run"), model=str(model), evaluate=False, **SMALL)
    _interrupt_after_two_layers(job)
    config = model / "config.json"
    original = config.read_text()
    config.write_text(original.replace("{", '{"note": "edited", ', 1))  # same settings, different files
    with pytest.raises(OutputDirError, match="model_files"):
        prune_to_directory(job)
    config.write_text(original)
    os.utime(config, ns=(0, 0))  # back to the same bytes, but the file changed: still refused
    with pytest.raises(OutputDirError, match="model_files"):
        prune_to_directory(job)


def test_prune_seconds_add_up_over_a_resume(tiny_llama_dir, tmp_path):
    job = PruneJob(out=str(tmp_path / "run"), model=str(tiny_llama_dir), evaluate=False, **SMALL)
    first = _interrupt_after_two_layers(job)
    assert first > 0
    report = prune_to_directory(job)
    assert report["prune_seconds"] > first


def test_bad_inputs_fail_clearly_and_write_nothing(tiny_llama_dir, tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    from tests.conftest import _save_tiny

    long_context = _save_tiny("llama", tmp_path_factory, tiny_tokenizer_dir, max_position_embeddings=1_000_000)
    out = tmp_path / "never"
    cases = [
        (dict(model=str(tmp_path / "missing")), ModelError, "does not exist"),
        (dict(model=str(tiny_llama_dir / "config.json")), ModelError, "not .gguf"),
        (dict(model=str(tiny_llama_dir), seqlen=300), CalibrationError, "longer than the model's context of 256"),
        (dict(model=str(long_context), seqlen=900_000), CalibrationError, "smaller --seqlen"),
        (dict(model=str(long_context), seqlen=60_000), CalibrationError, "held-out 10%"),
        (dict(model=str(tiny_llama_dir), device="cuda:0"), ValueError, "no CUDA GPU"),
        (dict(model=str(tiny_llama_dir), include=("*.nothing",)), ValueError, "no linear layer matches"),
    ]
    for overrides, error, fragment in cases:
        settings = {**SMALL, **overrides}
        if torch.cuda.is_available() and overrides.get("device") == "cuda:0":
            continue
        with pytest.raises(error, match=fragment):
            prune_to_directory(PruneJob(out=str(out), **settings))
        assert not out.exists()


def test_pattern_that_width_does_not_divide(tmp_path_factory, tiny_tokenizer_dir, tmp_path):
    from tests.conftest import _save_tiny

    odd = _save_tiny("llama", tmp_path_factory, tiny_tokenizer_dir, intermediate_size=100)  # down_proj: 100 in
    with pytest.raises(ModelError, match="down_proj \\(100 inputs\\).*--exclude"):
        prune_to_directory(PruneJob(out=str(tmp_path / "x"), model=str(odd), config=PruneConfig(pattern="4:8"),
                                    **SMALL))
    assert not (tmp_path / "x").exists()


def test_a_gguf_file_loads_as_the_model_it_was_written_from_parsing_it_once(tiny_gguf_file, tiny_llama_dir,
                                                                           monkeypatch):
    """A GGUF model loads to the weights and tokenizer it was written from; transformers reads the file's
    header for the tokenizer's config, the config and the weights, and all three come from one parse."""
    import gguf
    from transformers import AutoTokenizer

    from thanos.calibration import default_text

    parsed, reader = [], gguf.GGUFReader

    def counting(*args, **kwargs):
        parsed.append(args)
        return reader(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    model, tokenizer = load_model(str(tiny_gguf_file))
    assert len(parsed) == 1 and gguf.GGUFReader is counting  # and gguf as it was after the load
    written, loaded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict(), model.state_dict()
    assert written.keys() == loaded.keys() and all(torch.equal(written[k], loaded[k]) for k in written)
    text = default_text()[:5000]
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_llama_dir)(text)["input_ids"]


def test_unsupported_architecture(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, vocab_size=64)).save_pretrained(tmp_path / "neox")
    with pytest.raises(ModelError, match="'gpt_neox' is not supported"):
        from thanos.models import adapter_for

        adapter_for(AutoModelForCausalLM.from_pretrained(tmp_path / "neox"))


@pytest.mark.parametrize("field, value", [("calib_samples", 0), ("seqlen", 0), ("eval_windows", -2)])
def test_impossible_sizes_are_refused_not_replaced(field, value, tmp_path):
    with pytest.raises(CalibrationError, match=field):
        PruneJob(out=str(tmp_path / "o"), **{field: value})


def test_output_directory_with_other_content(tiny_llama_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        prune_to_directory(PruneJob(out=str(tmp_path), model=str(tiny_llama_dir), **SMALL))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_jsonl_calibration(tmp_path, tiny_llama_dir):
    from thanos.calibration import read_text

    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "alpha beta"}\n\n{"text": "gamma"}\n')
    assert read_text(str(f)) == "alpha beta\n\ngamma"
    f.write_text('{"body": 1}\n')
    with pytest.raises(CalibrationError, match='c.jsonl:1 has no "text"'):
        read_text(str(f))


def test_default_text_splits_without_overlap(tiny_llama_dir):
    _, tokenizer = load_model(str(tiny_llama_dir))
    split = tokenize_split(tokenizer, None)
    assert split.source == "pydoc_data.topics"
    assert split.evaluation.numel() > 0 and split.calibration.numel() > 8 * split.evaluation.numel()
    windows = sample_windows(split.calibration, 8, 64, seed=3)
    assert windows.shape == (8, 64)
    assert torch.equal(windows, sample_windows(split.calibration, 8, 64, seed=3))


def test_a_text_is_tokenised_once_per_tokenizer_and_a_changed_one_tokenises_again(tiny_llama_dir, tmp_path):
    """tokenize_split keeps what it tokenised (a command reads its text several times): the same
    tokenizer and text give the kept ids without tokenising; another text, or the same tokenizer
    changed (a token added, the special tokens split), gives exactly what it tokenises afresh."""
    from transformers import AutoTokenizer

    calls = []

    class Counting(type(AutoTokenizer.from_pretrained(tiny_llama_dir))):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    tokenizer = Counting.from_pretrained(tiny_llama_dir)
    text = tmp_path / "t.txt"
    text.write_text("Sparse matrices keep two of every four weights. " * 300)
    first = tokenize_split(tokenizer, str(text))
    again = tokenize_split(tokenizer, str(text))
    assert len(calls) == 1 and torch.equal(torch.cat([first.calibration, first.evaluation]),
                                           torch.cat([again.calibration, again.evaluation]))
    again.calibration[0] = -1  # a caller's change does not reach the kept ids
    assert tokenize_split(tokenizer, str(text)).calibration[0] == first.calibration[0] and len(calls) == 1

    def fresh(tok) -> torch.Tensor:
        return torch.tensor(tok(text.read_text(), return_attention_mask=False)["input_ids"])

    tokenizer.add_tokens(["weights"])
    changed = tokenize_split(tokenizer, str(text))
    assert len(calls) == 2 and changed.calibration.numel() < first.calibration.numel()
    assert torch.equal(torch.cat([changed.calibration, changed.evaluation]), fresh(tokenizer))
    tokenizer.split_special_tokens = True
    tokenize_split(tokenizer, str(text))
    text.write_text("Another text entirely. " * 300)
    other = tokenize_split(tokenizer, str(text))
    assert len(calls) == 5 and torch.equal(torch.cat([other.calibration, other.evaluation]), fresh(tokenizer))

def test_linears_reading_one_input_share_statistics(tiny_llama_dir):
    from thanos.driver import SharedInputStatistics, run_layer, capture_layer_inputs

    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 3, 32)
    inputs, args, kwargs = capture_layer_inputs(model, samples, "cpu", "cpu")
    layer = model.model.layers[0]
    linears = prunable_linears(model, LayerSelection())[0]
    shared = SharedInputStatistics(linears, "cpu")
    hooks = [layer.register_forward_pre_hook(shared.new_pass)]
    own = {}
    for name, mod in linears.items():
        hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: shared.add(name, a[0])))
        own[name] = HessianAccumulator(mod.in_features)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, acc=own[name]: acc.add(a[0])))
    with torch.no_grad():
        run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
    for h in hooks:
        h.remove()
    short = {n.rsplit(".", 1)[-1]: shared.source[n].rsplit(".", 1)[-1] for n in linears}
    assert short == {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                     "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}
    assert len(shared.stats) == 4
    for name in linears:  # sharing changes nothing: each linear's statistics are its own inputs'
        assert torch.equal(shared.hessian(name), own[name].hessian)


@pytest.mark.parametrize("quantize, per_layer", [(None, 4), ("fp8", 4), ("int8", 8)])
def test_linears_reading_one_input_share_one_factorisation(tiny_llama_dir, monkeypatch, quantize, per_layer):
    """q/k/v and gate/up factor their shared Hessian once (4 distinct inputs per llama layer); the
    8-bit step's compensated rounding reuses those factors, unless smoothing (INT8's default)
    rescaled the Hessians in between, which needs them again."""
    import thanos.hessian

    calls = []
    factor = thanos.hessian.inverse_upper_factor
    monkeypatch.setattr(thanos.hessian, "inverse_upper_factor", lambda H, damp, layer="layer": calls.append(layer)
                        or factor(H, damp, layer))
    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 3, 32)
    prune_model_(model, samples, PruneConfig(preset="default", quantize=quantize))
    assert len(calls) == per_layer * len(model.model.layers)


def test_prune_in_memory_equals_the_directory_route(tiny_llama_dir, tmp_path):
    """`prune(model, config, calibration) -> model, report`: the same weights as prune_to_directory, nothing written."""
    config = PruneConfig(preset="default")
    report = prune_to_directory(PruneJob(out=str(tmp_path / "disk"), model=str(tiny_llama_dir), config=config,
                                         evaluate=False, **SMALL))
    model, tokenizer = load_model(str(tiny_llama_dir))
    windows = sample_windows(tokenize_split(tokenizer, None).calibration, SMALL["calib_samples"], SMALL["seqlen"])
    pruned, memory = prune(model, config, windows, device="cpu")
    assert pruned is model and memory["recipe"] == report["recipe"]
    on_disk = pruned_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "disk"))
    assert all(torch.equal(on_disk[n], w) for n, w in pruned_weights(pruned).items())  # one process, one thread count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk"]
    with pytest.raises(InputError, match="token ids shaped"):
        prune(model, config, torch.randn(2, 8), device="cpu")


def test_default_windows_are_cut_to_the_context(tiny_llama_dir):
    """The CPU's default window (512 tokens) on a model of 256: cut to 256; an asked-for 300 is refused."""
    model, tokenizer = load_model(str(tiny_llama_dir))
    _, report = prune(model, PruneConfig(preset="fast"), tokenizer=tokenizer, samples=1, device="cpu")
    assert report["calibration"] == dict(samples=1, seqlen=256)
    with pytest.raises(CalibrationError, match="longer than the model's context of 256"):
        prune(model, PruneConfig(preset="fast"), tokenizer=tokenizer, samples=1, seqlen=300, device="cpu")


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(MOE)))  # MoE: tests/thanos/test_experts.py
def test_every_supported_family_prunes_to_an_exact_8bit_pattern(family, tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """Each architecture thanos.models.ADAPTERS names, through the longest default route (permuted
    channels, sequential groups, INT8 with SmoothQuant where the adapter allows it): every linear
    2:4, finite, and the directory loads in transformers."""
    source = _save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)
    report = prune_to_directory(PruneJob(out=str(tmp_path / "m"), model=str(source), evaluate=False,
                                         config=PruneConfig(pattern="2:4", quantize="int8"), **SMALL))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    linears = {name: linear for group in prunable_linears(model, LayerSelection()).values() for name, linear in group.items()}
    assert model.config.model_type == FAMILIES[family].get("model_type", family)
    assert len(report["layers"]) == len(linears) > 0
    for linear in linears.values():
        assert torch.isfinite(linear.weight).all()
        assert_nm(weight_view(linear), 2, 4)


def test_gemma4s_small_releases_are_tuned_towards_their_layers_and_refuse_the_dense_target(tmp_path_factory,
                                                                                           tiny_tokenizer_dir):
    """The reconstruction runs each sample with its own per-layer embedding; aiming it at the dense
    model's activations would run a dense model beside the pruned one, both filling the keys and values
    the last layer reuses: refused before any work, naming the target that works."""
    from thanos import ConfigError

    source = _save_tiny("gemma4_text_ple", tmp_path_factory, tiny_tokenizer_dir)
    model, tokenizer = load_model(str(source))
    _, report = prune(model, PruneConfig(preset="best"), tokenizer=tokenizer, samples=4, seqlen=32, device="cpu")
    tuned = report["layers"][0]["reconstruction"]
    assert tuned["kept"] and tuned["loss_after"] < tuned["loss_before"]
    model, _ = load_model(str(source))
    with pytest.raises(ConfigError, match="use the target 'layer'"):
        prune(model, PruneConfig(preset="best", reconstruct_target="dense"), tokenizer=tokenizer, samples=4, seqlen=32,
              device="cpu")


def test_a_killed_prune_of_gemma4s_small_releases_resumes_to_the_same_weights(tmp_path, tmp_path_factory,
                                                                             tiny_tokenizer_dir):
    """The rerun loads layer 0 from its checkpoint and runs it to refill the keys and values layer 1
    reuses: layer 1 is then pruned as in the uninterrupted run (same thread count, same process)."""
    from safetensors.torch import load_file

    source = _save_tiny("gemma4_text_ple", tmp_path_factory, tiny_tokenizer_dir)

    def job(name):
        return PruneJob(out=str(tmp_path / name), model=str(source), evaluate=False, config=PruneConfig(), **SMALL)

    def die_after_one_layer(stage, done, total):
        if stage == "layers" and done == 1:
            raise _Killed

    prune_to_directory(job("full"))
    with pytest.raises(_Killed):
        prune_to_directory(job("resumed"), progress=die_after_one_layer)
    prune_to_directory(job("resumed"))
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_perplexity_refuses_windows_of_one_token():
    from thanos.errors import InputError
    from thanos.evaluate import perplexity

    with pytest.raises(InputError, match="needs 2 tokens or more"):
        perplexity(None, torch.arange(64), 1)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", *VISION_LANGUAGE, *sorted(FAMILIES)])
def test_the_layer_by_layer_walk_is_the_models_own_forward(family, tmp_path_factory, tiny_tokenizer_dir):
    """The driver runs each decoder layer on its own, with the extra arguments the model gives that
    layer: families mixing sliding-window and full attention (Gemma 2/3, OLMo 3, Command R7B, EXAONE 4,
    Ministral) give each kind its own mask, and Gemma 3 and OLMo 3 their own rotary frequencies. Layer
    0's, given to every layer, computed other activations (windows of 32 tokens against 16-token
    sliding windows here) and so other statistics, silently."""
    _assert_walk_is_forward(*load_model(str(_save_tiny(family, tmp_path_factory, tiny_tokenizer_dir))), family)


def test_the_walk_of_gemma4_with_its_vision_tower_and_per_layer_embeddings_is_its_forward(tmp_path_factory,
                                                                                          tiny_tokenizer_dir,
                                                                                          monkeypatch):
    """Gemma 4's small releases as released: a vision tower, per-layer embeddings, a layer reusing the
    keys and values of the one before it."""
    import tests.conftest

    text = {key: value for key, value in FAMILIES["gemma4_text_ple"].items() if key != "model_type"}
    monkeypatch.setitem(tests.conftest.FAMILIES, "gemma4_text", text)  # the text config _save_tiny gives gemma4
    model, tokenizer = load_model(str(_save_tiny("gemma4", tmp_path_factory, tiny_tokenizer_dir)))
    assert model.config.text_config.hidden_size_per_layer_input and model.config.text_config.num_kv_shared_layers
    _assert_walk_is_forward(model, tokenizer, "gemma4")


def _assert_walk_is_forward(model, tokenizer, family: str) -> None:
    """Each decoder layer run on its own (`run_layer`, with `layer_arguments`) on the layer before's
    outputs gives what it gives in the model's own forward."""
    from thanos.driver import capture_layer_inputs, layer_arguments, run_layer

    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    inputs, _, _ = capture_layer_inputs(model, samples, "cpu", "cpu")
    arguments = layer_arguments(model, samples, "cpu")
    layers = decoder_layers(model)
    own = {index: [] for index in range(len(layers))}  # each layer's output in the model's own forward
    hooks = [layer.register_forward_hook(lambda m, a, y, index=index: own[index].append(y[0] if isinstance(y, tuple)
                                                                                       else y))
             for index, layer in enumerate(layers)]
    with torch.no_grad():
        for sample in samples:
            model(sample[None], use_cache=False)
        for hook in hooks:
            hook.remove()
        assert len(arguments) == len(layers)
        for index, (layer, (args, kwargs)) in enumerate(zip(layers, arguments)):
            inputs = run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
            for walked, expected in zip(inputs, own[index]):
                assert (walked - expected).abs().max() <= 64 * EPS * expected.abs().max(), (family, index)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma3", "olmo3", "cohere2", "exaone4"])
def test_pruning_calls_each_layer_with_the_arguments_the_model_gives_it(family, tmp_path_factory, tiny_tokenizer_dir):
    """Sliding-window and full-attention layers alternate in these tiny models (and Gemma 3's and OLMo
    3's rotary frequencies with them): every call the driver makes to a layer carries that layer's own
    mask and rotary embeddings, as the model's forward gives them."""
    from thanos.driver import _same

    model, tokenizer = load_model(str(_save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    layers = decoder_layers(model)
    calls = {index: [] for index in range(len(layers))}
    hooks = [layer.register_forward_pre_hook(lambda m, a, k, index=index: calls[index].append(k), with_kwargs=True)
             for index, layer in enumerate(layers)]
    with torch.no_grad():
        model(samples[0][None], use_cache=False)
    own = {index: seen.pop() for index, seen in calls.items()}
    assert not _same(own[0]["attention_mask"], own[1]["attention_mask"])  # the two kinds differ here
    prune_model_(model, samples, PruneConfig(pattern="2:4", preset="fast"), "cpu")
    for hook in hooks:
        hook.remove()
    for index, seen in calls.items():
        assert seen and all(_same(kwargs, own[index]) for kwargs in seen), (family, index)


@pytest.mark.parametrize("samples, seqlen, thin", [(2, 16, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}),  # 32 tokens: fewer than 64
                                                   (4, 32, set())])  # 128 tokens: down_proj's 128 inputs are enough
def test_each_linear_records_its_tokens_and_too_few_for_its_inputs_are_said_once(tiny_llama_dir, tmp_path, caplog,
                                                                                  capsys, samples, seqlen, thin):
    """Fewer calibration tokens than a linear's inputs leave its statistics rank-deficient: its solve fits
    those tokens, and its small error there understates the loss. One warning says how many, the summary
    too; the report holds each linear's tokens."""
    import logging

    from cli import echo_prune_summary

    with caplog.at_level(logging.WARNING, logger="thanos.driver"):
        report = prune_to_directory(PruneJob(out=str(tmp_path / "p"), model=str(tiny_llama_dir), calib_samples=samples,
                                             seqlen=seqlen, evaluate=False, device="cpu"))
    assert {r["tokens"] for r in report["layers"]} == {samples * seqlen}
    said = [r.getMessage() for r in caplog.records if "fewer calibration tokens" in r.getMessage()]
    assert {r["name"].rsplit(".", 1)[-1] for r in report["layers"] if r["tokens"] < r["shape"][1]} == thin
    assert len(said) == bool(thin) and all(m.startswith(f"{len(report['layers'])} of {len(report['layers'])}")
                                           for m in said), said
    capsys.readouterr()
    echo_prune_summary(report)
    assert ("linears summed fewer calibration tokens" in capsys.readouterr().out) == bool(thin)
