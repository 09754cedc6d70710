"""8-bit linears in an ONNX graph: QuantizeLinear / DequantizeLinear pairs (QDQ) around each MatMul.

A model pruned with `--quantize` carries, per linear, 8-bit weight values with one scale per
output channel and one static input scale (`thanos.quantized_model`). The traced graph holds the
dequantized weights as float initializers; `insert_qdq` rewrites every quantized linear's MatMul
into the explicit-quantization form that TensorRT reads (and onnxruntime runs):

    x -> QuantizeLinear(s_in) -> DequantizeLinear(s_in) --\
                                                          MatMul -> y
    W_q (K, N) int8 / float8e4m3fn -> DequantizeLinear(s_w, axis=1) --/

`W_q` is the weight's 8-bit values stored as such (a quarter of fp32's bytes), transposed as the
exporter stores linears (K, N): the n:m groups still run along axis 0, K, and
`onnx_graph.onnx_weight_patterns` reads them through the DequantizeLinear. Zero points are zero
(symmetric). Every linear has its own input pair and its own scale initializers, also where
several read one input with one scale (q/k/v, gate/up): onnxruntime's CPU provider fuses an INT8
pair into its 8-bit kernel (MatMulIntegerToFloat) only where the pair feeds one MatMul, and merges
identical nodes on identical initializers (docs/results/onnx_qdq_cpu.md).

The MatMuls are found by their weights' bytes, since the tracer does not keep module names:
every quantized linear must be found exactly once, or the export stops. The scales take the
graph's float type (a DequantizeLinear outputs its scale's type): exporting a float32 model's
scales to float16 rounds them, which the summary reports as the largest relative change.
QuantizeLinear on float16 inputs and the FLOAT8E4M3FN type need opset 19 (`QDQ_OPSET`).

onnxruntime before 1.32 cannot load an FP8 QDQ graph at its default optimization level: its QDQ
fusion pass turns each DequantizeLinear -> MatMul into the integer-only MatMulIntegerToFloat, then
refuses the graph it made (INVALID_GRAPH). `onnxruntime_session` (every session this project opens
on a graph) and the GenAI folder's config switch that one pass off for FP8 graphs
(`FP8_SAFE_SESSION`), whatever the version.

On x86 CPUs without VNNI, onnxruntime's fused INT8 kernel saturates: it sums pairs of
unsigned-by-signed 8-bit products in 16 bits, and full-range INT8 weights overflow them (measured
under `qemu-x86_64 -cpu Haswell`: 16% of the output's range on random data; exact with VNNI).
`onnxruntime_session` keeps INT8 linears out of that kernel on such CPUs, and a GenAI folder of an
INT8 model, which may be served on any CPU, always (`INT8_SAFE_SESSION`; docs/results/onnx_qdq_cpu.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import platform
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from exporters.base import ExportError, ValidationError, release
from exporters.source import DTYPES
from thanos.linears import weight_view
from thanos.quantize import FORMATS, grid_of, input_grid
from thanos.quantized_model import quantization_of

QDQ_OPSET = 19
# onnxruntime's session setting, and the pass it names, that load FP8 QDQ graphs before 1.32 (above)
FP8_SAFE_SESSION = {"optimization.disable_specified_optimizers": "QDQSelectorActionTransformer"}
# onnxruntime's session setting that keeps INT8 linears out of its fused 8-bit kernel (above): the
# weights are dequantized once, when the session opens, and the inputs still rounded to 8 bits
INT8_SAFE_SESSION = {"session.disable_quant_qdq": "1"}
_TORCH_TYPES = {1: torch.float32, 10: torch.float16}  # TensorProto.FLOAT, FLOAT16


def onnx_type(fmt: str) -> int:
    from onnx import TensorProto

    return {"fp8": TensorProto.FLOAT8E4M3FN, "int8": TensorProto.INT8}[fmt]


def weight_formats(path: "str | Path") -> set[str]:
    """The 8-bit formats ("fp8", "int8") among the ONNX graph's initializers at `path` (its 8-bit
    weights and zero points), read without its external data."""
    import onnx

    return _formats_of(onnx.load(str(path), load_external_data=False))


def _formats_of(proto) -> set[str]:
    from onnx import TensorProto

    fp8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
    found = set()
    for init in proto.graph.initializer:
        if init.data_type in fp8:
            found.add("fp8")
        elif init.data_type in (TensorProto.INT8, TensorProto.UINT8):
            found.add("int8")
    return found


def holds_fp8(path: "str | Path") -> bool:
    return "fp8" in weight_formats(path)


def fused_int8_is_exact(features: "dict | None" = None) -> bool:
    """Whether onnxruntime's fused INT8 kernel computes exactly on this CPU: not on x86 without VNNI,
    where it sums pairs of products in 16 bits (VPMADDUBSW) and saturates. `features`: the CPU's
    features as numpy detects them at run time (CPUID; read here when None, with Linux's flags for
    the AVX-VNNI of client CPUs, which numpy's table lacks, where they describe the same CPU); where
    neither can be read, the CPU counts as without."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True  # Arm's dot-product kernels accumulate in 32 bits
    if features is None:
        features = _numpy_cpu_features()
        flags = cpuinfo_flags()
        if _describe_the_same_cpu(features, flags):
            features["AVXVNNI"] = "avx_vnni" in flags
    return bool(features.get("AVX512VNNI") or features.get("AVXVNNI"))


# numpy's names and Linux's for features both list
_SHARED_FEATURES = {"AVX2": "avx2", "FMA3": "fma", "F16C": "f16c", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni"}


def _describe_the_same_cpu(features: dict, flags: set[str]) -> bool:
    """Whether Linux's flags agree with what CPUID told numpy: under an emulator (qemu-user running
    another CPU model) /proc/cpuinfo is the host's, whose flags then say too much."""
    shared = [name for name in _SHARED_FEATURES if name in features]
    return bool(flags) and bool(shared) and all(bool(features[name]) == (_SHARED_FEATURES[name] in flags)
                                                for name in shared)


def _numpy_cpu_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:  # numpy 1.x
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return {}
    return dict(features)


def cpuinfo_flags(text: "str | None" = None) -> set[str]:
    """The first processor's flags in Linux's /proc/cpuinfo (`text`: its contents); empty elsewhere."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def session_entries(formats: "set[str]", this_cpu: bool = True) -> dict[str, str]:
    """The onnxruntime session settings a graph with these 8-bit formats needs: FP8 graphs
    `FP8_SAFE_SESSION` (every onnxruntime this project supports loads them), INT8 graphs
    `INT8_SAFE_SESSION` on this CPU if its fused INT8 kernel saturates, or always where the CPU
    that will run it is unknown (`this_cpu=False`: a GenAI folder)."""
    entries = dict(FP8_SAFE_SESSION) if "fp8" in formats else {}
    if "int8" in formats and not (this_cpu and fused_int8_is_exact()):
        entries.update(INT8_SAFE_SESSION)
    return entries


def onnxruntime_session(path: "str | Path", providers: Optional[list] = None, provider_options=None,
                        formats: "set[str] | None" = None):
    """An onnxruntime session on the graph at `path` (CPU unless `providers` say otherwise), with the
    settings its 8-bit formats need here (`session_entries`; `formats`: where the caller has read
    them already, else read from the file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in session_entries(weight_formats(path) if formats is None else formats).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"],
                                provider_options=provider_options)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def insert_qdq(proto, linears: dict[str, nn.Module]) -> dict:
    """Rewrite `proto` (traced from a model holding `linears`, quantized, in the graph's dtype) in place.

    Returns what it did for the export summary.
    """
    from onnx import numpy_helper

    wanted: dict[str, list[str]] = {}
    for name, mod in linears.items():
        key = _digest(weight_view(mod).detach().float().T.contiguous().cpu().numpy())
        wanted.setdefault(key, []).append(name)
    twins = [names for names in wanted.values() if len(names) > 1]
    if twins:
        raise ExportError(f"linears {', '.join(twins[0])} hold identical weights, so their MatMuls in the graph cannot "
                          "be told apart to give each its own scales")
    _gemms_as_matmuls(proto, wanted)
    inits = {t.name: t for t in proto.graph.initializer}
    found: dict[str, tuple] = {}  # linear name -> (MatMul node, initializer)
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            names = wanted.get(_digest(numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)))
            if names:
                if names[0] in found:
                    raise ExportError(f"{names[0]}'s weight feeds two MatMuls in the traced graph; cannot quantize it")
                found[names[0]] = (node, inits[node.input[1]])
    missing = sorted(set(linears) - set(found))
    if missing:
        raise ExportError(f"{len(missing)} quantized linears were not found as MatMul weights in the traced graph "
                          f"({', '.join(missing[:3])}); please report this with the model's config")
    rewriter = _Rewriter(proto)
    for name, (node, init) in found.items():
        rewriter.quantize_matmul(name, linears[name], node, init)
    rewriter.finish()
    fmt = {quantization_of(mod).format for mod in linears.values()}
    return dict(format=fmt.pop() if len(fmt) == 1 else "mixed", linears=len(found),
                activation_quantizers=len(found), opset=QDQ_OPSET,  # one per linear
                scale_dtypes=sorted(rewriter.scale_dtypes), largest_scale_rounding=rewriter.largest_scale_change)


def _gemms_as_matmuls(proto, wanted: dict) -> None:
    """Rewrite each Gemm whose constant B is one of the `wanted` weights (by digest of its (K, N) form) as
    MatMul + Add, the form the rewrite below quantizes: OPT's fc1 / fc2 and GPT-2's Conv1D linears
    run on 2-D inputs, which torch.onnx traces to Gemm."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    nodes, replaced = [], set()
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if node.op_type == "Gemm" else {}
        plain = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and plain else None
        transposed = bool(attrs.get("transB", 0))
        kn = None if weight is None else numpy_helper.to_array(weight)
        kn = kn.T if kn is not None and transposed else kn
        if kn is None or _digest(kn.astype(np.float32)) not in wanted:
            nodes.append(node)
            continue
        name = node.input[1]
        if transposed:
            name = f"{node.output[0]}.weight_kn"
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(kn), name))
            replaced.add(node.input[1])
        bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.product" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    for init in [t for t in proto.graph.initializer if t.name in replaced and t.name not in used]:
        proto.graph.initializer.remove(init)


class _Rewriter:
    def __init__(self, proto):
        self.proto = proto
        self.scale_dtypes: set[str] = set()
        self.weight_nodes: list[tuple[object, list]] = []  # (MatMul, its weight's dequantization)
        self.input_nodes: dict[str, list] = {}  # input name -> the QuantizeLinear / DequantizeLinear pairs reading it
        self.largest_scale_change = 0.0
        self.dead: set[str] = set()

    def _scale(self, name: str, values: torch.Tensor, dtype: torch.dtype):
        from onnx import numpy_helper

        self.scale_dtypes.add(str(dtype).replace("torch.", ""))
        cast = values.float().to(dtype)
        change = ((cast.float() - values.float()).abs() / values.float().abs().clamp(min=1e-30)).max()
        self.largest_scale_change = max(self.largest_scale_change, float(change))
        tensor = numpy_helper.from_array(cast.cpu().numpy(), name)
        self.proto.graph.initializer.append(tensor)

    def _zero_point(self, name: str, fmt: str, shape: list[int]):
        from onnx import helper

        tensor = helper.make_tensor(name, onnx_type(fmt), shape, vals=bytes(int(np.prod(shape))), raw=True)
        self.proto.graph.initializer.append(tensor)

    def quantize_matmul(self, name: str, mod: nn.Module, node, init) -> None:
        from onnx import helper

        quant = quantization_of(mod)
        fmt = FORMATS[quant.format]
        # the MatMul's float type, which its dequantized operands take (float16 graphs hold a few
        # float32 MatMuls where the traced model computes in float32)
        dtype = _TORCH_TYPES.get(init.data_type)
        if dtype is None:
            raise ExportError(f"{name}'s MatMul is neither float32 nor float16 in the graph; cannot quantize it")
        grid = grid_of(weight_view(mod).detach().cpu(), quant.weight_scale, fmt)
        if grid is None:
            raise ExportError(f"{name}'s weights are not its {quant.format} values times its scales (the export's "
                              "dtype cast changed them); export in the dtype the model was quantized in")
        if quant.input_scale is None:
            raise ExportError(f"{name} has no input scale; prune it again with --quantize")
        base = f"{name}.qdq"
        # the weight: its 8-bit values (K, N) and a per-column (per output channel) dequantization
        values = grid.T.contiguous()
        raw = values.view(torch.uint8) if values.dtype != torch.int8 else values
        self.proto.graph.initializer.append(helper.make_tensor(f"{base}.weight", onnx_type(quant.format),
                                                               list(values.shape), vals=raw.numpy().tobytes(),
                                                               raw=True))
        self._scale(f"{base}.weight_scale", quant.weight_scale, dtype)
        self._zero_point(f"{base}.weight_zero_point", quant.format, [values.shape[1]])
        self.weight_nodes.append((node, [helper.make_node(
            "DequantizeLinear", [f"{base}.weight", f"{base}.weight_scale", f"{base}.weight_zero_point"],
            [f"{base}.weight_dq"], name=f"{base}.weight_dq", axis=1)]))
        self.dead.add(node.input[1])
        node.input[1] = f"{base}.weight_dq"
        # the input: one static scale, in a pair of this linear's own (see the module's docstring)
        self._scale(f"{base}.input_scale", torch.tensor(float(quant.input_scale)), dtype)
        self._zero_point(f"{base}.input_zero_point", quant.format, [])
        q_in = [node.input[0], f"{base}.input_scale", f"{base}.input_zero_point"]
        self.input_nodes.setdefault(node.input[0], []).extend([
            helper.make_node("QuantizeLinear", q_in, [f"{base}.input_q"], name=f"{base}.input_q"),
            helper.make_node("DequantizeLinear", [f"{base}.input_q", *q_in[1:]], [f"{base}.input_dq"],
                             name=f"{base}.input_dq")])
        node.input[0] = f"{base}.input_dq"

    def finish(self) -> None:
        """Insert the new nodes where they keep the graph in topological order: a weight's
        dequantization just before its MatMul, an input's pair just after what produces the input."""
        from onnx import NodeProto

        graph = self.proto.graph
        before = {id(matmul): nodes for matmul, nodes in self.weight_nodes}
        produced = {out for node in graph.node for out in node.output}
        order = [n for name, nodes in self.input_nodes.items() if name not in produced for n in nodes]  # graph inputs
        for node in graph.node:
            order += before.get(id(node), [])
            order.append(node)
            for out in node.output:
                order += self.input_nodes.get(out, [])
        copies = []
        for node in order:
            copy = NodeProto()
            copy.CopyFrom(node)
            copies.append(copy)
        del graph.node[:]
        graph.node.extend(copies)
        used = {name for node in graph.node for name in node.input}
        for init in [t for t in graph.initializer if t.name in self.dead and t.name not in used]:
            graph.initializer.remove(init)


_UNIT_SCALE, _AS_GRID = "qdq.probe.unit_scale", ".probe_grid"  # validate_qdq's read-out of the 8-bit inputs
_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11}


