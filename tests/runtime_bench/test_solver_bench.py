import json

import pytest

from runtime_bench import solver


def test_solver_bench_reference_gives_the_same_error():
    records = solver.run(["64x128"], ["thanos", "sparsegpt", "wanda"], ["2:4"], [32], "cpu", echo=lambda _: None)
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"thanos", "sparsegpt", "wanda", "thanos (per-block)"}
    assert by_method["thanos (per-block)"]["error"] == pytest.approx(by_method["thanos"]["error"], rel=1e-4)
    assert by_method["thanos"]["error"] < by_method["wanda"]["error"]


def test_solver_bench_cli_writes_machine_and_records(tmp_path):
    out = tmp_path / "solver.json"
    solver.main(["--shapes", "32x64", "--methods", "magnitude", "--patterns", "4:8", "--block-sizes", "32",
                 "--device", "cpu", "--json-out", str(out)])
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
