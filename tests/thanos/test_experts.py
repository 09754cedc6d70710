"""Mixture-of-experts models: each expert pruned as its own linears, on the tokens routed to it."""
import logging

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from thanos import PruneConfig
from thanos.calibration import sample_windows, tokenize_split
from thanos.driver import capture_layer_inputs, collect_statistics, layer_arguments
from thanos.experts import UnfusedExperts, expert_views, is_fused_experts, is_scaled_input_experts
from thanos.linears import weight_view
from thanos.model_config import expert_count
from thanos.models import LayerSelection, decoder_layers, load_model, prunable_linears
from thanos.pipeline import PruneJob, prune, prune_to_directory
from tests.conftest import MOE, _save_tiny
from tests.thanos.helpers import assert_nm

EPS = torch.finfo(torch.float32).eps
SMALL = dict(calib_samples=4, seqlen=32, eval_windows=1, device="cpu")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(MOE))
def test_each_expert_is_pruned_as_its_own_linears_and_saved_in_the_familys_layout(family, tmp_path, tmp_path_factory,
                                                                                 tiny_tokenizer_dir):
    """Loaded here, a fused experts module (3-D weights) becomes one linear per expert and projection
    computing the same logits; pruned, every expert is 2:4 along K in the fused tensors transformers
    loads back, the files name the tensors as the source's do, and the pruned model computes the
    same in both forms."""
    source = _save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    fused = AutoModelForCausalLM.from_pretrained(source).eval()
    model, _ = load_model(str(source))
    assert any(isinstance(m, UnfusedExperts) for m in model.modules())
    expected = _logits(fused, ids)
    # the same dot products, computed per projection: equal to round-off (here, bit for bit)
    assert (_logits(model, ids) - expected).abs().max() <= 64 * EPS * expected.abs().max()
    blocks = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    experts = expert_count(model.config)
    assert blocks and all(len(block) == experts for block in blocks)
    names = [name for layer in prunable_linears(model, LayerSelection()).values() for name in layer]
    projections = 3 if blocks[0].fused.has_gate else 2  # gate, up, down; or up and down (Nemotron-H)
    assert sum(".experts." in name for name in names) == len(blocks) * projections * experts

    out = tmp_path / "p"
    report = prune_to_directory(PruneJob(out=str(out), model=str(source), config=PruneConfig(pattern="2:4"), **SMALL))
    assert {layer["name"] for layer in report["layers"]} == set(names)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    fused = [m for m in pruned.modules() if is_fused_experts(m) or is_scaled_input_experts(m)]
    assert len(fused) == len(blocks)
    for block in fused:
        for e in range(experts):
            for weight, _ in expert_views(block, e).values():  # (out, in), whatever the storage
                assert_nm(weight, 2, 4)
    with safe_open(str(source / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
    reloaded, _ = load_model(str(out))
    expected = _logits(pruned, ids)
    assert (_logits(reloaded, ids) - expected).abs().max() <= 64 * EPS * expected.abs().max()


def test_an_experts_statistics_are_those_of_the_tokens_routed_to_it(tmp_path_factory, tiny_tokenizer_dir):
    """Each expert's linears see the tokens the router sends it, and only those."""
    model, tokenizer = load_model(str(_save_tiny("olmoe", tmp_path_factory, tiny_tokenizer_dir)))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    inputs, _, _ = capture_layer_inputs(model, samples, "cpu", "cpu")
    args, kwargs = layer_arguments(model, samples, "cpu")[0]
    layer = decoder_layers(model)[0]
    block_inputs = []
    hook = layer.mlp.register_forward_pre_hook(lambda m, a: block_inputs.append(a[0]))
    linears = prunable_linears(model, LayerSelection())[0]
    shared = collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu")
    hook.remove()
    routed = torch.zeros(4, dtype=torch.long)
    for x in block_inputs:
        _, _, chosen = layer.mlp.gate(x.reshape(-1, x.shape[-1]))
        routed += torch.bincount(chosen.flatten(), minlength=4)
    assert routed.sum() == 2 * samples.numel() and (routed > 0).all()
    for e in range(4):
        for projection in ("gate_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.{e}.{projection}"
            assert shared.stats[shared.source[name]].tokens == routed[e]


def test_llama4s_experts_see_only_the_tokens_routed_to_them(tmp_path_factory, tiny_tokenizer_dir):
    """Llama 4 runs every expert on every token, scaled by its router score (zero where not routed): each
    expert's linears count the tokens routed to it, not every token."""
    from thanos.driver import run_layer

    model, tokenizer = load_model(str(_save_tiny("llama4_text", tmp_path_factory, tiny_tokenizer_dir)))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    inputs, _, _ = capture_layer_inputs(model, samples, "cpu", "cpu")
    arguments = layer_arguments(model, samples, "cpu")
    inputs = run_layer(decoder_layers(model)[0], inputs, *arguments[0], "cpu", "cpu")  # the dense layer
    layer = decoder_layers(model)[1]
    block_inputs = []
    hook = layer.feed_forward.register_forward_pre_hook(lambda m, a: block_inputs.append(a[0]))
    shared = collect_statistics(layer, prunable_linears(model, LayerSelection())[1], inputs, *arguments[1], "cpu", "cpu")
    hook.remove()
    routed = sum((layer.feed_forward.router(x.reshape(-1, x.shape[-1]))[0] != 0).sum(0) for x in block_inputs)
    assert routed.sum() == samples.numel() and (routed > 0).all()  # one expert a token
    for e in range(4):
        for projection in ("gate_proj", "down_proj"):
            name = f"model.layers.1.feed_forward.experts.{e}.{projection}"
            assert shared.stats[shared.source[name]].tokens == routed[e]


def _never_expert_3(router, args, output):
    """A router's forward hook: expert 3 never picked (each of its picks goes to the first expert
    of the four the token did not pick)."""
    logits, scores, chosen = output
    spare = torch.tensor([min(set(range(4)) - set(row.tolist())) for row in chosen])
    return logits, scores, torch.where(chosen == 3, spare[:, None], chosen)


def test_an_expert_no_calibration_token_reaches_is_pruned_by_magnitude(tmp_path_factory, tiny_tokenizer_dir, caplog):
    """An expert the router never picks on the calibration text has no statistics: it is pruned by
    weight magnitude (its kept weights as they were), with a warning naming it, where a zero
    Hessian would have marked every input dead and zeroed the whole expert."""
    model, tokenizer = load_model(str(_save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)))
    decoder_layers(model)[0].mlp.gate.register_forward_hook(_never_expert_3)
    expert = decoder_layers(model)[0].mlp.experts[3]  # load_model gave it its own linears
    before = {name: weight_view(linear).clone() for name, linear in expert.named_children()}
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    with caplog.at_level(logging.WARNING, logger="thanos.driver"):
        prune(model, PruneConfig(pattern="2:4", preset="fast"), samples, device="cpu")
    warned = [r.getMessage() for r in caplog.records if "no calibration token reached it" in r.getMessage()]
    assert any(m.startswith("model.layers.0.mlp.experts.3.") for m in warned)
    assert not any(m.startswith("model.layers.1.") for m in warned)  # the hook is on layer 0's router only
    for name, linear in expert.named_children():
        weight = weight_view(linear)
        kept = weight != 0
        assert_nm(weight, 2, 4)
        assert torch.equal(weight[kept], before[name][kept])  # no compensation without statistics
        groups = before[name].abs().reshape(weight.shape[0], -1, 4)
        # the two largest magnitudes of every group of four are the ones kept
        assert torch.equal(kept.reshape(groups.shape), groups >= groups.topk(2, dim=-1).values[..., 1:])


def test_sequential_solves_take_two_passes_for_all_the_experts(tmp_path_factory, tiny_tokenizer_dir, caplog,
                                                                monkeypatch):
    """Solved group by group, a layer of experts is q/k/v, o_proj, every expert's gate/up, every
    expert's down_proj: no expert's input depends on another's weights, where a pass per expert's
    groups (10 groups here, not 4) would go through all the experts before it each time."""
    from thanos import driver

    source = _save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)

    def layer_calls() -> int:
        model, tokenizer = load_model(str(source))
        samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
        calls = []
        decoder_layers(model)[0].register_forward_pre_hook(lambda m, a: calls.append(1))
        prune(model, PruneConfig(pattern="2:4", preset="fast", sequential=True), samples, device="cpu")
        return len(calls)

    with caplog.at_level(logging.INFO, logger="thanos.driver"):
        merged = layer_calls()
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("group ")][:4]
    experts = [f"model.layers.0.mlp.experts.{e}." for e in range(4)]
    assert [m.split(" (")[0] for m in stages] == [f"group {i} of 4" for i in range(1, 5)]
    assert all(f"{e}gate_proj" in stages[2] and f"{e}up_proj" in stages[2] and f"{e}down_proj" in stages[3]
               for e in experts)
    monkeypatch.setattr(driver, "merge_expert_groups", lambda groups, layer, prefix: groups)
    assert layer_calls() - merged == 2 * (10 - 4)  # a pass per group and sample


