"""GEMM level: dense versus 2:4 semi-structured linears over token counts M, per weight shape."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from runtime_bench.protocol import measure
from thanos.quantize import FORMATS, input_grid, input_scale_of

# (out_features, in_features) of the distinct linears of named models.
SHAPE_SETS = {
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama2-70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}
DEFAULT_TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
OUTLIER_ROWS = 0.05  # the dense-row share timed by the torch-2:4-dense-rows backend (a typical alpha)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8}
FP8 = "float8_e4m3fn"  # weights and activations in FP8 E4M3, products accumulated and returned in bf16
INT8 = "int8"  # weights and activations in INT8, products accumulated in int32
FORMAT_DTYPES = {"fp8": FP8, "int8": INT8}  # a quantized model's format (`--quantize`) -> its GEMM dtype
# 8-bit GEMMs take token counts in multiples of these (torch._int_mm wants more than 16 rows):
# smaller M is padded, as serving stacks do
PADDED_ROWS = {FP8: 16, INT8: 32}
QUANTIZE_SHARE = 0.25  # of a product's time budget, for timing its input's quantization (a cheap pass)


def with_8bit(dtypes: list[str], fmt: Optional[str]) -> list[str]:
    """`dtypes` and, for a model quantized to `fmt`, its 8-bit products beside the floating-point ones."""
    return [*dtypes, FORMAT_DTYPES[fmt]] if fmt in FORMAT_DTYPES else list(dtypes)


def input_quantizers(dtype_name: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """A bf16 input (tokens, in) rounded to the 8-bit grid as `--target torch` does it
    (`exporters.torch_8bit.Sparse8bitLinear.quantize_input`): with one static scale, or with each
    token's own (its largest magnitude found first, the cost per-token scales add)."""
    fmt = FORMATS["fp8" if dtype_name == FP8 else "int8"]
    return {name: lambda x, static=static: input_grid(x, input_scale_of(x, static, fmt), fmt).to(fmt.dtype)
            for name, static in (("input-quantize-static", 1.0), ("input-quantize-per-token", None))}