@dataclasses.dataclass
class _Probe:
    linear: str  # module name relative to the model
    x: str  # the graph tensor entering the QuantizeLinear
    q: str  # its 8-bit output
    y: str  # the MatMul's output


def validate_qdq(path: Path, model: nn.Module, feed_for: Callable[[object], dict], dtype: str) -> dict:
    """Check every 8-bit MatMul of the graph at `path` against `model`'s fake-quantized linear, on the
    graph's own inputs to it (so a difference upstream does not spread into the check).

    First run, with each linear's input x, its 8-bit input q and its output y read out:
    * q must be `input_grid(x, s_in)` (QuantizeLinear's definition, as `thanos.quantize` computes it)
      except where x / s_in sits within the graph's round-off of a rounding boundary; there the
      two may be one grid step apart, and such inputs are counted;
    * y must be `(q * s_in) @ (grid * s_w)^T` within the dot product's worst-case round-off,
      gamma_K * (|x_q| @ |W|^T) with gamma_K = K u / (1 - K u) and u the graph dtype's unit
      round-off, plus one rounding of y (a float16 graph may accumulate in float16, so its bound is
      loose: the 8-bit inputs' check is the exact one there).
    Reading q out gives each QuantizeLinear a second reader, which keeps onnxruntime from fusing
    the linear into its 8-bit kernel (MatMulIntegerToFloat). So a second run reads out only x and
    y, on the graph as every session runs it, and checks y against `input_grid(x, s_in)` the same
    way, an input near a rounding boundary allowed one grid step.
    Raises ValidationError with the linear's name on the first failure.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    served = served_probe(path)
    probes = _probes(served)
    if not probes:
        raise ExportError(f"{path} holds no QuantizeLinear / DequantizeLinear linears to check")
    formats = _formats_of(served)
    proto = onnx.ModelProto()
    proto.CopyFrom(served)
    for probe in probes:
        # the 8-bit inputs are read out as float32 grid values (a DequantizeLinear with scale 1, exact):
        # onnxruntime before 1.24 cannot hand float8 outputs to numpy
        proto.graph.node.append(helper.make_node("DequantizeLinear", [probe.q, _UNIT_SCALE], [probe.q + _AS_GRID]))
        _read_out(proto, [(probe.q + _AS_GRID, TensorProto.FLOAT)])
    proto.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), _UNIT_SCALE))
    outputs = _run_beside(path, proto, feed_for, formats)
    modules = dict(model.named_modules())
    checks = {probe.linear: _LinearCheck(probe.linear, modules[probe.linear], dtype) for probe in probes}
    flipped, inputs, worst = 0, 0, 0.0
    for probe in probes:
        x, check = outputs[probe.x], checks[probe.linear]
        ours = check.grid(x)
        theirs = torch.from_numpy(outputs[probe.q + _AS_GRID]).reshape(ours.shape)
        differ = ours != theirs
        if differ.any():
            # a flip is legitimate only between neighbours, for an input within round-off of a boundary
            upper = torch.maximum(ours[differ].abs(), theirs[differ].abs())
            neighbours = (ours[differ] - theirs[differ]).abs() <= _step_at(upper, check.fmt)
            if not bool((neighbours & check.near_boundary(x)[differ]).all()):
                raise ValidationError(f"{probe.linear}: onnxruntime's {check.quant.format} inputs are not "
                                      f"QuantizeLinear of its inputs with scale {check.s_in:.4g}"
                                      f"{_rounding_hint(dtype, check.quant.format)}",
                                      float((ours - theirs).abs().max()), 0.0)
            flipped += int(differ.sum())
        inputs += ours.numel()
        worst = max(worst, check.product(theirs, outputs[probe.y], "8-bit product"))
    outputs = _run_beside(path, served, feed_for, formats)
    served_worst = 0.0
    for probe in probes:
        x, check = outputs[probe.x], checks[probe.linear]
        ours = check.grid(x)
        served_worst = max(served_worst, check.product(ours, outputs[probe.y], "8-bit product as sessions run it",
                                                       slack=check.flip_slack(x, ours)))
    return dict(linears=len(probes), inputs_checked=inputs, inputs_on_a_rounding_boundary=flipped,
                largest_error_over_bound=max(worst, served_worst),
                tolerance="each 8-bit input equal to QuantizeLinear's (inputs within round-off of a rounding "
                          "boundary may be one step apart, counted); each product within the worst-case "
                          "round-off bound of its dot products, with the graph's 8-bit inputs and, as every "
                          "session runs it (fused kernels included), with an input near a boundary allowed a step")


def served_probe(path: Path):
    """The graph at `path` with each 8-bit linear's input and output read out, and nothing else added:
    onnxruntime optimizes it as it does the graph itself (fusing what it fuses)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    elem = {t.name: t.data_type for t in proto.graph.initializer}
    for probe in _probes(proto):
        float_type = elem[f"{probe.linear}.qdq.weight_scale"]
        _read_out(proto, [(probe.x, float_type), (probe.y, float_type)])
    return proto