def test_the_python_api_gives_back_the_model_in_its_own_structure(tmp_path_factory, tiny_tokenizer_dir):
    """`thanos.prune` on a model the caller loaded: pruned per expert, handed back with its fused
    experts modules (so its own save_pretrained writes the family's checkpoint)."""
    source = _save_tiny("olmoe", tmp_path_factory, tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    _, tokenizer = load_model(str(source))
    pruned, report = prune(model, PruneConfig(pattern="2:4", preset="fast"), tokenizer=tokenizer, samples=2,
                           seqlen=32, device="cpu")
    assert pruned is model and not any(isinstance(m, UnfusedExperts) for m in model.modules())
    assert sum(".mlp.experts." in layer["name"] for layer in report["layers"]) == 2 * 3 * 4
    for block in (m for m in model.modules() if is_fused_experts(m)):
        for e in range(4):
            assert_nm(expert_views(block, e)["gate_proj"][0], 2, 4)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_a_mixture_of_experts_in_8_bits_keeps_its_scales_per_expert(fmt, tmp_path, tmp_path_factory,
                                                                   tiny_tokenizer_dir):
    """Each expert's linears quantized (weights on their grid, 2:4 kept) with a static input scale from
    the tokens routed to it; the scales reload onto each expert's linears by name, and the compact
    8-bit checkpoint reads back bit-exact."""
    from exporters import ExportOptions, export
    from thanos.quantized_model import quantization_of

    out = tmp_path / "p"
    report = prune_to_directory(PruneJob(out=str(out), model=str(_save_tiny("qwen2_moe", tmp_path_factory,
                                                                            tiny_tokenizer_dir)),
                                         config=PruneConfig(pattern="2:4", quantize=fmt), **SMALL))
    experts = [layer for layer in report["layers"] if ".experts." in layer["name"]]
    assert len(experts) == 4 * 3 and all(e["quantization"]["input_scale"] > 0 for e in experts)
    model, _ = load_model(str(out))
    linears = {name: linear for layer in prunable_linears(model, LayerSelection()).values()
               for name, linear in layer.items()}
    assert len(linears) == len(report["layers"])
    for name, linear in linears.items():
        quantization = quantization_of(linear)
        assert quantization is not None and quantization.input_scale is not None, name
        weight = weight_view(linear)
        assert_nm(weight, 2, 4)
        grid = weight / quantization.weight_scale[:, None]  # whole steps (int8) or FP8 values
        back = grid.round() if fmt == "int8" else grid.to(torch.float8_e4m3fn).float()
        assert (back - grid).abs().max() <= 4 * EPS * grid.abs().max(), name  # a code times its scale, divided
    summary = export("safetensors", out, tmp_path / "c", ExportOptions())
    assert summary["round_trip"] == "bit-exact"


def test_an_expert_no_token_reaches_takes_its_input_scale_from_the_other_experts(tmp_path_factory,
                                                                               tiny_tokenizer_dir, caplog):
    """No calibration token, no input range: the expert's static 8-bit input scale is the widest
    among its layer's experts for the same projection, and the report and a warning say so."""
    model, tokenizer = load_model(str(_save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)))
    decoder_layers(model)[0].mlp.gate.register_forward_hook(_never_expert_3)
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    with caplog.at_level(logging.WARNING, logger="thanos.driver"):
        _, report = prune(model, PruneConfig(pattern="2:4", quantize="int8"), samples, device="cpu")
    by_name = {layer["name"]: layer["quantization"] for layer in report["layers"]}
    for projection in ("gate_proj", "up_proj", "down_proj"):
        unseen = by_name[f"model.layers.0.mlp.experts.3.{projection}"]
        others = [by_name[f"model.layers.0.mlp.experts.{e}.{projection}"]["input_amax"] for e in range(3)]
        assert unseen["input_amax"] == max(others) and "no token reached it" in unseen["input_range"]
        assert "input_range" not in by_name[f"model.layers.1.mlp.experts.3.{projection}"]
    assert any("8-bit input scale is from the widest range" in r.getMessage() for r in caplog.records)
    # the statistics' warning too, also where the channel permutation read the Hessian first (down_proj's)
    unreached = {r.getMessage().split(":")[0] for r in caplog.records if "router never picked" in r.getMessage()}
    assert unreached == {"model.layers.0.mlp.experts.3.gate_proj", "model.layers.0.mlp.experts.3.down_proj"}


