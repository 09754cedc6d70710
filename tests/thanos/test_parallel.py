import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from tests import processes
from tests.thanos import dist_worker
from tests.thanos.test_driver import SMALL, assert_same_scales
from thanos import PruneConfig
from thanos.parallel import Parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, job_kwargs: dict, die_on_layer: int = -1, free_bytes=None) -> list[int]:
    ctx = processes.context()
    port = _free_port()
    procs = [ctx.Process(target=dist_worker.run, args=(r, world, port, job_kwargs, die_on_layer, free_bytes))
             for r in range(world)]
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


def _single(job_kwargs: dict, free_bytes=None) -> None:
    """The same prune in this process, at the ranks' one thread (thread counts change BLAS round-off, ranks
    do not); `free_bytes`: the free memory it reports."""
    from thanos import driver
    from thanos.pipeline import PruneJob, prune_to_directory

    threads, free_memory = torch.get_num_threads(), driver.free_memory
    torch.set_num_threads(1)
    if free_bytes is not None:
        driver.free_memory = lambda device: free_bytes
    try:
        prune_to_directory(PruneJob(**job_kwargs))
    finally:
        torch.set_num_threads(threads)
        driver.free_memory = free_memory


@pytest.mark.parametrize("config", [dict(preset="default"), dict(preset="best"),
                                    dict(preset="default", permute_channels=True),
                                    dict(quantize="fp8")],  # the default's 8-bit solves go group by group
                         ids=["default", "best", "permuted", "fp8"])
def test_two_gloo_ranks_equal_one_process(tiny_llama_dir, tmp_path, config):
    # 8 samples: two reconstruction steps per epoch, each mixing samples of both ranks
    common = dict(model=str(tiny_llama_dir), evaluate=False, config=PruneConfig(**config),
                  **{**SMALL, "calib_samples": 8})
    _single(dict(out=str(tmp_path / "single"), **common))
    assert _launch(2, dict(out=str(tmp_path / "dist"), **common)) == [0, 0]
    _assert_same_model(tmp_path / "single", tmp_path / "dist")


@pytest.mark.parametrize("config", [dict(preset="default"), dict(preset="default", quantize="int8")],
                         ids=["default", "int8"])  # INT8: each chunk smoothed and quantized in its last turn
def test_ranks_with_different_free_memory_take_the_experts_in_the_same_turns(config, tmp_path, tmp_path_factory,
                                                                           tiny_tokenizer_dir):
    """Each rank makes a layer's passes in step with the others': the turns follow the least free
    memory of any rank (rank 1's here, an expert at a time), and the weights are one process's in
    those turns (which are one pass's: tests/thanos/test_experts.py)."""
    from tests.conftest import _save_tiny

    source = _save_tiny("mixtral", tmp_path_factory, tiny_tokenizer_dir)
    one = 8 * (64 ** 2 + 128 ** 2)  # an expert's statistics: gate/up read a 64-wide input, down_proj 128
    common = dict(model=str(source), evaluate=False, config=PruneConfig(**config), **SMALL)
    _single(dict(out=str(tmp_path / "single"), **common), free_bytes=2 * one + 1)
    assert _launch(2, dict(out=str(tmp_path / "dist"), **common), free_bytes=[10 ** 12, 2 * one + 1]) == [0, 0]
    _assert_same_model(tmp_path / "single", tmp_path / "dist")
    report = json.loads((tmp_path / "dist" / "thanos_report.json").read_text())
    assert report["layers"][-1]["name"].endswith("experts.3.down_proj") and report["layers"][-1]["statistics_turn"] == [4, 4]


def test_two_gloo_ranks_prune_gemma4s_small_releases_as_one_process(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """Each rank walks its own samples' per-layer embeddings and the keys and values its layers pass on
    (layer_arguments records them for this rank's samples): the weights are one process's."""
    from tests.conftest import _save_tiny

    source = _save_tiny("gemma4_text_ple", tmp_path_factory, tiny_tokenizer_dir)
    common = dict(model=str(source), evaluate=False, config=PruneConfig(preset="best"), **SMALL)
    _single(dict(out=str(tmp_path / "single"), **common))
    assert _launch(2, dict(out=str(tmp_path / "dist"), **common)) == [0, 0]
    _assert_same_model(tmp_path / "single", tmp_path / "dist")


def _assert_same_model(path_a, path_b):
    """The same weights, bit for bit: ranks and one process read the same statistics and gradients."""
    model_a, model_b = (AutoModelForCausalLM.from_pretrained(p) for p in (path_a, path_b))
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert_same_scales(path_a, path_b)


def test_shutdown_frees_the_group_after_transformers_loaded_a_model(tiny_llama_dir):
    """A group still referenced at exit is torn down by interpreter finalization, where gloo sometimes aborts
    a finished rank (one CI run in many lost its second rank that way); shutdown must be its last owner."""
    proc = mp.get_context("spawn").Process(target=dist_worker.group_refs_after_shutdown,
                                           args=(_free_port(), str(tiny_llama_dir)))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0, f"{proc.exitcode} references to the process group outlive shutdown()"


def test_dead_rank_then_rerun_resumes(tiny_llama_dir, tmp_path):
    common = dict(model=str(tiny_llama_dir), evaluate=False, **SMALL)
    out = tmp_path / "dist"
    codes = _launch(2, dict(out=str(out), **common), die_on_layer=1)
    assert codes[1] == 3 and codes[0] != 0  # rank 0 ends with an error instead of hanging
    assert (out / ".thanos_partial" / "layer_00000.safetensors").is_file()
    assert not (out / "thanos_report.json").exists()
    assert _launch(2, dict(out=str(out), **common)) == [0, 0]
    _single(dict(out=str(tmp_path / "single"), **common))
    _assert_same_model(tmp_path / "single", out)


def test_prune_and_build_under_two_ranks_exports_once(tiny_llama_dir, tmp_path):
    """Every rank prunes; rank 0 alone exports and writes the summary, and alone speaks."""
    ctx = processes.context()
    port = _free_port()
    out = tmp_path / "build"
    procs = [ctx.Process(target=dist_worker.run_build,
                         args=(r, 2, port, dict(out=str(out), target="safetensors"),
                               dict(model=str(tiny_llama_dir), calib_samples=4, seqlen=32))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (out / "build_summary.json").is_file() and (out / "safetensors" / "export_summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "build.rank0.txt", "build.rank1.txt"]
    assert "summary    " in (tmp_path / "build.rank0.txt").read_text()
    assert (tmp_path / "build.rank1.txt").read_text() == ""