def _read_out(proto, names: list[tuple[str, int]]) -> None:
    from onnx import helper

    present = {o.name for o in proto.graph.output}
    for name, kind in names:
        if name not in present:
            present.add(name)
            proto.graph.output.append(helper.make_tensor_value_info(name, kind, None))


def _run_beside(path: Path, proto, feed_for: Callable[[object], dict], formats: "set[str]") -> dict:
    """Every output of `proto` (the graph at `path`, outputs added) on `feed_for`'s inputs."""
    import onnx

    probe_path = path.with_name(f".probe-{path.name}")  # beside it: external data is found by relative path
    onnx.save(proto, str(probe_path))
    try:
        session = onnxruntime_session(probe_path, formats=formats)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feed_for(session))))
    finally:
        probe_path.unlink(missing_ok=True)


class _LinearCheck:
    """One quantized linear's expected 8-bit inputs and product, in the graph's float type."""

    def __init__(self, name: str, mod: nn.Module, dtype: str):
        self.name = name
        self.quant = quantization_of(mod)
        self.fmt = FORMATS[self.quant.format]
        self.torch_dtype = DTYPES[dtype]
        self.u = _UNIT_ROUNDOFF[self.torch_dtype]
        self.s_in = float(torch.tensor(float(self.quant.input_scale)).to(self.torch_dtype))
        scale_graph = self.quant.weight_scale.to(self.torch_dtype).double()
        grid = grid_of(weight_view(mod).detach().cpu(), self.quant.weight_scale, self.fmt)
        self.weight = (grid.double() * scale_graph[:, None]).to(self.torch_dtype).double()  # the DequantizeLinear's

    def _x(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32)).reshape(-1, self.weight.shape[1])

    def grid(self, x: np.ndarray) -> torch.Tensor:
        return input_grid(self._x(x), self.s_in, self.fmt)

    def near_boundary(self, x: np.ndarray) -> torch.Tensor:
        """Inputs whose 8-bit value moves when x / s_in moves by the graph's round-off, 4u of it (of 1
        below 1)."""
        t = self._x(x).double() / self.s_in
        delta = 4 * self.u * t.abs().clamp(min=1.0)
        low, high = (input_grid((t + sign * delta).float(), 1.0, self.fmt) for sign in (-1, 1))
        return low != high

    def flip_slack(self, x: np.ndarray, ours: torch.Tensor) -> torch.Tensor:
        """How far y may move when each input near a boundary rounds to its neighbour (`ours`: x's
        8-bit values): one step each."""
        step = _step_at(ours.abs().double(), self.fmt) * self.near_boundary(x)
        return (step * self.s_in) @ self.weight.abs().T

    def product(self, q: torch.Tensor, y: np.ndarray, what: str, slack: "torch.Tensor | float" = 0.0) -> float:
        """y against (q * s_in) @ W^T (q: the 8-bit values, one row per token): the largest error over its
        bound (at most 1), else ValidationError."""
        x_q = (q.double() * self.s_in).to(self.torch_dtype).double()
        expected = x_q @ self.weight.T
        y = torch.from_numpy(y.astype(np.float64)).reshape(expected.shape)
        k = self.weight.shape[1]
        gamma = k * self.u / (1 - k * self.u)
        bound = (gamma * (x_q.abs() @ self.weight.abs().T) + self.u * expected.abs() + slack
                 + torch.finfo(self.torch_dtype).tiny)
        excess = float(((y - expected).abs() / bound).max())
        if not excess <= 1:  # NaN too
            diff = (y - expected).abs()
            raise ValidationError(f"{self.name}: onnxruntime's {what}", float(diff.max()),
                                  float(bound.flatten()[int(diff.argmax())]))
        return excess