class _Killed(Exception):
    pass


def test_a_killed_prune_of_a_mixture_of_experts_resumes_to_the_same_weights(tmp_path, tmp_path_factory,
                                                                           tiny_tokenizer_dir):
    """The finished layers' checkpoints hold each expert's linears; loaded into a rerun they land in
    the fused tensors, and the rerun ends with the uninterrupted run's weights (same thread count,
    same process)."""
    from safetensors.torch import load_file

    source = _save_tiny("olmoe", tmp_path_factory, tiny_tokenizer_dir)  # experts in layer 0, which the rerun loads

    def job(name):
        return PruneJob(out=str(tmp_path / name), model=str(source), evaluate=False, config=PruneConfig(pattern="2:4"),
                        **SMALL)

    prune_to_directory(job("full"))

    def die_after_one_layer(stage, done, total):
        if stage == "layers" and done == 1:
            raise _Killed

    with pytest.raises(_Killed):
        prune_to_directory(job("resumed"), progress=die_after_one_layer)
    assert (tmp_path / "resumed" / ".thanos_partial" / "layer_00000.safetensors").is_file()
    prune_to_directory(job("resumed"))
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    source_weights = load_file(source / "model.safetensors")
    name = "model.layers.0.mlp.experts.0.up_proj.weight"
    assert not torch.equal(full[name], source_weights[name])  # pruned, not copied


