import inspect
import json
from unittest.mock import patch

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from exporters import ExportOptions, export
from exporters.onnx_export import onnx_weight_patterns, run_onnxruntime, write_onnx
from exporters.onnx_graph import TOLERANCE

pytestmark = pytest.mark.onnx


@pytest.mark.parametrize("fixture", ["pruned_llama_2of4", "pruned_gpt2_2of4"])
def test_onnx_export_keeps_2of4_and_matches_pytorch(request, fixture, tmp_path):
    summary = export("onnx", request.getfixturevalue(fixture), tmp_path, ExportOptions(dtype="float32"))
    assert summary["validation"]["max_abs_diff"] <= summary["validation"]["tolerance"]
    layers = onnx_weight_patterns(tmp_path / "model.onnx")
    pruned = [l for l in layers if l.pattern]
    assert len(pruned) == summary["layers_with_nm_pattern"] == (8 if "gpt2" in fixture else 21)  # every pruned linear
    assert all(l.pattern == "2:4" for l in pruned)


def test_onnx_float16_runs_with_dynamic_axes(pruned_llama_2of4, tmp_path):
    import onnx

    export("onnx", pruned_llama_2of4, tmp_path, ExportOptions(dtype="float16", with_cache=True))
    for graph in ("model.onnx", "model_with_cache.onnx"):  # every linear runs in float16, o_proj too
        proto = onnx.load(str(tmp_path / graph))
        inits = {t.name: t.data_type for t in proto.graph.initializer}
        weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        assert len(weights) == 21 and set(weights) == {onnx.TensorProto.FLOAT16}, graph  # the tied head: a Transpose
    model = AutoModelForCausalLM.from_pretrained(pruned_llama_2of4)
    for batch, seq in [(1, 5), (3, 17)]:
        ids = torch.randint(0, 384, (batch, seq))
        logits = run_onnxruntime(tmp_path / "model.onnx", ids, torch.ones_like(ids))
        assert logits.shape == (batch, seq, 384) and logits.dtype == np.float16
        expected = model(ids).logits.detach().numpy()
        assert np.abs(logits.astype(np.float32) - expected).max() < 0.05 * np.abs(expected).max()


