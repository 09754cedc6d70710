import pytest

from thanos import PruneConfig
from thanos.pipeline import PruneJob, prune_to_directory


def _pruned(tmp_path_factory, model_dir, pattern, **config):
    out = tmp_path_factory.mktemp(f"pruned_{pattern.replace(':', 'of')}")
    prune_to_directory(PruneJob(out=str(out / "m"), model=str(model_dir), config=PruneConfig(pattern=pattern, **config),
                                calib_samples=4, seqlen=32, evaluate=False, device="cpu"))
    return out / "m"


@pytest.fixture(scope="session")
def pruned_llama_2of4(tmp_path_factory, tiny_llama_dir):
    return _pruned(tmp_path_factory, tiny_llama_dir, "2:4")


@pytest.fixture(scope="session")
def pruned_llama_4of8(tmp_path_factory, tiny_llama_dir):
    return _pruned(tmp_path_factory, tiny_llama_dir, "4:8")


@pytest.fixture(scope="session")
def pruned_gpt2_2of4(tmp_path_factory, tiny_gpt2_dir):
    return _pruned(tmp_path_factory, tiny_gpt2_dir, "2:4")
