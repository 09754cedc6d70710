"""`--target onnx`: the full-sequence graph (input_ids, attention_mask -> logits), run by onnxruntime.

Every linear weight becomes a constant initializer. PyTorch exports `x @ W^T` as a MatMul whose
second input is the folded (K, N) transpose of W, so the n:m groups that ran along W's rows run
along axis 0 of the initializer; `onnx_weight_patterns` reads the initializers back and checks
the groups along K, whichever way each one is stored (MatMul (K, N), or Gemm with transB=1 (N, K)).
"""
from __future__ import annotations

import logging
import tempfile
import types
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from exporters import ExportError, ExportFormat, ExportOptions, ValidationError, register
from exporters.patterns import LayerPattern, analyse
from exporters.source import load_pruned, model_patterns, prompts
from thanos.errors import InputError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
TWO_GIB = 2 * 1024**3
TOLERANCE = {"float32": 1e-3, "float16": 1e-2}  # of the logits' largest magnitude


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({exc}); pip install 'thanos-export[onnx]'") from exc


def write_onnx(model, path: Path, opset: int = 18, external_data_threshold: int = TWO_GIB) -> None:
    """Export `model` (already in its export dtype) to `path`, with external data past the threshold."""
    ids = torch.ones(1, 8, dtype=torch.long)
    mask = torch.ones(1, 8, dtype=torch.long)
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
               "logits": {0: "batch", 1: "sequence"}}
    export_graph(_LogitsOnly(model), (ids, mask), ["input_ids", "attention_mask"], ["logits"], dynamic, path, opset,
                 external_data_threshold)


def export_graph(module, example_inputs: tuple, input_names: list[str], output_names: list[str], dynamic_axes: dict,
                 path: Path, opset: int = 18, external_data_threshold: int = TWO_GIB) -> None:
    """torch.onnx (TorchScript) export of `module`, post-processed and saved at `path`.

    The exporter writes into a scratch folder first (past 2 GB it leaves one file per tensor
    there); the final graph, with a tied LM head sharing the embedding's bytes, is saved at `path`
    (its weights in `path.data` past the threshold).
    """
    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as scratch:
        raw = Path(scratch) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python branch in transformers' masking code; the dynamic
            # axes are checked for real by running the graph at other shapes (tests/exporters).
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module.eval(), example_inputs, str(raw), input_names=input_names,
                                  output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                                  dynamo=False, do_constant_folding=True)
            except RuntimeError as exc:
                import transformers

                if int(transformers.__version__.split(".")[0]) < 5:
                    raise ExportError(
                        f"torch.onnx could not trace transformers {transformers.__version__}'s attention-mask code "
                        f"({exc}); ONNX export needs transformers 5 or newer: pip install 'transformers>=5'") from exc
                raise
        proto = onnx.load(str(raw), load_external_data=True)
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

    proto = _load_onnx_proto(path)
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
        if name not in inits:
            continue  # an activation x activation product (attention), not a weight
        array = numpy_helper.to_array(inits[name])
        if array.ndim != 2:
            continue
        weight = torch.tensor(array if transposed else array.T)  # (out, in); a copy: onnx's arrays are read-only
        layers.append(analyse(f"{node.name or node.op_type}:{name}", weight))
    return layers


def run_onnxruntime(path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    providers: Optional[list[str]] = None) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]


def _load_onnx_proto(path: Path):
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
        import onnxruntime as ort

        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf classes
            raise InputError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {exc}); it may be truncated "
                             "or not ONNX: export it again with `thanos-export export --target onnx`") from exc
        self.provider = self.session.get_providers()[0]

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_):
        from exporters.onnx_cache import prefill_feed

        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        logits = self.session.run(["logits"], prefill_feed(self.session, ids, mask))[0]
        return types.SimpleNamespace(logits=torch.from_numpy(logits.astype(np.float32)))


@register(ExportFormat.ONNX)
def export_onnx(model_dir: Path, out: Path, options: ExportOptions, loaded: Optional[tuple] = None) -> dict:
    """`loaded`: the (model, tokenizer, report) of `load_pruned`, when a caller has it already."""
    _require_onnx()
    if options.dtype not in TOLERANCE:
        raise ExportError(f"ONNX export supports float32 and float16, not {options.dtype}")
    model, tokenizer, report = loaded or load_pruned(model_dir, options.dtype, options.split_dense_rows)
    torch_layers = model_patterns(model)
    path = out / ONNX_FILE
    write_onnx(model, path, options.opset)
    tokenizer.save_pretrained(out)

    onnx_layers = onnx_weight_patterns(path)
    pruned_in_torch = sum(1 for l in torch_layers if l.pattern)
    kept_in_onnx = sum(1 for l in onnx_layers if l.pattern)
    if kept_in_onnx < pruned_in_torch:
        raise ExportError(f"the n:m pattern of {pruned_in_torch - kept_in_onnx} pruned layers did not survive the "
                          "ONNX export (weights were rewritten); please report this with the model's config")
    summary = dict(onnx=str(path), layers_with_nm_pattern=kept_in_onnx,
                   onnx_patterns=sorted({l.pattern for l in onnx_layers if l.pattern}))
    if options.split_dense_rows:
        summary["split_rows"] = report["split_rows"]
    if options.validate:
        summary.update(validate_onnx(model, tokenizer, path, options.dtype))
    if options.with_cache:
        summary["with_cache"] = _export_with_cache(model, tokenizer, out, options)
    return summary


def _export_with_cache(model, tokenizer, out: Path, options: ExportOptions) -> dict:
    from exporters.onnx_cache import WITH_CACHE_FILE, validate_onnx_with_cache, write_onnx_with_cache

    path = out / WITH_CACHE_FILE
    write_onnx_with_cache(model, path, options.opset)
    result = dict(onnx=str(path), layers_with_nm_pattern=sum(1 for l in onnx_weight_patterns(path) if l.pattern))
    if options.validate:
        ids = prompts(tokenizer)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # one left-padded row
        result["validation"] = validate_onnx_with_cache(model, ids, mask, path, options.dtype)
    return result


def validate_onnx(model, tokenizer, path: Path, dtype: str) -> dict:
    """Run real prompts through onnxruntime and PyTorch; raise if the logits differ too much."""
    ids = prompts(tokenizer)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row, as batched serving produces
    with torch.no_grad():
        expected = model.float()(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    model.to(torch.float16 if dtype == "float16" else torch.float32)
    got = run_onnxruntime(path, ids, mask).astype(np.float32)
    valid = mask.bool().numpy()
    diff = float(np.abs(got - expected)[valid].max())
    scale = float(np.abs(expected[valid]).max())
    tolerance = TOLERANCE[dtype] * scale
    if diff > tolerance:
        raise ValidationError(f"ONNX ({dtype}) logits on {ids.shape[0]} prompts", diff, tolerance)
    return dict(validation=dict(prompts=ids.shape[0], tokens=int(valid.sum()), max_abs_diff=diff,
                                tolerance=tolerance, runtime="onnxruntime CPUExecutionProvider"))
