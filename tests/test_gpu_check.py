"""scripts/gpu_check.sh, dry-run on the CPU: every step runs and leaves its files, so the day a GPU
is lent the script cannot come back empty for a reason a CPU could have shown."""
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="the script needs bash and coreutils' timeout")
def test_every_step_of_the_device_script_runs_on_the_cpu(tmp_path):
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", OUT=str(tmp_path), OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    log = (tmp_path / "gpu_check.log").read_text()
    steps = re.findall(r"^=== (.+): exit (\d+)", log, flags=re.M)
    assert len(steps) == 9, log
    assert all(code == "0" for _, code in steps), log
    assert done.returncode == 0, done.stderr
    for name in ("gemm.tar.gz", "model8.tar.gz", "model.tar.gz"):
        with tarfile.open(tmp_path / name) as archive:
            assert any(member.name.endswith("report.json") for member in archive.getmembers()), name
    with tarfile.open(tmp_path / "model8.tar.gz") as archive:  # the random model made 8-bit, and timed
        report = json.load(archive.extractfile("model8/report.json"))
    assert report["settings"]["quantize"] == "fp8"
    assert any(r["backend"] == "torch-dense" and r["status"] == "ok" for r in report["results"])
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    for name in ("plan_llama2-70b_default.json", "plan_llama2-70b_default_tf32.json", "plan_llama2-70b_fast.json"):
        plan = json.loads((tmp_path / name).read_text())
        (kind,) = plan["kinds"]
        assert plan["complete"] and len(kind["layer"]["seconds"]["solves"]) == 7, name
        assert kind["layer"]["tf32_products"] is name.endswith("_tf32.json"), name
    from runtime_bench.plan import markdown_from_json  # the device run brings back the JSON; the Markdown is rebuilt

    assert "products in TF32" in markdown_from_json(tmp_path / "plan_llama2-70b_default_tf32.json")
    solver = json.loads((tmp_path / "solver_gpu.json").read_text())
    assert solver["complete"] and {r["method"] for r in solver["results"]} >= {"thanos", "sparsegpt"}
