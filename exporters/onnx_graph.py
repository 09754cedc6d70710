"""What every ONNX graph of ours shares: export and save, read back, run with onnxruntime.

`onnx_export` (the full-sequence graph, the registered exporter) and `onnx_cache` (the KV-cache
graph) both stand on this module, so neither imports the other's internals.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import types
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from exporters.base import ExportError, release
from exporters.onnx_qdq import QDQ_OPSET, insert_qdq, onnxruntime_session
from exporters.patterns import LayerPattern, analyse
from thanos.errors import InputError
from thanos.quantized_model import activations_unrounded, quantized_linears

log = logging.getLogger(__name__)

TWO_GIB = 2 * 1024**3
TOLERANCE = {"float32": 1e-3, "float16": 1e-2}  # of the logits' largest magnitude


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({exc}); pip install 'thanos-export[onnx]'") from exc


def export_graph(module, example_inputs: tuple, input_names: list[str], output_names: list[str], dynamic_axes: dict,
                 path: Path, opset: int = 18, external_data_threshold: int = TWO_GIB) -> Optional[dict]:
    """torch.onnx (TorchScript) export of `module`, post-processed and saved at `path`.

    The exporter writes into a scratch folder first (past 2 GB it leaves one file per tensor
    there); the final graph, with a tied LM head sharing the embedding's bytes, is saved at `path`
    (its weights in `path.data` past the threshold). A model quantized to 8 bits is traced with its
    activation rounding off and gets QuantizeLinear / DequantizeLinear pairs instead
    (`exporters.onnx_qdq`); what they are is returned (None for a model without 8-bit linears).
    """
    import onnx

    model = getattr(module, "model", module)  # the model our wrappers hold
    quantized = quantized_linears(model)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as scratch, \
            activations_unrounded(module), eager_attention(model), traceable_rope(model), traceable_repeats(), \
            traceable_expm1():
        raw = Path(scratch) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python branch in transformers' masking code; the dynamic
            # axes are checked for real by running the graph at other shapes (tests/exporters).
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module.eval(), example_inputs, str(raw), input_names=input_names,
                                  output_names=output_names, dynamic_axes=dynamic_axes,
                                  opset_version=max(opset, QDQ_OPSET) if quantized else opset, dynamo=False, do_constant_folding=True)
            except RuntimeError as exc:
                import transformers

                if release(transformers.__version__) < (5, 0):
                    raise ExportError(
                        f"torch.onnx could not trace transformers {transformers.__version__}'s attention-mask code "
                        f"({exc}); ONNX export needs transformers 5 or newer: pip install 'transformers>=5'") from exc
                raise
        proto = onnx.load(str(raw), load_external_data=True)
    qdq = insert_qdq(proto, quantized) if quantized else None
    shared = share_tied_embedding(proto)
    if shared:
        log.info("LM head shares the embedding's initializer %s", shared)
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    if sum(t.ByteSize() for t in proto.graph.initializer) > external_data_threshold:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return qdq


@contextlib.contextmanager
def traceable_repeats():
    """Within: `repeat_interleave` by a whole number as a stack of copies, flattened.

    Interleaved rotary embeddings (Cohere, GLM, ERNIE 4.5, Helium) repeat each frequency twice
    along the last dimension; torch.onnx's TorchScript symbolic for that bakes the example's shape
    into the graph, which then fails at any other length (or the trace fails outright). A stack of
    the same tensor, flattened, moves the same values and traces with dynamic shapes."""
    original_function, original_method = torch.repeat_interleave, torch.Tensor.repeat_interleave

    def repeat(x, repeats=None, dim=None, *args, **kwargs):
        if repeats is None:  # torch.repeat_interleave(counts)
            return original_function(x)
        if isinstance(repeats, int) and dim is not None and not args and not kwargs:
            dim = dim % x.dim()
            return torch.stack([x] * repeats, dim=dim + 1).flatten(dim, dim + 1)
        return original_function(x, repeats, dim, *args, **kwargs)

    torch.repeat_interleave, torch.Tensor.repeat_interleave = repeat, repeat
    try:
        yield
    finally:
        torch.repeat_interleave, torch.Tensor.repeat_interleave = original_function, original_method


@contextlib.contextmanager
def traceable_expm1():
    """Within: `expm1(x)` as `exp(x) - 1`, which torch.onnx's TorchScript exporter has no symbolic for
    (Apertus's xIELU activation calls it on values at most its small epsilon, where the two differ by
    round-off of 1)."""
    original = torch.expm1
    torch.expm1 = lambda x: torch.exp(x) - 1
    try:
        yield
    finally:
        torch.expm1 = original


@contextlib.contextmanager
def eager_attention(model):
    """Within: transformers' eager attention. torch.onnx's symbolic for scaled_dot_product_attention
    (transformers' default) leaves a float16 model's attention output in float32, so o_proj would run
    in float32 in the graph; the eager path stays in the model's dtype."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before is None or before == "eager":
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def traceable_rope(model):
    """Within: rotary embeddings that pick their frequencies per call as graph operations.

    Phi-3's `longrope` (Phi-3.5, Phi-4-mini) switches to its long-context factors once a call's
    positions pass the pretraining length. transformers does so with an in-place copy (5.24), which
    torch.onnx cannot export, or with a Python branch (5.0), which the trace would freeze at the
    example's length; here the switch becomes a Where node. Frequencies that follow each
    call's length continuously (`dynamic`) cannot be traced and are refused."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    patched = []
    try:
        for module in model.modules():
            kind = getattr(module, "rope_type", None)
            kinds = set(kind.values()) if isinstance(kind, dict) else {kind}
            per_layer_longrope = "longrope" in kinds and kind != "longrope"  # by layer type: not handled below
            if any(isinstance(k, str) and "dynamic" in k for k in kinds) or per_layer_longrope:
                raise ExportError(f"{type(module).__name__} recomputes its rotary frequencies from each call's length "
                                  f"(rope type {kind}), which a traced ONNX graph cannot follow; this model cannot be "
                                  "exported to the ONNX targets (the safetensors and torch targets keep it)")
            if kind != "longrope":
                continue
            # the forward under its decorators (transformers 5.0 wraps the frequency update in no_grad too)
            inner = inspect.unwrap(type(module).forward)
            if inner is type(module).forward:
                raise ExportError(f"{type(module).__name__}'s forward does not expose the function under its frequency "
                                  "update, so its longrope switch cannot be traced; export with another transformers")
            limit = _longrope_limit(module.config)
            long, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, module.inv_freq.device, seq_len=limit + 1)
            module.forward = _longrope_forward(module, inner, module.original_inv_freq.clone(), long, limit)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _longrope_limit(config) -> int:
    """The pretraining length past which longrope uses its long-context frequencies."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("original_max_position_embeddings") or config.original_max_position_embeddings


def cached_decoding_note(model) -> Optional[str]:
    """What a KV-cache graph of `model` does otherwise than transformers, for the export summary, if anything."""
    if not any(getattr(module, "rope_type", None) == "longrope" for module in model.modules()):
        return None
    limit = _longrope_limit(model.config)
    return (f"a generation that crosses {limit} tokens (where longrope switches to its long-context frequencies) "
            "parts from transformers' there: transformers then recomputes its KV cache, this graph keeps the keys "
            "it has (README, model families)")


def _longrope_forward(module, inner, short: torch.Tensor, long: torch.Tensor, limit: int):
    def forward(x, position_ids, *args, **kwargs):
        saved = module.inv_freq
        module.inv_freq = torch.where(position_ids.max() + 1 > limit, long, short)
        try:
            return inner(module, x, position_ids, *args, **kwargs)
        finally:
            module.inv_freq = saved
    return forward


def share_tied_embedding(proto) -> Optional[str]:
    """Replace a MatMul initializer that is the transpose of the embedding by a Transpose of it.

    With tied embeddings the exporter folds `x @ E^T` into a second copy of E: a fifth of the
    default model's file. Runtimes fold the Transpose back when they load the graph.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    embeddings = [inits[n.input[0]] for n in proto.graph.node
                  if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        for emb in embeddings:
            if list(weight.dims) == list(reversed(emb.dims)) and weight.data_type == emb.data_type \
                    and np.array_equal(numpy_helper.to_array(weight), numpy_helper.to_array(emb).T):
                transposed = emb.name + "_transposed"
                proto.graph.node.insert(0, helper.make_node("Transpose", [emb.name], [transposed], perm=[1, 0],
                                                            name=transposed))
                node.input[1] = transposed
                if not any(weight.name in n.input for n in proto.graph.node):
                    proto.graph.initializer.remove(weight)
                return emb.name
    return None


def onnx_weight_patterns(path: Path) -> list[LayerPattern]:
    """Analyse every constant weight of a MatMul/Gemm along its K axis, transposes included."""
    from onnx import numpy_helper

    proto = load_onnx_proto(path)
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    layers = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        name, transposed = node.input[1], False
        if node.op_type == "Gemm":
            transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        producer = producers.get(name)
        if name not in inits and producer is not None and producer.op_type == "Transpose":
            name, transposed = producer.input[0], not transposed
        elif name not in inits and producer is not None and producer.op_type == "DequantizeLinear":
            name = producer.input[0]  # an 8-bit weight (exporters.onnx_qdq): its stored values
        if name not in inits:
            continue  # an activation x activation product (attention), not a weight
        array = numpy_helper.to_array(inits[name])
        if array.ndim != 2:
            continue
        if array.dtype.kind not in "biuf":  # float8 (ml_dtypes): its bits, which is what the pattern is about
            array = array.view(np.uint8)
        weight = torch.tensor(array if transposed else array.T)  # (out, in); a copy: onnx's arrays are read-only
        layers.append(analyse(f"{node.name or node.op_type}:{name}", weight))
    return layers


def check_patterns_kept(torch_layers: list[LayerPattern], path: Path) -> dict:
    """Every linear pruned to n:m in PyTorch must still be n:m in the graph's initializers at `path`."""
    onnx_layers = onnx_weight_patterns(path)
    pruned_in_torch = sum(1 for l in torch_layers if l.pattern)
    kept_in_onnx = sum(1 for l in onnx_layers if l.pattern)
    if kept_in_onnx < pruned_in_torch:
        raise ExportError(f"the n:m pattern of {pruned_in_torch - kept_in_onnx} pruned layers did not survive the "
                          f"ONNX export to {path.name} (weights were rewritten); please report this with the model's "
                          "config")
    return dict(layers_with_nm_pattern=kept_in_onnx, onnx_patterns=sorted({l.pattern for l in onnx_layers if l.pattern}))


def run_onnxruntime(path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    providers: Optional[list[str]] = None) -> np.ndarray:
    session = onnxruntime_session(path, providers)
    return session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]