def _probes(proto) -> list[_Probe]:
    producers = {out: node for node in proto.graph.node for out in node.output}
    probes = []
    for node in proto.graph.node:
        weight_dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight_dq is None or not weight_dq.name.endswith(".qdq.weight_dq"):
            continue
        input_dq = producers[node.input[0]]
        quantizer = producers[input_dq.input[0]]
        probes.append(_Probe(weight_dq.name[: -len(".qdq.weight_dq")], quantizer.input[0], quantizer.output[0],
                             node.output[0]))
    return probes


def _rounding_hint(dtype: str, fmt: str) -> str:
    """The known cause, where it applies: onnxruntime before 1.30 rounds float16 inputs toward zero in an
    INT8 QuantizeLinear (seen with 1.19 to 1.29 on the CPU; 1.30 rounds to nearest, as the spec says)."""
    import onnxruntime

    if dtype != "float16" or fmt != "int8" or release(onnxruntime.__version__) >= (1, 30):
        return ""
    return (f" (onnxruntime {onnxruntime.__version__} rounds float16 inputs toward zero there: "
            "pip install -U 'onnxruntime>=1.30', or export with --dtype float32)")


def _step_at(magnitude: torch.Tensor, fmt) -> torch.Tensor:
    """The grid's spacing at `magnitude` (grid units): 1 for int8; 2^(e - 3) for E4M3 in [2^e, 2^(e+1)),
    2^-9 among its subnormals."""
    if fmt.dtype == torch.int8:
        return torch.ones_like(magnitude)
    exponent = torch.floor(torch.log2(magnitude.clamp(min=2.0 ** -6)))
    return torch.exp2(exponent - 3)
