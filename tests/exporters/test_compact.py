import pytest
import torch
from transformers import AutoModelForCausalLM

from exporters import ExportOptions, export, load_compact
from exporters.compact import COMPACT_FILE, compress
from thanos.compact import decompress


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_compress_round_trips_bits(n, m):
    w = torch.randn(32, 64).half()
    groups = w.reshape(32, -1, m)
    drop = torch.topk(groups.abs(), n, dim=-1, largest=False).indices
    w = groups.scatter(-1, drop, 0.0).reshape(32, 64)
    w[0, 0], w[3, 5] = -0.0, 0.0  # signed zeros and extra zeros must survive too
    parts = compress(w, n, m)
    back = decompress(parts["values"], parts["keep"], tuple(w.shape))
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))
    assert parts["values"].shape == (32, 64 * (m - n) // m)


def test_compress_refuses_a_broken_pattern():
    assert compress(torch.ones(4, 8), 2, 4) is None


@pytest.mark.parametrize("fixture", ["pruned_llama_2of4", "pruned_gpt2_2of4"])
def test_compact_checkpoint_is_small_and_exact(request, fixture, tmp_path):
    pruned = request.getfixturevalue(fixture)
    summary = export("safetensors", pruned, tmp_path / "c", ExportOptions(dtype="float16"))
    assert summary["round_trip"] == "bit-exact"
    assert summary["ratio"] <= 0.5625  # kept fp16 values + one bit per dense weight
    original = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float16).state_dict()
    reloaded = load_compact(tmp_path / "c").state_dict()
    assert set(original) == set(reloaded)
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert (tmp_path / "c" / COMPACT_FILE).stat().st_size < sum(
        t.numel() * t.element_size() for t in original.values())


def test_compact_stores_4of8(pruned_llama_4of8, tmp_path):
    summary = export("safetensors", pruned_llama_4of8, tmp_path / "c", ExportOptions(dtype="float16"))
    assert summary["compact_layers"] == 21 and summary["ratio"] <= 0.5625


def test_eval_accepts_a_compact_directory(pruned_llama_2of4, tmp_path):
    from thanos.pipeline import evaluate_directory

    export("safetensors", pruned_llama_2of4, tmp_path / "c", ExportOptions(dtype="float32"))
    dense = evaluate_directory(str(pruned_llama_2of4), seqlen=32, device="cpu", max_windows=2)
    compact = evaluate_directory(str(tmp_path / "c"), seqlen=32, device="cpu", max_windows=2)
    assert compact["perplexity"] == dense["perplexity"]


@pytest.mark.parametrize("flag", ["with_cache", "split_dense_rows"])
def test_options_for_other_targets_are_refused(pruned_llama_2of4, tmp_path, flag):
    from exporters import ExportError

    with pytest.raises(ExportError, match="applies to the"):
        export("safetensors", pruned_llama_2of4, tmp_path, ExportOptions(**{flag: True}))
    assert not any(tmp_path.iterdir())  # refused before writing anything
