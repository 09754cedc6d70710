"""Entry point of the processes that tests/thanos/test_parallel.py spawns (must be importable)."""
import os


def run(rank: int, world: int, port: int, job_kwargs: dict, die_on_layer: int = -1,
        free_bytes: "list[int] | None" = None) -> None:
    """One rank of `prune --distributed`; `free_bytes[rank]`: the free memory this rank reports."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    from thanos import driver
    from thanos.parallel import shutdown
    from thanos.pipeline import PruneJob, prune_to_directory

    if free_bytes is not None:
        driver.free_memory = lambda device: free_bytes[rank]

    if rank == 1 and die_on_layer >= 0:
        original, calls = driver.prune_layer, []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) > die_on_layer:
                os._exit(3)  # a rank that dies mid-run, without cleaning up
            return original(*args, **kwargs)

        driver.prune_layer = dying
    try:
        prune_to_directory(PruneJob(distributed=True, **job_kwargs))
    finally:
        shutdown()


def group_refs_after_shutdown(port: int, model_dir: str) -> None:
    """Exit with how many references to the group outlive shutdown() (0: it is freed before exit).

    A fresh process, since the import that pins the group happens once per process.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import sys

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from thanos.parallel import init_from_env, shutdown

    init_from_env()
    group = dist.group.WORLD
    AutoModelForCausalLM.from_pretrained(model_dir)  # imports torch.distributed.nn, now that the group exists
    shutdown()
    sys.exit(sys.getrefcount(group) - 2)  # less this function's name and getrefcount's argument


def run_build(rank: int, world: int, port: int, build_kwargs: dict, prune_kwargs: dict) -> None:
    """One rank of `prune-and-build --distributed`, through the CLI as torchrun would run it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import contextlib
    import io
    import sys

    import torch

    torch.set_num_threads(1)
    from cli import main

    args = ["prune-and-build", "--distributed", "--quiet", "--no-eval", "--device", "cpu"]
    for key, value in {**build_kwargs, **prune_kwargs}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            main(args, standalone_mode=False)
        except SystemExit as exc:
            sys.exit(exc.code)
    with open(build_kwargs["out"] + f".rank{rank}.txt", "w") as f:
        f.write(printed.getvalue())