@pytest.mark.parametrize("family", ["mixtral", "phimoe", "olmoe", "granitemoe", "gpt_oss", "gemma4_text_moe",
                                    "nemotron_h_moe"])
def test_inspect_reads_each_expert_from_the_files_without_loading_the_model(family, tmp_path, tmp_path_factory,
                                                                            tiny_tokenizer_dir, monkeypatch):
    """`inspect` reads one tensor at a time: each expert's linears are found under the names the
    family's files give them (Mixtral's and Phi-3.5-MoE's w1/w3/w2), or cut from the 3-D tensor
    that holds a layer's experts (GraniteMoE's input_linear and output_linear; GPT-OSS's, stored
    transposed with gate and up interleaved; Nemotron 3's up_proj, no gate), so a mixture of experts is never loaded whole to be
    inspected; what it finds is what the loaded model holds."""
    from exporters import source as exporters_source

    out = tmp_path / "p"
    prune_to_directory(PruneJob(out=str(out), model=str(_save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)),
                                evaluate=False, config=PruneConfig(pattern="2:4", preset="fast"), **SMALL))
    loaded_whole = exporters_source.model_patterns(exporters_source.load_pruned(out)[0])

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(exporters_source, "load_pruned", loaded)
    patterns = exporters_source.directory_patterns(out)
    experts = [p for p in patterns if ".experts." in p.name]
    # two layers of 4 experts of three projections; Nemotron 3's: one such layer, up and down only
    assert len(experts) == (4 * 2 if family == "nemotron_h_moe" else 2 * 4 * 3)
    # every linear 2:4; the tiny Mamba-2 in_proj's 328 rows are no multiple of the kernels' 16
    assert all(p.pattern == "2:4" for p in patterns) and all(p.hardware_2to4 for p in experts)
    assert patterns == loaded_whole


