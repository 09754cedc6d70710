import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from tests.thanos import dist_worker
from tests.thanos.test_driver import SMALL, pruned_weights
from thanos import PruneConfig
from thanos.parallel import Parallel
from thanos.pipeline import PruneJob, prune_to_directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, job_kwargs: dict, die_on_layer: int = -1) -> list[int]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=dist_worker.run, args=(r, world, port, job_kwargs, die_on_layer)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    return [p.exitcode for p in procs]


def test_owners_balance_cost():
    group = Parallel()
    group.world = 2
    owners = group.owners({"big": 10.0, "mid": 6.0, "small": 5.0})
    assert owners == {"big": 0, "mid": 1, "small": 1}


@pytest.mark.parametrize("preset", ["default", "best"])
def test_two_gloo_ranks_match_one_process(tiny_llama_dir, tmp_path, preset):
    # 8 samples: two reconstruction steps per epoch, each mixing samples of both ranks
    common = dict(model=str(tiny_llama_dir), evaluate=False, config=PruneConfig(preset=preset),
                  **{**SMALL, "calib_samples": 8})
    prune_to_directory(PruneJob(out=str(tmp_path / "single"), **common))
    assert _launch(2, dict(out=str(tmp_path / "dist"), **common)) == [0, 0]
    single = pruned_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "single"))
    dist = pruned_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "dist"))
    for name in single:
        assert torch.equal(single[name] == 0, dist[name] == 0), name  # the same masks
        assert torch.allclose(single[name], dist[name], atol=1e-5, rtol=1e-4), name  # fp32 round-off


def test_dead_rank_then_rerun_resumes(tiny_llama_dir, tmp_path):
    common = dict(model=str(tiny_llama_dir), evaluate=False, **SMALL)
    out = tmp_path / "dist"
    codes = _launch(2, dict(out=str(out), **common), die_on_layer=1)
    assert codes[1] == 3 and codes[0] != 0  # rank 0 ends with an error instead of hanging
    assert (out / ".thanos_partial" / "layer_00000.safetensors").is_file()
    assert not (out / "thanos_report.json").exists()
    assert _launch(2, dict(out=str(out), **common)) == [0, 0]
    prune_to_directory(PruneJob(out=str(tmp_path / "single"), **common))
    single = pruned_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "single"))
    resumed = pruned_weights(AutoModelForCausalLM.from_pretrained(out))
    assert all(torch.allclose(single[n], resumed[n], atol=1e-5, rtol=1e-4) for n in single)
