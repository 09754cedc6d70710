"""Fresh processes for the tests that need them (the ranks of a process group, a run killed half-way):
forked from one server that imported torch, transformers and the project once per test process,
instead of a Python start-up and its imports for every process of every test. The server only imports
(no torch work, no thread pool), so each child starts as a spawned one would but for those imports, and
sets its own thread count."""
import textwrap

import torch.multiprocessing as mp

PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "thanos.pipeline", "exporters",
           "cli", "tests.thanos.dist_worker", "tests.processes"]


def context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call of a test process
    return ctx


def run_script(code: str, timeout: float = 300) -> int:
    """Run `code` (with `os` and `signal` imported) at one thread in a fresh process: its exit code,
    -N where signal N ended it."""
    process = context().Process(target=_run, args=("import os, signal\n" + textwrap.dedent(code),))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"the script ran past {timeout} s")
    return process.exitcode


def _run(script: str) -> None:
    import torch

    torch.set_num_threads(1)
    exec(compile(script, "<test script>", "exec"), {"__name__": "__test_script__"})