def test_saving_a_cast_model_keeps_its_experts_in_their_new_dtype(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """A loaded model cast whole (an export casts to float16) leaves the fused tensors in the old
    dtype: saving writes the cast values into them, and the experts stay in the model's new dtype."""
    from thanos.experts import fused_for_saving

    model, _ = load_model(str(_save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)))
    model.to(torch.bfloat16)
    with fused_for_saving(model):
        model.save_pretrained(tmp_path / "m")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    expert = decoder_layers(model)[0].mlp.experts[1].down_proj.weight
    fused = next(m for m in saved.modules() if is_fused_experts(m)).down_proj[1]
    assert torch.equal(fused, expert.float())


def _pruned(source, config: PruneConfig, samples, idle_expert_3: bool = False, device: str = "cpu"
            ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, list]]:
    """The pruned weights, each linear's 8-bit scales (its report's, where quantized), and the turn
    each expert's statistics were gathered in, where they were taken in turns."""
    model, _ = load_model(str(source))
    if idle_expert_3:
        decoder_layers(model)[0].mlp.gate.register_forward_hook(_never_expert_3)
    _, report = prune(model, config, samples, device=device)
    scales = {layer["name"]: {key: value for key, value in layer["quantization"].items() if "seconds" not in key}
              for layer in report["layers"] if layer.get("quantization")}
    turns = {layer["name"]: layer["statistics_turn"] for layer in report["layers"] if "statistics_turn" in layer}
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}, scales, turns


def _calibration(source):
    _, tokenizer = load_model(str(source))
    return sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)


@pytest.mark.parametrize("family, preset, extra", [
    ("mixtral", "default", {}),  # one pass: channel permutations, mask search, refit
    # group by group, each group quantized once solved; an expert no token reaches takes the widest
    # input range of all the layer's experts, not only of those in its turn
    ("mixtral", "default", dict(quantize="fp8", idle_expert_3=True)),
    ("deepseek_v3", "default", {}),  # a shared expert beside them, latent attention, a dense first layer
    ("gpt_oss", "default", {}),  # biased experts, stored transposed
    ("qwen3_next", "default", {}),  # linear-attention layers, a gated shared expert
    ("olmoe", "best", {}),  # the reconstruction after the solves
    ("mixtral", "default", dict(quantize="fp8")),  # group by group, each group quantized once solved
    # INT8 (smoothed) at the layer's end, each chunk smoothed and quantized in its last turn: group by
    # group with the permutations from the first pass (a pass of its own per chunk); in one pass
    ("mixtral", "default", dict(quantize="int8")),
    ("mixtral", "default", dict(sequential=True)),  # the same permutations from the first pass, no 8-bit step
    ("mixtral", "default", dict(quantize="int8", sequential=False)),
    ("deepseek_v3", "fast", dict(quantize="int8", quantize_smoothing=0.5)),  # a shared expert, a dense layer
    ("llama4_text", "default", dict(quantize="int8")),  # experts reading every token, scaled by its score
    ("nemotron_h_moe", "default", dict(quantize="int8")),  # experts of up and down alone, a shared one
])
def test_experts_whose_statistics_exceed_the_memory_take_turns_to_the_same_weights(family, preset, extra,
                                                                                   tmp_path_factory,
                                                                                   tiny_tokenizer_dir, caplog,
                                                                                   monkeypatch):
    """Where a layer's experts' statistics exceed half the free memory (DeepSeek V3's: 114 GB a layer),
    they are gathered in turns, a pass through the layer per chunk of experts: the same weights bit
    for bit (same process, same thread count), 8-bit scales included, since no expert's weights
    reach another linear's input and the others are written after the last turn."""
    from thanos import driver

    source = _save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)
    samples = _calibration(source)
    settings = {key: value for key, value in extra.items() if key != "idle_expert_3"}
    idle = extra.get("idle_expert_3", False)
    config = PruneConfig(pattern="2:4", preset=preset, **settings)
    weights, scales, turns = _pruned(source, config, samples, idle)
    assert not turns
    model, _ = load_model(str(source))
    experts = next(m for m in model.modules() if isinstance(m, UnfusedExperts))
    one = 8 * (experts[0].up_proj.in_features ** 2 + experts[0].down_proj.in_features ** 2)  # one expert's
    monkeypatch.setattr(driver, "free_memory", lambda device: 2 * one + 1)  # half of it: an expert at a time
    gathered, collect = [], driver.collect_statistics

    def counted(*args, **kwargs):  # the experts whose statistics each pass gathers
        statistics = collect(*args, **kwargs)
        gathered.append({name.split(".experts.")[1].split(".")[0] for name in statistics.stats if ".experts." in name})
        return statistics

    monkeypatch.setattr(driver, "collect_statistics", counted)
    with caplog.at_level(logging.INFO, logger="thanos.driver"):
        weights_in_turns, scales_in_turns, turns = _pruned(source, config, samples, idle)
    assert max(len(experts_gathered) for experts_gathered in gathered) == 1  # never more than a turn's
    said = [r.getMessage() for r in caplog.records if "gathered in" in r.getMessage()]
    assert said and all(f"gathered in {len(experts)} turns" in message for message in said), said
    # each expert's report says which of the turns gathered its statistics; no other linear's has one
    assert next(turn for name, turn in turns.items() if ".layers.1." in name and name.endswith(".experts.2.down_proj")) \
        == [3, len(experts)]
    assert all(".experts." in name for name in turns)
    assert weights_in_turns.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(weights_in_turns[name], tensor), name
    assert scales_in_turns == scales and bool(scales) == ("quantize" in extra)
    if idle:
        assert "no token reached it" in scales["model.layers.0.mlp.experts.3.up_proj"]["input_range"]


