"""Nothing the user has is lost: outputs never replace their inputs, and --overwrite waits for success."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from cli import main
from exporters import ExportOptions, export

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--device", "cpu", "--quiet", "--no-eval"]


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prune_refuses_an_output_that_is_or_holds_the_input_model(tiny_llama_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    before = _files(model)
    runner = CliRunner()
    for out in (model, tmp_path, model / "inner"):
        result = runner.invoke(main, ["prune", "--model", str(model), "--out", str(out), "--overwrite", *SMALL])
        assert result.exit_code == 1, result.output
        assert "the input" in result.output and "Traceback" not in result.output
    assert _files(model) == before


def test_failed_overwrite_keeps_the_finished_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    runner = CliRunner()
    assert runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), *SMALL]).exit_code == 0
    before = _files(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    failed = runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), "--overwrite",
                                  "--calib-file", str(empty), *SMALL])
    assert failed.exit_code == 1 and "holds no text" in failed.output
    assert _files(out) == before
    replaced = runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), "--overwrite",
                                    "--pattern", "4:8", *SMALL])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "thanos_report.json").read_text())["config"]["pattern"] == "4:8"
    assert not list(tmp_path.glob(".pruned.*")), "staging or replaced folders left behind"


def test_export_refuses_to_write_into_its_source_or_a_foreign_folder(pruned_llama_2of4, tmp_path):
    before = _files(pruned_llama_2of4)
    runner = CliRunner()
    into_source = runner.invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors",
                                       "--out", str(pruned_llama_2of4)])
    assert into_source.exit_code == 1 and "is the input" in into_source.output
    assert "Traceback" not in into_source.output
    assert _files(pruned_llama_2of4) == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    refused = runner.invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(foreign)])
    assert refused.exit_code == 1 and "not empty" in refused.output
    assert _files(foreign) == {foreign.relative_to(foreign) / "mine.txt": b"keep me"}


def test_export_replaces_an_earlier_export_only_with_overwrite(pruned_llama_2of4, tmp_path):
    out = tmp_path / "compact"
    export("safetensors", pruned_llama_2of4, out, ExportOptions(dtype="float16"))
    again = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    replaced = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(out),
                                         "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "export_summary.json").read_text())["dtype"]["export"] == "float32"


def test_a_refused_export_leaves_no_folder(pruned_llama_4of8, tmp_path):
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["export", str(pruned_llama_4of8), "--target", "tensorrt", "--out", str(out)])
    assert result.exit_code == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_compact_export_keeps_the_source_dtype_by_default(pruned_llama_2of4, tmp_path):
    out = tmp_path / "compact"
    result = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "safetensors", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cast" not in result.output
    source = AutoModelForCausalLM.from_pretrained(pruned_llama_2of4).state_dict()
    from exporters import load_compact

    reloaded = load_compact(out).state_dict()
    assert all(reloaded[k].dtype == v.dtype and (reloaded[k] == v).all() for k, v in source.items())


@pytest.mark.onnx
def test_onnx_export_reports_its_cast(pruned_llama_2of4, tmp_path):
    result = CliRunner().invoke(main, ["export", str(pruned_llama_2of4), "--target", "onnx", "--out",
                                       str(tmp_path / "onnx"), "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "cast       weights float32 -> float16" in result.output


def test_inspect_never_runs_a_folders_code(tmp_path, pruned_llama_2of4):
    folder = tmp_path / "remote"
    shutil.copytree(pruned_llama_2of4, folder)
    config = json.loads((folder / "config.json").read_text())
    # An architecture transformers does not know, so only the folder's code could load it.
    config["model_type"] = "evil_arch"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n")
    runner = CliRunner()
    for command in (["inspect", str(folder)], ["eval", str(folder), "--device", "cpu"],
                    ["export", str(folder), "--target", "safetensors", "--out", str(tmp_path / "e")]):
        result = runner.invoke(main, command, input="y\ny\n")  # a user who would answer yes to a prompt
        assert not marker.exists(), command
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output


# --- staging folders, locks, unwritable and full disks -------------------------------------------

def _refused(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_a_folder_at_the_staging_name_is_never_removed(tiny_llama_dir, pruned_llama_2of4, tmp_path):
    runner = CliRunner()
    as_input = tmp_path / ".pv.staging"  # the model sits where `--out pv` would be staged
    shutil.copytree(tiny_llama_dir, as_input)
    before = _files(as_input)
    _refused(runner.invoke(main, ["prune", "--model", str(as_input), "--out", str(tmp_path / "pv"), *SMALL]),
             ".pv.staging", "the input")
    assert _files(as_input) == before

    source = tmp_path / ".victim.staging"  # an export whose source sits at its staging name
    shutil.copytree(pruned_llama_2of4, source)
    before_source = _files(source)
    _refused(runner.invoke(main, ["export", str(source), "--target", "safetensors", "--out", str(tmp_path / "victim")]),
             ".victim.staging")
    assert _files(source) == before_source and not (tmp_path / "victim").exists()

    foreign = tmp_path / ".mine.staging"  # not an input, but not the tool's either
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    _refused(runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "mine"), *SMALL]),
             "was not made by thanos-export")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_overwrite_never_removes_a_folder_named_like_its_aside(tiny_llama_dir, tmp_path):
    """The old output is moved aside into a fresh folder of the run's own, never onto a fixed name."""
    runner = CliRunner()
    out = tmp_path / "pv"
    assert runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), *SMALL]).exit_code == 0
    model = tmp_path / ".pv.replaced"
    shutil.copytree(tiny_llama_dir, model)
    before = _files(model)
    again = runner.invoke(main, ["prune", "--model", str(model), "--out", str(out), "--overwrite", *SMALL])
    assert again.exit_code == 0, again.output
    assert _files(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pv.replaced", "pv"]


def test_a_second_run_into_a_locked_output_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "pv"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom thanos.outputs import output_lock\n"
                               f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        runner = CliRunner()
        _refused(runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), *SMALL]),
                 "another thanos-export run", str(holder.pid))
        _refused(runner.invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "safetensors",
                                      "--out", str(out), *SMALL]), "another thanos-export run")
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays behind
        holder.wait()
    assert (tmp_path / ".pv.lock").exists() and not out.exists()
    # The system released the dead holder's lock: the stale file does not block the next run.
    done = CliRunner().invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(out), *SMALL])
    assert done.exit_code == 0, done.output
    assert not (tmp_path / ".pv.lock").exists()