def two_four_weight(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A random weight with exact 2:4 groups along K (kernel speed depends on shape, not values)."""
    w = torch.randn(rows, cols, device=device, dtype=torch.float32)
    groups = w.reshape(rows, cols // 4, 4)
    drop = torch.topk(groups.abs(), 2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0.0).reshape(rows, cols).to(dtype)


def sparse_backends(device: str) -> dict[str, Optional[str]]:
    """{backend: None if usable here, else the reason it is skipped}."""
    if not device.startswith("cuda"):
        reason = "needs a CUDA GPU (compute capability 8.0+); this run is on the CPU"
        return {"torch-2:4-cusparselt": reason, "torch-2:4-cutlass": reason, "torch-2:4-dense-rows": reason}
    major, _ = torch.cuda.get_device_capability()
    backends = {"torch-2:4-cusparselt": None, "torch-2:4-cutlass": None, "torch-2:4-dense-rows": None}
    if major < 8:
        backends = {k: f"compute capability {major}.x < 8.0" for k in backends}
    elif major >= 9:
        backends["torch-2:4-cutlass"] = "PyTorch's CUTLASS 2:4 kernels are not enabled on Hopper (sm90)"
    return backends


def _sparse_linear(weight: torch.Tensor, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend.endswith("cutlass")
    if backend == "torch-2:4-dense-rows":
        return _split_linear(weight, to_sparse_semi_structured)
    sparse = to_sparse_semi_structured(weight)
    return lambda x: F.linear(x, sparse)


def _split_linear(weight: torch.Tensor, to_sparse) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Thanos alpha > 0 layer as exported with --split-dense-rows: OUTLIER_ROWS of the rows dense."""
    from exporters.row_split import RowSplitLinear, kernel_rows, two_four_rows

    w = weight.clone()
    w[: max(1, round(OUTLIER_ROWS * w.shape[0]))] = torch.randn_like(w[0])  # dense outlier rows
    split = RowSplitLinear(w, None, kernel_rows(two_four_rows(w)))
    split.sparse_rows.weight = torch.nn.Parameter(to_sparse(split.sparse_rows.weight.data), requires_grad=False)
    return split


def run_gemm(shapes: list[tuple[int, int]], tokens: list[int], dtypes: list[str], device: str,
             backends: Optional[list[str]] = None, budget_s: float = 0.5, progress=None,
             sink: Optional[list] = None) -> list[dict]:
    """Time every shape at every M; records go into `sink` as they are measured (and are returned)."""
    records = [] if sink is None else sink
    sparse = sparse_backends(device)
    if backends:
        sparse = {k: v for k, v in sparse.items() if any(k.startswith(b) for b in backends)}
    total = len(shapes) * len(tokens) * len(dtypes)
    done = 0
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        if not device.startswith("cuda") and dtype != torch.float32:
            for shape in shapes:
                records.append(dict(level="gemm", backend="torch-dense", status="skipped", dtype=dtype_name,
                                    shape=list(shape), reason=f"{dtype_name} matmul on the CPU is not a serving path"))
            done += len(shapes) * len(tokens)
            continue
        for rows, cols in shapes:
            def tick():
                nonlocal done
                done += 1
                if progress:
                    progress("gemm", done, total)

            _time_shape(rows, cols, dtype_name, tokens, device, sparse, budget_s, records, tick)
    return records


def _time_shape(rows: int, cols: int, dtype_name: str, tokens: list[int], device: str,
                sparse: dict[str, Optional[str]], budget_s: float, records: list, tick: Callable[[], None]) -> None:
    """Dense and every usable sparse kernel at one shape, every M; a kernel that fails is recorded as
    skipped for this shape (and the Ms it did not reach) with its error, and the others go on."""
    dtype = DTYPES[dtype_name]
    weight = two_four_weight(rows, cols, dtype, device)
    if dtype_name == FP8:
        kernels, reasons = fp8_kernels(weight, sparse)
    elif dtype_name == INT8:
        kernels, reasons = int8_kernels(weight, sparse)
    else:
        kernels = {"torch-dense": lambda x, w=weight: F.linear(x, w)}
        reasons = dict(sparse)  # this shape's own: a conversion that fails here may work at another shape
        for name, reason in sparse.items():
            if reason is None:
                try:
                    kernels[name] = _sparse_linear(weight, name)
                except (RuntimeError, NotImplementedError, ValueError) as exc:
                    reasons[name] = _reason(exc)
    for name, reason in reasons.items():
        if reason is not None:
            records.append(dict(level="gemm", backend=name, status="skipped", reason=reason, dtype=dtype_name,
                                shape=[rows, cols]))
    for m in tokens:
        pad = PADDED_ROWS.get(dtype_name, 1)
        rows_in = -(-m // pad) * pad
        x = torch.randn(rows_in, cols, device=device).to(dtype)
        dense_ms = None
        for name, kernel in list(kernels.items()):
            try:
                t = measure(lambda: kernel(x), device, budget_s=budget_s)
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # the first product runs only here
                records.append(dict(level="gemm", backend=name, status="skipped", reason=_reason(exc),
                                    dtype=dtype_name, shape=[rows, cols], tokens=m))
                if name == "torch-dense":
                    break  # no reference to compare against at this M
                continue
            rec = dict(level="gemm", backend=name, status="ok", dtype=dtype_name, shape=[rows, cols], tokens=m,
                       computed_tokens=rows_in, weight_bytes=weight.numel() * weight.element_size(),
                       tflops=2 * m * rows * cols / (t.median_ms * 1e-3) / 1e12, **t.to_json())
            if name == "torch-dense":
                dense_ms = t.median_ms
            else:
                rec["speedup"] = dense_ms / t.median_ms
            records.append(rec)
        if dtype_name in PADDED_ROWS:
            _time_input_quantizers(dtype_name, rows, cols, m, rows_in, dense_ms, device, budget_s, records)
        tick()


def _time_input_quantizers(dtype_name: str, rows: int, cols: int, m: int, rows_in: int, dense_ms: Optional[float],
                           device: str, budget_s: float, records: list) -> None:
    """What rounding the product's input costs, beside the dense 8-bit product's time at this M."""
    source = torch.randn(rows_in, cols, device=device, dtype=torch.bfloat16)
    for name, quantize in input_quantizers(dtype_name).items():
        try:
            t = measure(lambda: quantize(source), device, budget_s=budget_s * QUANTIZE_SHARE)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            records.append(dict(level="gemm", backend=name, status="skipped", reason=_reason(exc), dtype=dtype_name,
                                shape=[rows, cols], tokens=m))
            continue
        records.append(dict(level="gemm", backend=name, status="ok", dtype=dtype_name, shape=[rows, cols], tokens=m,
                            computed_tokens=rows_in, share_of_dense_product=t.median_ms / dense_ms if dense_ms else None,
                            **t.to_json()))


def fp8_kernels(weight: torch.Tensor, sparse: dict[str, Optional[str]]) -> tuple[dict, dict]:
    """FP8 E4M3 products with unit scales (the speed does not depend on them): dense through
    `torch._scaled_mm`, 2:4 through cuSPARSELt (`torch._cslt_compress` / `_cslt_sparse_mm`).
    Returns (kernels, this shape's skip reasons)."""
    one = torch.ones((), device=weight.device)
    kernels = {"torch-dense": lambda x: torch._scaled_mm(x, weight.t(), scale_a=one, scale_b=one,
                                                         out_dtype=torch.bfloat16)}
    reasons = {name: reason or "no FP8 2:4 kernel in this backend" for name, reason in sparse.items()}
    if weight.is_cuda and torch.cuda.get_device_capability(weight.device) < (8, 9):
        return {}, {"torch-dense": "FP8 needs compute capability 8.9+", **{n: "FP8 needs compute capability 8.9+"
                                                                         for n in sparse}}
    _add_cusparselt(kernels, reasons, weight, sparse, torch.bfloat16)
    return kernels, reasons


def int8_kernels(weight: torch.Tensor, sparse: dict[str, Optional[str]]) -> tuple[dict, dict]:
    """INT8 products (int32 accumulation): dense through `torch._int_mm`, 2:4 through cuSPARSELt
    (`torch._cslt_compress` / `_cslt_sparse_mm`, int32 out). Returns (kernels, this shape's skip reasons)."""
    kernels = {"torch-dense": lambda x: torch._int_mm(x, weight.t())}
    reasons = {name: reason or "no INT8 2:4 kernel in this backend" for name, reason in sparse.items()}
    _add_cusparselt(kernels, reasons, weight, sparse, torch.int32)
    return kernels, reasons


def _add_cusparselt(kernels: dict, reasons: dict, weight: torch.Tensor, sparse: dict[str, Optional[str]],
                    out_dtype: torch.dtype) -> None:
    """The 8-bit 2:4 kernel of cuSPARSELt where that backend is usable here, else its reason."""
    if sparse.get("torch-2:4-cusparselt", "") is not None:
        return
    try:
        compressed = torch._cslt_compress(weight)
        kernels["torch-2:4-cusparselt"] = lambda x: torch._cslt_sparse_mm(compressed, x.t(), out_dtype=out_dtype).t()
        reasons["torch-2:4-cusparselt"] = None
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        reasons["torch-2:4-cusparselt"] = _reason(exc)


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def crossovers(records: list[dict]) -> list[dict]:
    """Per (backend, dtype, shape): the smallest M from which the sparse kernel stays faster."""
    out = {}
    for r in records:
        if r["status"] == "ok" and "speedup" in r:
            out.setdefault((r["backend"], r["dtype"], tuple(r["shape"])), []).append((r["tokens"], r["speedup"]))
    rows = []
    for (backend, dtype, shape), points in sorted(out.items()):
        points.sort()
        cross = None
        for i, (m, _) in enumerate(points):
            if all(s > 1.0 for _, s in points[i:]):
                cross = m
                break
        rows.append(dict(backend=backend, dtype=dtype, shape=list(shape), crossover_tokens=cross,
                         best_speedup=max(s for _, s in points), speedup_at_max_tokens=points[-1][1]))
    return rows