@pytest.mark.parametrize("family, preset, said", [
    ("mixtral", "best", "the 8-bit step after the reconstruction reads every linear's Hessian there"),
    # one norm folds the ranges of every expert's gate/up
    ("gemma4_text_moe", "fast", "smoothing into model.layers.0.pre_feedforward_layernorm_2 reads linears of "
                                "different turns"),
])
def test_where_the_8bit_step_reads_every_experts_statistics_at_once_they_are_gathered_at_once_and_it_says_why(
        family, preset, said, tmp_path_factory, tiny_tokenizer_dir, caplog, monkeypatch):
    from thanos import driver

    source = _save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)
    monkeypatch.setattr(driver, "free_memory", lambda device: 1)
    with caplog.at_level(logging.INFO, logger="thanos.driver"):
        _pruned(source, PruneConfig(pattern="2:4", preset=preset, quantize="int8"), _calibration(source))
    messages = [r.getMessage() for r in caplog.records]
    assert not any("gathered in" in m for m in messages)
    warned = [r for r in caplog.records if "so they are gathered at once" in r.getMessage()]
    assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)  # one per layer
    assert said in warned[0].getMessage()


def test_experts_are_chunked_whole_within_the_budget_in_their_order(tmp_path_factory, tiny_tokenizer_dir):
    from thanos.experts import expert_chunks

    model, _ = load_model(str(_save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)))
    layer, prefix = decoder_layers(model)[0], "model.layers.0."
    names = list(prunable_linears(model, LayerSelection())[0])
    expert = [f"{prefix}mlp.experts.{{}}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    first = layer.mlp.experts[0]
    one = 8 * (first.gate_proj.in_features ** 2 + first.down_proj.in_features ** 2)  # gate and up read one input
    assert expert_chunks(layer, prefix, names, 4 * one) == []  # all four fit at once
    assert expert_chunks(layer, prefix, names, 2 * one + 1) == [[n.format(e) for e in (0, 1) for n in expert],
                                                                [n.format(e) for e in (2, 3) for n in expert]]
    assert len(expert_chunks(layer, prefix, names, 1)) == 4  # an expert larger than the budget: alone
    # experts left dense (`--exclude`) take no room; a linear of an expert kept alone still counts its input
    kept = [n for n in names if ".experts.0." not in n and not n.endswith("1.down_proj")]
    assert expert_chunks(layer, prefix, kept, 2 * one + 1) == [
        [expert[0].format(1), expert[1].format(1), *(n.format(2) for n in expert)], [n.format(3) for n in expert]]


def test_group_by_group_with_the_attention_left_dense_the_experts_come_first(tmp_path, tmp_path_factory,
                                                                            tiny_tokenizer_dir):
    """With every attention linear excluded, a layer's first group is its experts' gate/up, which the
    first pass (one input kept) does not gather whole: they take a pass of their own (a KeyError before)."""
    source = _save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)
    report = prune_to_directory(PruneJob(out=str(tmp_path / "p"), model=str(source), exclude=("*self_attn*",),
                                         config=PruneConfig(pattern="2:4", preset="fast", sequential=True), **SMALL))
    assert {layer["name"].split(".")[3] for layer in report["layers"]} == {"mlp"}
    assert len(report["layers"]) == 2 * 4 * 3 and all(layer["sparsity"] == 0.5 for layer in report["layers"])