def test_an_unwritable_output_is_refused_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    import thanos.pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(thanos.pipeline, "load_model", never)
    runner = CliRunner()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused(runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(a_file / "sub"), *SMALL]),
             "is a file")
    _refused(runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(a_file), *SMALL]),
             "is a file")
    with _mounted(tmp_path / "ro", "ro,size=1m"):
        _refused(runner.invoke(main, ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "ro" / "o"),
                                      *SMALL]), "cannot be written")
        _refused(runner.invoke(main, ["export", str(tiny_llama_dir), "--target", "safetensors",
                                      "--out", str(tmp_path / "ro" / "e")]), "cannot be written")


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tiny_llama_dir, tmp_path):
    """A disk that fills while the model is saved: one line, the staging folder gone, the layers kept."""
    disk = tmp_path / "disk"
    out = disk / "pv"
    args = ["prune", "--model", str(tiny_llama_dir), "--out", str(out), *SMALL]
    with _mounted(disk, "size=600k"):  # the three saved layers fit, the whole model beside them does not
        full = CliRunner().invoke(main, args)
        _refused(full, "is full", "run the same command again", ".thanos_partial")
        assert sorted(p.name for p in disk.iterdir()) == ["pv"]  # no staging folder keeps the disk full
        assert len(list((out / ".thanos_partial").glob("layer_*.safetensors"))) == 3
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        resumed = CliRunner().invoke(main, args)
        assert resumed.exit_code == 0, resumed.output
        assert (out / "thanos_report.json").is_file() and not (out / ".thanos_partial").exists()


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: No space left on device (os error 28)",  # as in safetensors 0.8
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
])
def test_a_full_disk_is_recognised_in_either_safetensors_message(message, tmp_path):
    """safetensors' errors carry the system's error number only in their text, worded by its version."""
    from thanos.outputs import write_error

    refusal = write_error(Exception(message), tmp_path / "out")
    assert refusal is not None and "is full" in str(refusal)
    assert write_error(Exception(message.replace("28", "5")), tmp_path / "out") is None  # EIO: not ours to word


