import json

import pytest
import torch
from click.testing import CliRunner

from runtime_bench import plan
from tests.conftest import FAMILIES
from thanos.config import PruneConfig

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def measured():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=plan.PLAN_VOCAB)
    return plan.measure_layer(config, PruneConfig(pattern="2:4"), samples=3, seqlen=16, device="cpu",
                              dtype=torch.float32, echo=lambda _: None)


def test_one_layer_is_measured_step_by_step(measured):
    solves = measured["seconds"]["solves"]
    assert [name.rsplit(".", 1)[-1] for name in solves] == LINEARS
    assert all(t > 0 for t in solves.values())
    b = measured["bytes"]
    # q/k/v share one 64 x 64 Hessian and gate/up another; o_proj has its own; down_proj reads 128 wide;
    # fp64 sums while the statistics stream
    assert b["hessians"] == 8 * (3 * 64 * 64 + 128 * 128)
    assert measured["prune"]["permute_channels"] and measured["seconds"]["permutation"] > 0  # timed as a step
    assert b["activations"] == 2 * 3 * 16 * 64 * 4
    assert b["device_peak"] is None  # no allocator peak on the CPU


def test_plan_divides_passes_and_deals_solves(measured):
    s = measured["seconds"]
    one, two, many = plan.plan(measured, layers=10, ranks=[1, 2, 8])
    everything = (s["load"] + s["statistics"] + s["forward"] + s["unload"] + s["permutation"]
                  + sum(s["solves"].values()))
    assert one["seconds_per_layer"] == pytest.approx(everything)
    assert one["hours_total"] * 3600 == pytest.approx(10 * everything)
    assert one["collective_bytes_per_layer"] == 0 < two["collective_bytes_per_layer"]
    assert max(s["solves"].values()) <= two["solve_seconds_per_layer"] <= sum(s["solves"].values())
    assert many["solve_seconds_per_layer"] == pytest.approx(max(s["solves"].values()))  # 7 linears, 8 ranks
    assert many["activation_bytes_per_rank"] == measured["bytes"]["activations"] / 8