@pytest.mark.gpu
def test_on_a_gpu_the_experts_take_turns_by_its_free_memory_to_the_same_weights(tmp_path_factory, tiny_tokenizer_dir,
                                                                                monkeypatch):
    """The GPU's free memory is read as the driver's free bytes plus what torch's allocator holds unused;
    taken in turns on the GPU, the first layer's weights are those of one pass (the later layers' inputs
    pass the experts' index_add_, whose CUDA order is not fixed)."""
    from thanos import driver
    from thanos.devices import free_memory

    assert 0 < free_memory(torch.device("cuda")) <= torch.cuda.get_device_properties(0).total_memory
    source = _save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)
    samples = _calibration(source)
    config = PruneConfig(pattern="2:4", preset="default")
    weights, _, turns = _pruned(source, config, samples, device="cuda")
    monkeypatch.setattr(driver, "free_memory", lambda device: 1)  # an expert at a time
    in_turns, _, turns_taken = _pruned(source, config, samples, device="cuda")
    assert not turns and turns_taken["model.layers.0.mlp.experts.3.up_proj"] == [4, 4]
    for name, tensor in weights.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(in_turns[name], tensor), name


@pytest.mark.parametrize("sequential", [False, True])
def test_progress_counts_the_linears_solved_in_each_layer(sequential, tmp_path_factory, tiny_tokenizer_dir):
    """A layer of experts is hundreds of solves: `progress` hears each one, the layer's count rising to
    its linears (one pass or group by group)."""
    source = _save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)
    model, _ = load_model(str(source))
    heard = []
    prune(model, PruneConfig(pattern="2:4", preset="fast", sequential=sequential), _calibration(source),
          device="cpu", progress=lambda stage, done, total: heard.append((done, total)) if stage == "linears" else None)
    per_layer = len(prunable_linears(model, LayerSelection())[0])  # 4 attention + 4 experts x 3
    assert heard == [(done, per_layer) for done in range(1, per_layer + 1)] * 2


def test_nemotron_h_counts_experts_only_where_a_layer_holds_them(tmp_path):
    """Nemotron-H's configs name experts (8 by default) whether or not a layer holds them: only layers of
    kind moe do (E in the pattern its released config.json spells), read from the object and the saved dict."""
    import json

    from tests.conftest import tiny_config

    for kind, experts in (("nemotron_h", 0), ("nemotron_h_moe", 4)):
        config = tiny_config(kind)
        config.save_pretrained(tmp_path / kind)
        for form in (config, json.loads((tmp_path / kind / "config.json").read_text())):
            assert expert_count(form) == experts, (kind, type(form))
    for pattern, experts in (("MEM*EM-", 128), ("M-M*-", 0)):
        assert expert_count(dict(model_type="nemotron_h", n_routed_experts=128, hybrid_override_pattern=pattern)) \
            == experts


def test_each_experts_report_counts_the_tokens_routed_to_it(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """The router sends each token to two of the four experts: a layer's experts' statistics sum twice the
    calibration tokens, which each attention linear sees whole."""
    source = _save_tiny("olmoe", tmp_path_factory, tiny_tokenizer_dir)
    report = prune_to_directory(PruneJob(out=str(tmp_path / "p"), model=str(source), evaluate=False,
                                         config=PruneConfig(pattern="2:4", preset="fast"), **SMALL))
    tokens = SMALL["calib_samples"] * SMALL["seqlen"]
    for layer in (0, 1):
        rows = [r for r in report["layers"] if f".layers.{layer}." in r["name"]]
        assert {r["tokens"] for r in rows if ".experts." not in r["name"]} == {tokens}
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert sum(r["tokens"] for r in rows if ".experts." in r["name"] and r["name"].endswith(projection)) \
                == 2 * tokens