def load_onnx_proto(path: Path):
    import onnx

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the model.onnx an export wrote")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf's DecodeError, a missing external-data file, ...
        raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); it may be truncated "
                         "or not ONNX: export it again with `thanos-export export --target onnx`") from exc


class OnnxCausalLM:
    """An exported ONNX model called like a transformers causal LM (`model(ids).logits`), for evaluation.

    Takes either graph: the full-sequence one, or the KV-cache one fed an empty past.
    """

    def __init__(self, path: Path, providers: Optional[list[str]] = None):
        self.path = Path(path)
        try:
            self.session = onnxruntime_session(path, providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf classes
            raise InputError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {exc}); it may be truncated "
                             "or not ONNX: export it again with `thanos-export export --target onnx`") from exc
        self.provider = self.session.get_providers()[0]

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_):
        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        logits = self.session.run(["logits"], prefill_feed(self.session, ids, mask))[0]
        return types.SimpleNamespace(logits=torch.from_numpy(logits.astype(np.float32)))


def prefill_feed(session, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict:
    """Inputs for a first call of either graph: positions from the mask and an empty past, where it takes them."""
    feed = {"input_ids": input_ids, "attention_mask": attention_mask}
    for arg in session.get_inputs():
        if arg.name == "position_ids":
            feed["position_ids"] = np.clip(attention_mask.cumsum(1) - 1, 0, None)
        elif arg.name.startswith("past_"):
            dtype = np.float16 if "float16" in arg.type else np.float32
            feed[arg.name] = np.zeros((input_ids.shape[0], arg.shape[1], 0, arg.shape[3]), dtype)
    return feed


def graph_in(path: "str | Path") -> Optional[Path]:
    """The ONNX graph `path` stands for: itself if it is an .onnx file, else the model.onnx of an
    export's folder (onnx, tensorrt or genai: one without config.json); None for anything else."""
    path = Path(path)
    if path.suffix == ".onnx":
        return path
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model.onnx").is_file():
        return path / "model.onnx"
    return None


def evaluate_onnx(path: "str | Path", text_file: Optional[str] = None, seqlen: Optional[int] = None,
                  max_windows: Optional[int] = -1) -> dict:
    """Held-out perplexity of an exported model.onnx, run by onnxruntime with the tokenizer beside it."""
    from transformers import AutoTokenizer

    from thanos.pipeline import evaluate_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the model.onnx an export wrote")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"no tokenizer beside {path} ({exc}); evaluate the folder `thanos-export export "
                         "--target onnx` wrote, which holds one") from exc
    model = OnnxCausalLM(path)
    return evaluate_model(model, tokenizer, str(path), text_file, seqlen, torch.device("cpu"), max_windows,
                          where=f"onnxruntime {model.provider}")  # logits come back on the host
