"""Reports: report.json (machine, settings, results), report.md (tables + plots), PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from runtime_bench.gemm import crossovers
from thanos.outputs import atomic_write_text


def write_report(out: Path, machine: dict, settings: dict, records: list[dict], json_only: bool = False) -> dict:
    """report.json, then (unless `json_only`: while measuring, where plots would cost more than the
    figures) the plots and report.md; each file replaced whole, never left half-written."""
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(machine=machine, settings=settings, results=list(records), crossovers=crossovers(records))
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1, default=str))
    if not json_only:
        atomic_write_text(out / "report.md", _markdown(summary, _plots(out, records)))
    return summary


def _plots(out: Path, records: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    gemm = [r for r in records if r["level"] == "gemm" and r["status"] == "ok" and "speedup" in r]
    if gemm:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = {}
        for r in gemm:
            series.setdefault(f"{r['shape'][0]}x{r['shape'][1]} {r['dtype']} {r['backend']}", []).append(
                (r["tokens"], r["speedup"]))
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xscale("log", base=2)
        names.append(_save(plt, fig, ax, out / "gemm_speedup.png", "tokens M", "dense time / 2:4 time",
                           "2:4 speed-up versus tokens"))
    model = [r for r in records if r["level"] == "model" and r["status"] == "ok" and r.get("phase") == "prefill"]
    if model:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = {}
        for r in model:
            series.setdefault(r["backend"], []).append((f"{r['batch']}x{r['seqlen']}", r["median_ms"]))
        width = 0.8 / len(series)
        labels = sorted({p[0] for points in series.values() for p in points}, key=lambda s: [int(v) for v in s.split("x")])
        for i, (backend, points) in enumerate(sorted(series.items())):
            values = dict(points)
            ax.bar([j + i * width for j in range(len(labels))], [values.get(l, 0) for l in labels], width, label=backend)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels)
        names.append(_save(plt, fig, ax, out / "model_latency.png", "batch x sequence", "prefill median ms",
                           "prefill latency by backend"))
    return names


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _precision(record: dict) -> str:
    """'int8 + float32' for an 8-bit graph whose other operations run in float32 ('int8 fused + float32'
    for a GenAI folder written with --fused-int8); else the dtype."""
    dtype = record.get("dtype", "-")
    if not record.get("quantization"):
        return dtype
    return f"{record['quantization']}{' fused' if record.get('fused_int8') else ''} + {dtype}"


def _markdown(summary: dict, plots: list[str]) -> str:
    m = summary["machine"]
    lines = ["# runtime_bench report", "",
             f"Machine: GPU {m.get('gpu') or 'none'} (capability {m.get('compute_capability')}, driver {m.get('driver')}, "
             f"CUDA {m.get('cuda')}), CPU {m.get('cpu')} x{m.get('cpu_threads')} threads; torch {m.get('torch')}, "
             f"transformers {m.get('transformers')}, onnxruntime {m.get('onnxruntime')}, tensorrt {m.get('tensorrt')}.",
             "", f"Settings: `{json.dumps(summary['settings'])}`", ""]
    gemm = [r for r in summary["results"] if r["level"] == "gemm" and r["status"] == "ok"]
    if gemm:
        lines += ["## GEMM level", "", "| backend | dtype | shape (out x in) | tokens | median ms | p90 ms | TFLOP/s | speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in gemm:  # an input-quantize row has no flop: its last column is its time over the dense product's
            tflops = f"{r['tflops']:.2f}" if "tflops" in r else "-"
            last = (f"{r['speedup']:.2f}x" if "speedup" in r else
                    f"{r['share_of_dense_product']:.2f} of dense" if r.get("share_of_dense_product") else "-")
            lines.append(f"| {r['backend']} | {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | "
                         f"{r['median_ms']:.4f} | {r['p90_ms']:.4f} | {tflops} | {last} |")
    if summary["crossovers"]:
        lines += ["", "Crossover: the smallest token count from which 2:4 stays faster than dense.", "",
                  "| backend | dtype | shape | crossover M | best speedup | speedup at largest M |", "|---|---|---|---|---|---|"]
        for c in summary["crossovers"]:
            lines.append(f"| {c['backend']} | {c['dtype']} | {c['shape'][0]}x{c['shape'][1]} | "
                         f"{c['crossover_tokens'] if c['crossover_tokens'] is not None else 'never'} | "
                         f"{c['best_speedup']:.2f}x | {c['speedup_at_max_tokens']:.2f}x |")
    model = [r for r in summary["results"] if r["level"] == "model" and r["status"] == "ok"]
    if model:
        lines += ["", "## Model level", "",
                  "| backend | provider | precision | phase | batch x seq | median ms | p90 ms | tokens/s | peak memory |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in model:
            lines.append(f"| {r['backend']} | {r.get('provider', '-')} | {_precision(r)} | {r['phase']} | "
                         f"{r['batch']}x{r['seqlen']} | {r['median_ms']:.2f} | "
                         f"{r['p90_ms']:.2f} | {r['tokens_per_s']:.1f} | "
                         f"{(r.get('peak_memory_bytes') or 0) / 2**20:.0f} MiB ({r['memory_kind']}) |")
    skipped = [r for r in summary["results"] if r["status"] == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""]
        seen = set()
        for r in skipped:
            key = (r["level"], r["backend"], r["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['level']} / {r['backend']}: {r['reason']}")
    for name in plots:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"