def test_large_models_use_external_data(pruned_llama_2of4, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(pruned_llama_2of4)
    write_onnx(model, tmp_path / "model.onnx", external_data_threshold=1024)  # pretend 1 KiB is "over 2 GB"
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    ids = torch.randint(0, 384, (1, 6))
    logits = run_onnxruntime(tmp_path / "model.onnx", ids, torch.ones_like(ids))
    _assert_logits_close(logits, model(ids).logits.detach().numpy())
    assert any(l.pattern == "2:4" for l in onnx_weight_patterns(tmp_path / "model.onnx"))


@pytest.mark.parametrize("tied", [True, False])
def test_tied_lm_head_shares_the_embedding_bytes(tied, tmp_path):
    import onnx
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    write_onnx(model, tmp_path / "model.onnx")
    proto = onnx.load(str(tmp_path / "model.onnx"))
    vocab_sized = [t.name for t in proto.graph.initializer if 1000 in t.dims]
    assert len(vocab_sized) == (1 if tied else 2)  # the untied head is a weight of its own
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no scratch files left behind
    ids = torch.randint(0, 1000, (2, 7))
    logits = run_onnxruntime(tmp_path / "model.onnx", ids, torch.ones_like(ids))
    _assert_logits_close(logits, model(ids).logits.detach().numpy())


def _assert_logits_close(logits: np.ndarray, expected: np.ndarray) -> None:
    """Within the exporter's own fp32 check: a share of the logits' largest magnitude (other kernels sum
    in another order)."""
    assert np.abs(logits - expected).max() <= TOLERANCE["float32"] * np.abs(expected).max()


@pytest.mark.parametrize("fixture", ["pruned_llama_2of4", "pruned_gpt2_2of4"])
def test_kv_cache_graph_decodes_like_pytorch(request, fixture, tmp_path):
    summary = export("onnx", request.getfixturevalue(fixture), tmp_path,
                     ExportOptions(dtype="float32", with_cache=True))
    cached = summary["with_cache"]
    assert cached["validation"]["greedy_tokens_agree"] == 1.0  # prefill + 8 steps, one row left-padded
    assert cached["validation"]["max_abs_diff"] <= cached["validation"]["tolerance"]
    assert cached["layers_with_nm_pattern"] == summary["layers_with_nm_pattern"]  # 2:4 survives here too


def test_kv_cache_graph_takes_any_batch_and_past_length(pruned_llama_2of4, tmp_path):
    from exporters.onnx_cache import OnnxDecoder, write_onnx_with_cache

    model = AutoModelForCausalLM.from_pretrained(pruned_llama_2of4)
    write_onnx_with_cache(model, tmp_path / "cached.onnx")
    decoder = OnnxDecoder(tmp_path / "cached.onnx")
    for batch, prompt in [(1, 1), (3, 11)]:
        ids = torch.randint(0, 384, (batch, prompt))
        tokens, logits = decoder.generate(ids.numpy(), np.ones((batch, prompt), np.int64), steps=3)
        assert tokens.shape == (batch, 3) and logits.shape == (batch, prompt, 384)
        with torch.no_grad():
            expected = model(ids).logits.numpy()
        _assert_logits_close(logits, expected)


@pytest.mark.parametrize("with_cache", [False, True])
def test_eval_runs_the_exported_onnx(pruned_llama_2of4, tmp_path, with_cache):
    from exporters.onnx_graph import evaluate_onnx
    from thanos.models import load_model
    from thanos.pipeline import evaluate_model

    export("onnx", pruned_llama_2of4, tmp_path, ExportOptions(dtype="float32", with_cache=with_cache, validate=False))
    graph = tmp_path / ("model_with_cache.onnx" if with_cache else "model.onnx")
    onnx_result = evaluate_onnx(graph, seqlen=32, max_windows=4)
    model, tokenizer = load_model(str(pruned_llama_2of4))
    largest = []
    model.register_forward_hook(lambda module, args, out: largest.append(float(out.logits.abs().max())))
    torch_result = evaluate_model(model, tokenizer, str(pruned_llama_2of4), None, 32, torch.device("cpu"), 4, "cpu")
    assert onnx_result["device"] == "onnxruntime CPUExecutionProvider" and onnx_result["windows"] == 4
    # logits within the exporter's fp32 share of their largest magnitude move each token's loss, and so
    # the log-perplexity, by at most twice that
    bound = 2 * TOLERANCE["float32"] * max(largest)
    assert abs(np.log(onnx_result["perplexity"]) - np.log(torch_result["perplexity"])) <= bound
    # the export's folder stands for its model.onnx (it has no config.json to be read as a model directory)
    from click.testing import CliRunner

    from cli import main

    shown = CliRunner().invoke(main, ["eval", str(tmp_path), "--seqlen", "32", "--windows", "4", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["perplexity"] == evaluate_onnx(tmp_path / "model.onnx", seqlen=32,
                                                                   max_windows=4)["perplexity"]
    inspected = [CliRunner().invoke(main, ["inspect", str(where), "--json"]) for where in (tmp_path,
                                                                                          tmp_path / "model.onnx")]
    assert inspected[0].exit_code == 0 and inspected[0].output == inspected[1].output, inspected[0].output


def test_a_weight_past_float16s_range_is_refused_before_the_cast(pruned_llama_2of4, tmp_path):
    """float16 tops out at 65504: a cast of a larger weight would give infinity, so the default (float16)
    export refuses, naming the weight and the dtypes that hold it; float32 exports it."""
    from exporters.base import ExportError

    model = AutoModelForCausalLM.from_pretrained(pruned_llama_2of4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 0] = 1e5
    model.save_pretrained(tmp_path / "loud")
    for name in ("thanos_report.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "loud" / name).write_bytes((pruned_llama_2of4 / name).read_bytes())
    with pytest.raises(ExportError, match=r"model.layers.1.mlp.down_proj.weight holds 1e\+05, past float16's "
                                          r"largest value \(65504\).*--dtype bfloat16 where the target has it"):
        export("onnx", tmp_path / "loud", tmp_path / "fp16", ExportOptions())
    assert not (tmp_path / "fp16").exists()
    summary = export("onnx", tmp_path / "loud", tmp_path / "fp32", ExportOptions(dtype="float32"))
    assert summary["validation"]["max_abs_diff"] <= summary["validation"]["tolerance"]


def test_longrope_switches_frequencies_in_the_graph_as_transformers_does(tmp_path, tmp_path_factory,
                                                                         tiny_tokenizer_dir):
    """Phi-3's longrope uses other rotary frequencies once a call's positions pass the pretraining
    length (56 here): the graph must follow on both sides, not freeze the example's side."""
    from tests.conftest import _pruned, _save_tiny

    pruned = _pruned(tmp_path_factory, _save_tiny("phi3", tmp_path_factory, tiny_tokenizer_dir), "2:4", preset="fast")
    export("onnx", pruned, tmp_path, ExportOptions(dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert model.model.rotary_emb.rope_type == "longrope"
    for length in (40, 100):
        ids = torch.randint(0, 384, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = model(ids).logits.numpy()
        got = run_onnxruntime(tmp_path / "model.onnx", ids, torch.ones_like(ids))
        _assert_logits_close(got, expected)
        if length > 56:  # the short frequencies throughout (a frozen branch) would be far off
            short = model.model.rotary_emb.original_inv_freq
            with torch.no_grad(), patch.object(model.model.rotary_emb, "forward",
                                               lambda x, position_ids: _rotary(model, x, position_ids, short)):
                frozen = model(ids).logits.numpy()
            assert np.abs(frozen - expected).max() > 100 * np.abs(got - expected).max()


def _rotary(model, x, position_ids, inv_freq):
    rotary = model.model.rotary_emb
    saved, rotary.inv_freq = rotary.inv_freq, inv_freq
    try:
        return inspect.unwrap(type(rotary).forward)(rotary, x, position_ids)
    finally:
        rotary.inv_freq = saved


def test_rotary_frequencies_that_follow_each_calls_length_are_refused(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """'dynamic' rope rescales its frequencies continuously with the length: a trace would freeze one."""
    from exporters.base import ExportError
    from tests.conftest import _pruned, _save_tiny

    source = _save_tiny("llama", tmp_path_factory, tiny_tokenizer_dir, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    pruned = _pruned(tmp_path_factory, source, "2:4", preset="fast")
    with pytest.raises(ExportError, match="rope type dynamic.*cannot follow"):
        export("onnx", pruned, tmp_path / "onnx", ExportOptions(dtype="float32"))
    assert not (tmp_path / "onnx").exists()