def test_group_by_group_the_ranks_wait_for_each_groups_slowest_solve(measured):
    """Sequentially the ranks share out one group (q/k/v, o, gate/up, down) at a time, so with a rank
    per linear a layer's solves take the sum of each group's longest, not the longest of all."""
    import copy

    groups = [[name.rsplit(".", 1)[-1] for name in group] for group in measured["groups"]]
    assert groups == [LINEARS[:3], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    sequential = copy.deepcopy(measured)
    sequential["prune"]["sequential"] = True
    s = measured["seconds"]["solves"]
    one, many = plan.plan(sequential, layers=10, ranks=[1, 8])
    assert one["solve_seconds_per_layer"] == pytest.approx(sum(s.values()))
    assert many["solve_seconds_per_layer"] == pytest.approx(sum(max(s[name] for name in group)
                                                                for group in measured["groups"]))
    assert many["solve_seconds_per_layer"] > plan.plan(measured, layers=10, ranks=[8])[0]["solve_seconds_per_layer"]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_the_plan_times_the_8bit_step_as_prune_runs_it(fmt):
    """With the 8-bit step the default preset solves group by group; the weights' rounding is its own
    row, not counted in the statistics, and INT8 smooths as `prune` does (the model's smoothing groups)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=plan.PLAN_VOCAB)
    measured = plan.measure_layer(config, PruneConfig(pattern="2:4", quantize=fmt), samples=3, seqlen=16,
                                  device="cpu", dtype=torch.float32, echo=lambda _: None)
    s = measured["seconds"]
    assert measured["prune"]["sequential"] and measured["prune"]["quantize"] == fmt
    assert s["quantization"] > 0 and s["statistics"] > 0
    one = plan.plan(measured, layers=1, ranks=[1])[0]
    assert one["seconds_per_layer"] == pytest.approx(s["load"] + s["statistics"] + s["forward"] + s["unload"]
                                                     + s["permutation"] + s["quantization"] + sum(s["solves"].values()))
    kinds = [dict(first=0, count=1, label="", layer=measured)]
    text = plan.markdown(kinds, plan.plan_model(kinds, [1]), "tiny", 1, {"cpu": "test"})
    assert f"| {fmt} weights, every linear" in text
    # with a rank per linear, the step takes each batch's slowest linear: FP8 quantizes group by group,
    # INT8 (smoothed at the layer's end) all seven at once
    q = s["quantizations"]
    assert sum(q.values()) == pytest.approx(s["quantization"]) and len(q) == len(LINEARS)
    assert measured["quantized_by_group"] == (fmt == "fp8")
    batches = measured["groups"] if fmt == "fp8" else [list(q)]
    many = plan.plan(measured, layers=1, ranks=[8])[0]
    assert many["seconds_per_layer"] - many["solve_seconds_per_layer"] == pytest.approx(
        s["load"] + (s["statistics"] + s["forward"]) / 8 + s["unload"] + s["permutation"]
        + sum(max(q[name] for name in batch) for batch in batches))


def test_cli_writes_plan_files(tmp_path):
    out_json, out_md = tmp_path / "plan.json", tmp_path / "plan.md"
    from cli import main

    result = CliRunner().invoke(main, ["plan", "--config", "smollm2-135m", "--device", "cpu", "--calib-samples", "2",
                                            "--seqlen", "32", "--ranks", "1,4", "--json-out", str(out_json),
                                            "--md-out", str(out_md)])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert data["layers"] == 30 and [r["ranks"] for r in data["plan"]] == [1, 4]
    assert data["machine"]["torch"] == torch.__version__
    assert "| 4 |" in out_md.read_text() and "self_attn.q_proj" in out_md.read_text()
    md, (kind,) = out_md.read_text(), data["kinds"]  # its layers are all of one kind
    assert kind["count"] == 30 and kind["layer"]["tf32_products"] is False and "every product in full fp32" in md
    q_proj = next(name for name in kind["layer"]["errors"] if name.endswith("q_proj"))
    assert f"; error {kind['layer']['errors'][q_proj]:.4g} |" in md  # each solve's layer error beside its time
    result = CliRunner().invoke(main, ["plan", "--config", "smollm2-135m", "--device", "cpu", "--calib-samples", "2",
                                       "--seqlen", "32", "--ranks", "1", "--tf32", "--json-out", str(out_json),
                                       "--md-out", str(out_md)])
    assert result.exit_code == 0, result.output
    assert json.loads(out_json.read_text())["kinds"][0]["layer"]["tf32_products"] is True
    assert "products in TF32 (errors in full fp32)" in out_md.read_text()


def test_a_plan_stopped_by_sigterm_keeps_the_solves_it_timed(tmp_path, monkeypatch):
    """A time limit's SIGTERM after two solves: the JSON holds those two, marked incomplete, and says why."""
    import os
    import signal

    real = plan.prune_layer

    def terminated_after_two_solves(step, config, progress, parallel, on_report):
        def report_then_maybe_stop(report):
            on_report(report)
            if len(seen := [*report_then_maybe_stop.seen, report["name"]]) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            report_then_maybe_stop.seen = seen

        report_then_maybe_stop.seen = []
        return real(step, config, progress, parallel, report_then_maybe_stop)

    monkeypatch.setattr(plan, "prune_layer", terminated_after_two_solves)
    def stop(signum, frame):  # what the CLI's commands do with a time limit's SIGTERM
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    out = tmp_path / "plan.json"
    try:
        with pytest.raises(KeyboardInterrupt):
            plan.run_plan("smollm2-135m", "cpu", (1,), 2, 32, json_out=str(out), echo=lambda _: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["plan"] is None and "SIGTERM" in data["stopped"]
    layer = data["kinds"][0]["layer"]
    assert [n.rsplit(".", 1)[-1] for n in layer["seconds"]["solves"]] == ["q_proj", "k_proj"]
    assert all(e > 0 for e in layer["errors"].values())


def test_counted_refit_flop_is_what_the_refit_multiplies():
    """The refit's count (first residual + one product per iteration, 2 r c^2 each) against torch's
    own count of the products the refit after a search runs, its comparison with the solver's
    result included (it reads the errors the solver and the refit tracked: no product)."""
    from torch.utils.flop_counter import FlopCounterMode

    from thanos.api import _refit_
    from thanos.hessian import Curvature
    from thanos.mask_search import SearchResult
    from thanos.recipe import Refit
    from thanos.solvers import SolverOutput

    rows, cols, iterations = 24, 32, 7
    W = torch.randn(rows, cols)
    X = torch.randn(64, cols)
    Hd = Curvature(X.T @ X / 64).damped(0.01)
    mask = torch.rand(rows, cols) < 0.5
    solved = SolverOutput(W.masked_fill(mask, 0.0), mask, error=float("inf"))
    found = SearchResult(W.masked_fill(mask, 0.0), mask, 0.0)
    with FlopCounterMode(display=False) as counter:
        _refit_(solved, found, W, Hd, Refit(iterations, tolerance=0.0))
    assert solved.mask is mask  # the searched support was kept
    assert counter.get_total_flops() == Refit(iterations).cost(rows, cols).flop


def test_count_only_counts_every_step_of_every_linear_without_running(tmp_path):
    from cli import main

    out = tmp_path / "work.json"
    result = CliRunner().invoke(main, ["plan", "--config", "llama2-70b", "--count-only", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| mlp.down_proj | 8192 x 28672 |" in result.output and "peak memory" in result.output
    work = json.loads(out.read_text())["kinds"][0]["work"]
    assert [name.rsplit(".", 1)[-1] for name in work] == LINEARS
    down, q = work["model.layers.0.mlp.down_proj"], work["model.layers.0.self_attn.q_proj"]
    assert list(down["flop"]) == ["solve", "mask_search", "refit"]  # the default preset's per-linear steps
    assert down["peak_bytes"] > q["peak_bytes"] and down["flop"]["mask_search"] > q["flop"]["mask_search"]
    fp8 = plan.count_work("llama2-70b", PruneConfig(preset="default", quantize="fp8"))["model.layers.0.mlp.down_proj"]
    assert list(fp8["flop"]) == ["solve", "mask_search", "refit", "quantize"]
    assert 0 < fp8["flop"]["quantize"] < fp8["flop"]["refit"]
    fast = plan.count_work("llama2-70b", PruneConfig(preset="fast"))
    assert list(fast["model.layers.0.mlp.down_proj"]["flop"]) == ["solve"]
    assert fast["model.layers.0.mlp.down_proj"]["peak_bytes"] < down["peak_bytes"]


def test_a_plan_reads_the_shapes_of_any_supported_model_directory(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """`--config` takes a model directory or its config.json (the weights are not read): here a Gemma 3
    with sliding-window layers; the layer count comes from its config, the linears from its family."""
    from cli import main
    from tests.conftest import _save_tiny

    source = _save_tiny("gemma3_text", tmp_path_factory, tiny_tokenizer_dir)
    (source / "model.safetensors").unlink()  # the config is all a plan reads
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", "--config", str(source / "config.json"), "--device", "cpu",
                                       "--calib-samples", "2", "--seqlen", "16", "--ranks", "1",
                                       "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (kind,) = data["kinds"]  # sliding-window and full attention: the same linears, one kind
    assert data["layers"] == kind["count"] == 2 and kind["layer"]["config"]["hidden_size"] == 64
    assert [name.rsplit(".", 1)[-1] for name in kind["layer"]["seconds"]["solves"]] == LINEARS
    counted = CliRunner().invoke(main, ["plan", "--config", str(source), "--count-only"])
    assert counted.exit_code == 0 and "| mlp.down_proj | 64 x 128 |" in counted.output, counted.output
    from transformers import AutoConfig

    AutoConfig.for_model("mamba", hidden_size=64, num_hidden_layers=1).save_pretrained(tmp_path / "ssm")
    for config, refusal in ((tmp_path / "missing", "neither a known config"),
                            (tmp_path, "transformers cannot read a config there"),
                            (tmp_path / "ssm", "is a 'mamba' model; supported: ")):
        refused = CliRunner().invoke(main, ["plan", "--config", str(config), "--count-only"])
        assert refused.exit_code == 1 and refusal in refused.output, refused.output


def _one_layer_more(kind: str) -> dict:
    """A tiny family's settings for one decoder layer more than its own (two, unless it says otherwise),
    its per-layer lists (such as the layers' kinds) repeating their first entry: a kind that comes back."""
    layers = FAMILIES[kind].get("num_hidden_layers", 2)
    per_layer = {key: [*value, value[0]] for key, value in FAMILIES[kind].items()
                 if isinstance(value, list) and len(value) == layers}
    return dict(num_hidden_layers=layers + 1, **per_layer)


@pytest.mark.parametrize("kind, labels, solves", [
    # Qwen3.5 alternates linear-attention and full-attention layers, whose linears differ
    ("qwen3_5_text", ["linear attention", "full attention"], ["linear_attn.in_proj_qkv", "self_attn.q_proj"]),
    # DeepSeek V3's first layers have a dense MLP, the others 256 experts (here 4) and a shared one
    ("deepseek_v3", ["dense MLP", "experts"], ["mlp.down_proj", "mlp.experts.*.down_proj (4 experts)"])])
def test_a_plan_times_one_layer_of_each_kind_and_counts_each_for_its_layers(kind, labels, solves, tmp_path,
                                                                            tmp_path_factory, tiny_tokenizer_dir):
    """A model whose layers are of more than one kind is planned from one layer of each: the whole
    model's time is each kind's layer time by its layer count (one kind for all made DeepSeek V3's
    plan a dense layer's, a tenth of its work)."""
    from cli import main
    from tests.conftest import _save_tiny

    source = _save_tiny(kind, tmp_path_factory, tiny_tokenizer_dir, **_one_layer_more(kind))
    out, md = tmp_path / "plan.json", tmp_path / "plan.md"
    result = CliRunner().invoke(main, ["plan", "--config", str(source), "--device", "cpu", "--calib-samples", "2",
                                       "--seqlen", "16", "--ranks", "1,2", "--preset", "fast", "--json-out", str(out),
                                       "--md-out", str(md)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [(k["first"], k["label"]) for k in data["kinds"]] == [(0, labels[0]), (1, labels[1])]
    assert sum(k["count"] for k in data["kinds"]) == data["layers"] == 3
    for kind, solve in zip(data["kinds"], solves):
        assert f"model.layers.0.{solve.replace('*', '0').split(' ')[0]}" in kind["layer"]["seconds"]["solves"]
        assert f"| solve {solve} |" in md.read_text()
    for ranks, row in zip((1, 2), data["plan"]):
        each = plan.plan_model(data["kinds"], [ranks])[0]["kinds"]
        assert row["hours_total"] == pytest.approx(sum(k["count"] * r["seconds_per_layer"] / 3600
                                                       for k, r in zip(data["kinds"], each)))
    assert f"(3 decoder layers: {data['kinds'][0]['count']} {labels[0]}, " in md.read_text()
    assert plan.markdown_from_json(out) == md.read_text()
    shapes = set(plan.config_linear_shapes(str(source)))  # `bench --shapes DIR`: every kind's GEMMs
    for kind in data["kinds"]:
        assert {tuple(w["shape"]) for w in kind["layer"]["work"].values()} <= shapes
    counted = CliRunner().invoke(main, ["plan", "--config", str(source), "--count-only"])
    assert counted.exit_code == 0 and f"## {labels[1]}: " in counted.output, counted.output


def test_a_plan_says_where_the_experts_statistics_take_turns_on_its_device(tmp_path, tmp_path_factory,
                                                                          tiny_tokenizer_dir, monkeypatch):
    """A layer of experts whose statistics exceed half the free memory is timed as pruning runs it, in
    turns, and the plan says how many (a pass through the layer each)."""
    from cli import main
    from tests.conftest import _save_tiny
    from thanos import driver

    source = _save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)
    monkeypatch.setattr(driver, "free_memory", lambda device: 1)  # an expert at a time
    out, md = tmp_path / "plan.json", tmp_path / "plan.md"
    result = CliRunner().invoke(main, ["plan", "--config", str(source), "--device", "cpu", "--calib-samples", "2",
                                       "--seqlen", "16", "--ranks", "1", "--preset", "fast", "--json-out", str(out),
                                       "--md-out", str(md)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["kinds"][0]["layer"]["statistics_turns"] == 4  # its 4 experts
    assert "were gathered in 4 turns, a pass through the layer each" in md.read_text()
    assert plan.markdown_from_json(out) == md.read_text()


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_the_one_layer_model_of_each_kind_has_that_layers_linears(kind):
    """Each kind's one-layer model, built as the full model builds that layer, prunes the linears of
    the full model's layer of that index (experts unfused), with their shapes, on the meta device."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config
    from thanos.experts import unfuse_experts_
    from thanos.linears import weight_view
    from thanos.models import LayerSelection, prunable_linears

    config = tiny_config(kind, **_one_layer_more(kind))
    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(config)
        unfuse_experts_(whole)
    linears = prunable_linears(whole, LayerSelection())
    kinds = plan.layer_kinds(config)
    assert sum(k["count"] for k in kinds) == config.num_hidden_layers
    for k in kinds:
        want = {name.replace(f".{k['first']}.", ".0.", 1): tuple(weight_view(m).shape)
                for name, m in linears[k["first"]].items()}
        assert {name: tuple(weight_view(m).shape) for name, m in plan._meta_layer_linears(config, k["first"]).items()} \
            == want, k


@pytest.mark.parametrize("ranks", [(0,), (1, 0), ()])
def test_plan_refuses_rank_counts_below_one_before_any_work(ranks, tmp_path):
    from thanos.errors import InputError

    with pytest.raises(InputError, match="--ranks are process counts, 1 or more"):
        plan.run_plan("llama2-70b", "cpu", ranks, count_only=True, json_out=str(tmp_path / "p.json"))
    assert not (tmp_path / "p.json").exists()
