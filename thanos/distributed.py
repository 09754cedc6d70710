"""`torchrun --nproc-per-node N -m thanos.distributed <prune options>`: prune across processes.

Same options as `thanos-export prune`; each rank runs a shard of the calibration samples and
solves its share of every layer's linears; rank 0 writes the one output directory, which is
resumable exactly as in single-process mode.
"""
import sys

from cli import main as cli_main


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--distributed" not in args:
        args.append("--distributed")
    cli_main(["prune", *args], prog_name="python -m thanos.distributed")


if __name__ == "__main__":
    main()
