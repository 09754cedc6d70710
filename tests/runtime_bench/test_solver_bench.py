import json

import pytest
import torch

from runtime_bench import solver


def test_solver_bench_reference_gives_the_same_error():
    records = solver.run(["64x128"], ["thanos", "sparsegpt", "wanda"], ["2:4"], [32], "cpu", echo=lambda _: None)
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"thanos", "sparsegpt", "wanda", "thanos (per-block)"}
    # two fp32 solves over c = 128 inputs: each error is a sum with c * eps relative round-off, of weights
    # whose own round-off the solves amplify by up to c
    c = 128
    assert by_method["thanos (per-block)"]["error"] == pytest.approx(by_method["thanos"]["error"],
                                                                      rel=c * c * torch.finfo(torch.float32).eps)
    assert by_method["thanos"]["error"] < by_method["wanda"]["error"]


def test_solver_bench_cli_writes_machine_and_records(tmp_path):
    out = tmp_path / "solver.json"
    from click.testing import CliRunner

    from cli import main

    result = CliRunner().invoke(main, ["bench-solvers", "--shapes", "32x64", "--methods", "magnitude", "--patterns",
                                       "4:8", "--block-sizes", "32", "--device", "cpu", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == "cpu" and data["machine"]["cpu"]
    assert [r["method"] for r in data["results"]] == ["magnitude", "thanos (per-block)"]


def test_repeat_times_each_solve_that_often_and_keeps_the_fastest(monkeypatch):
    calls = []
    real = solver.prune_weight

    def counting(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result.seconds)
        return result

    monkeypatch.setattr(solver, "prune_weight", counting)
    records = solver.run(["32x64"], ["thanos"], ["2:4"], [32], "cpu", per_block=False, echo=lambda _: None, repeat=3)
    assert len(calls) == 3 + 1  # three timed runs, plus the warm-up's one
    assert records[0]["repeat"] == 3 and records[0]["seconds"] == min(calls[1:])


def test_reference_sparsegpt_equals_the_projects_sparsegpt():
    """The authors' route (a second factorisation of the inverse) and ours (one Cholesky and a
    triangular inverse) reach the same factor, so the same mask and, to round-off, the same weights."""
    from thanos.config import Pattern

    W, H = solver.layer_problem(64, 256, "cpu")
    reference = solver.reference_sparsegpt(W, H, Pattern.parse("2:4"), 0.5)
    ours = solver.prune_weight(W, H, "sparsegpt", "2:4", block_size=solver.REFERENCE_BLOCK)
    assert torch.equal(reference == 0, ours.mask)
    # fp32 round-off of the two factor routes, carried through c column updates of unit-scale weights
    bound = 256 * 256 * torch.finfo(torch.float32).eps * float(W.abs().max())
    assert float((reference - ours.weight).abs().max()) <= bound


def test_preset_rows_and_the_reference_in_one_run():
    records = solver.run(["32x64"], ["sparsegpt:reference", "thanos:fast", "thanos:default"], ["2:4"], [32], "cpu",
                         per_block=False, echo=lambda _: None)
    by_method = {r["method"]: r for r in records}
    assert list(by_method) == ["sparsegpt:reference", "thanos:fast", "thanos:default"]
    assert by_method["sparsegpt:reference"]["block_size"] == solver.REFERENCE_BLOCK
    assert by_method["thanos:default"]["block_size"] == 32
    assert by_method["thanos:default"]["error"] < by_method["thanos:fast"]["error"]  # the search and refit pay
    with pytest.raises(ValueError, match="thanos:turbo"):
        solver.run(["32x64"], ["thanos:turbo"], ["2:4"], [32], "cpu", echo=lambda _: None)


def test_8bit_rows_time_the_step_and_measure_the_quantized_weight():
    records = solver.run(["32x64"], ["thanos:fast", "thanos:fast+fp8", "thanos:fast+int8"], ["2:4"], [32], "cpu",
                         per_block=False, echo=lambda _: None)
    fast, fp8, int8 = records
    assert "quantize_seconds" not in fast
    for row in (fp8, int8):
        assert 0 < row["quantize_seconds"] < row["seconds"]
        assert row["error"] > fast["error"]  # the same solve, then the weights rounded to 8 bits


def test_solver_bench_refuses_a_bad_shape_or_method_before_any_work(tmp_path):
    from thanos.errors import InputError

    for shapes, methods, message in ((["4096"], ["thanos"], "not ROWSxCOLS"), (["32x64"], ["thanos:turbo"], "turbo"),
                                     (["32x64"], ["thanos:fast+fp4"], "fp4")):
        with pytest.raises(InputError, match=message):
            solver.bench(shapes, methods, ["2:4"], [32], "cpu", json_out=str(tmp_path / "s.json"))
    assert not (tmp_path / "s.json").exists()