@contextlib.contextmanager
def _mounted(path, options):
    """A small tmpfs at `path` (root only): real read-only and full disks, not simulated ones."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); this test runs where CI runs as root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"this machine refuses to mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# --- prune-and-build: the build folder is one output ---------------------------------------------

def test_a_failed_build_overwrite_keeps_the_old_build_and_resumes(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    import runtime_bench.build
    from exporters import ExportError

    out = tmp_path / "build"
    runner = CliRunner()
    build = ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "safetensors", "--out", str(out), *SMALL]
    assert runner.invoke(main, build).exit_code == 0
    before = _files(out)

    real_export, calls = runtime_bench.build.export, []

    def failing_export(*args, **kwargs):
        calls.append(1)
        raise ExportError("the export broke")

    monkeypatch.setattr(runtime_bench.build, "export", failing_export)
    failed = runner.invoke(main, [*build, "--overwrite", "--pattern", "4:8"])
    assert failed.exit_code == 1 and failed.output.endswith("Error: the export broke\n"), failed.output
    assert _files(out) == before  # the old model, export and summary, all together
    staging = tmp_path / ".build.staging"
    assert (staging / "pruned" / "thanos_report.json").is_file()  # the finished pruning is kept for the rerun
    assert "running the same command again resumes" in caplog.text

    monkeypatch.setattr(runtime_bench.build, "export", real_export)
    pruned_at = (staging / "pruned" / "thanos_report.json").stat().st_mtime_ns
    caplog.clear()
    again = runner.invoke(main, [*build, "--overwrite", "--pattern", "4:8"])
    assert again.exit_code == 0, again.output
    assert "reusing it" in caplog.text  # the rerun did not prune again
    assert (out / "pruned" / "thanos_report.json").stat().st_mtime_ns == pruned_at
    summary = json.loads((out / "build_summary.json").read_text())
    assert json.loads((out / "pruned" / "thanos_report.json").read_text())["config"]["pattern"] == "4:8"
    assert summary["export"] == str(out / "safetensors") and str(staging) not in json.dumps(summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]


def test_prune_and_build_refuses_a_finished_build_without_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "build"
    build = ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "safetensors", "--out", str(out), *SMALL]
    assert CliRunner().invoke(main, build).exit_code == 0
    before = _files(out)
    _refused(CliRunner().invoke(main, build), "already holds a finished build", "--overwrite")
    assert _files(out) == before


def test_prune_and_build_exports_the_model_in_memory(tiny_llama_dir, tmp_path, monkeypatch):
    """The export takes the pruned model as saved, without reading the directory back; the result is
    the same export (checked bit for bit by the compact round trip)."""
    import thanos.models

    real, loaded = thanos.models.load_model, []

    def counting(path=None, *args, **kwargs):
        loaded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(thanos.models, "load_model", counting)
    monkeypatch.setattr("thanos.pipeline.load_model", counting)
    monkeypatch.setattr("exporters.source.load_model", counting)
    out = tmp_path / "build"
    done = CliRunner().invoke(main, ["prune-and-build", "--model", str(tiny_llama_dir), "--target", "safetensors",
                                     "--out", str(out), *SMALL])
    assert done.exit_code == 0, done.output
    assert loaded == [str(tiny_llama_dir)]  # the source model, once; never the pruned directory
    summary = json.loads((out / "safetensors" / "export_summary.json").read_text())
    assert summary["round_trip"] == "bit-exact"
    from exporters import load_compact

    saved = AutoModelForCausalLM.from_pretrained(out / "pruned").state_dict()
    compact = load_compact(out / "safetensors").state_dict()
    assert all(torch.equal(compact[k], v) for k, v in saved.items())  # the export is the directory's model
