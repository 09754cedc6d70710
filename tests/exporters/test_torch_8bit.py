"""--target torch for 8-bit models: 2:4 linears with 8-bit weights and inputs on cuSPARSELt.

The CPU has no cuSPARSELt, so here the linears multiply through an exact reference product of the
same 8-bit values (everything around the kernel is then what runs on the GPU: the grid behind
each weight, the input rounding, the padding, the scales, the check); the cuSPARSELt kernel itself
runs in the GPU test."""
import pytest
import torch

from exporters import BackendMissingError, ExportOptions, export
from exporters.base import ValidationError
from exporters.source import load_pruned
from exporters.torch_8bit import Kernel, Sparse8bitLinear, check_linears, reference_run, require_8bit_sparse, \
    to_8bit_semi_structured_
from tests.thanos.test_driver import SMALL
from thanos import PruneConfig
from thanos.pipeline import PruneJob, prune_to_directory
from thanos.quantize import fake_quantize
from thanos.quantized_model import quantization_of, quantized_linears


@pytest.fixture(scope="module", params=[("fp8", "static"), ("int8", "static"), ("fp8", "per-token")],
                ids=["fp8", "int8", "fp8-per-token"])
def quantized_dir(request, tmp_path_factory, tiny_llama_dir):
    fmt, inputs = request.param
    out = tmp_path_factory.mktemp(fmt) / "m"
    prune_to_directory(PruneJob(out=str(out), model=str(tiny_llama_dir),
                                config=PruneConfig(quantize=fmt, quantize_inputs=inputs), **SMALL))
    return out, fmt


def exact_kernel(error: float = 0.0) -> Kernel:
    """grid @ q^T in float64, exact for 8-bit values over these K (`error` times the largest output
    added to one output: a wrong kernel)."""
    def multiply(grid, q):
        product = (grid.double() @ q.double().t()).float()
        product[0, 0] += error * float(product.abs().max())
        return product
    return Kernel("exact-cpu", lambda grid: grid.clone(), multiply)


def converted_model(model_dir, kernel):
    """The fake-quantized model's inputs to each 8-bit linear on real text, then the model converted."""
    model, tokenizer, _ = load_pruned(model_dir, "float32")
    ids = torch.randint(0, 200, (2, 37),  # 74 tokens: padded to the kernel's alignment
                        generator=torch.Generator().manual_seed(0))
    expected, captured = reference_run(model, ids)
    report = to_8bit_semi_structured_(model, kernel)
    return model, report, {name: captured[name] for name in report.converted}, ids, expected


def test_every_8bit_linear_is_converted_and_matches_the_fake_quantized_one(quantized_dir):
    model_dir, fmt = quantized_dir
    model, report, captured, ids, expected = converted_model(model_dir, exact_kernel())
    assert report.format == fmt and len(report.converted) == 21 and not report.dense
    assert all(isinstance(model.get_submodule(name), Sparse8bitLinear) for name in report.converted)
    checked = check_linears(model, captured)
    assert checked["linears"] == 21 and checked["largest_share_of_bound"] <= 1.0
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    assert got.shape == expected.shape and torch.isfinite(got).all()


def test_the_input_is_rounded_as_the_fake_quantized_model_rounds_it(quantized_dir):
    model_dir, fmt = quantized_dir
    model, tokenizer, _ = load_pruned(model_dir, "float32")
    name, linear = next(iter(quantized_linears(model).items()))
    quant = quantization_of(linear)
    to_8bit_semi_structured_(model, exact_kernel())
    module = model.get_submodule(name)
    x = torch.randn(3, 7, module.in_features, generator=torch.Generator().manual_seed(1))
    x[0, 0] *= 100  # one loud token: a static scale keeps its range for every token, a per-token one does not
    x2 = x.reshape(-1, module.in_features)
    if quant.per_token:  # each token's largest magnitude maps to the grid's largest value
        expected_scale = x2.abs().amax(-1, keepdim=True) / module.fmt.qmax
    else:
        expected_scale = float(quant.input_scale)
        x2 = x2 * 4 * expected_scale  # the loud token goes past the grid and saturates
    q, scale = module.quantize_input(x2)
    assert torch.allclose(torch.as_tensor(scale), torch.as_tensor(expected_scale), rtol=torch.finfo(torch.float32).eps,
                          atol=0)
    assert q.dtype == module.fmt.dtype
    assert torch.equal(q.float() * scale, fake_quantize(x2, scale, module.fmt))
    assert module(x).shape == (3, 7, module.out_features)


@pytest.mark.parametrize("error", [0.01, float("nan")])  # one output 1% off, or not a number (an overflow)
def test_a_wrong_kernel_fails_the_check(quantized_dir, error):
    model_dir, _ = quantized_dir
    model, _, captured, _, _ = converted_model(model_dir, exact_kernel(error=error))
    with pytest.raises(ValidationError, match="the 8-bit 2:4 linear's outputs"):
        check_linears(model, captured)


def test_missing_8bit_kernels_are_refused_by_name():
    # This torch has no cuSPARSELt on the CPU: the probe itself fails, and the message names the fix.
    with pytest.raises(BackendMissingError, match=r"no cuSPARSELt kernel for int8 2:4 weights on cpu.*--target tensorrt"):
        require_8bit_sparse("int8", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU exists")
def test_the_torch_target_refuses_an_8bit_model_without_a_gpu_before_any_work(quantized_dir, tmp_path):
    with pytest.raises(BackendMissingError, match="needs a CUDA GPU"):
        export("torch", quantized_dir[0], tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.gpu
def test_the_torch_target_runs_the_8bit_model_on_cusparselt(quantized_dir, tmp_path):
    # needs: CUDA capability 8.0+ (FP8: 8.9+) and a torch whose cuSPARSELt takes 8-bit weights
    model_dir, fmt = quantized_dir
    summary = export("torch", model_dir, tmp_path / "t", ExportOptions(dtype="float16"))
    assert len(summary["converted"]) == 21
    assert summary["validation"]["per_linear"]["largest_share_of_bound"] <= 1.0
    from exporters.torch_sparse import load_semi_structured

    model, report = load_semi_structured(tmp_path / "t")
    assert len(report.converted) == 21 and report.kernel == "cusparselt"


@pytest.mark.parametrize("family, linears", [("gemma3", 14), ("qwen3_5", 13)])
def test_a_vision_language_models_language_linears_are_converted(family, linears, tmp_path, tmp_path_factory,
                                                                 tiny_tokenizer_dir):
    """Gemma 3 from 4B up, Qwen3.5 (linear-attention layers among them): the torch target converts the
    language model's 8-bit linears (the vision tower's are not pruned, so not touched) and the converted
    model still computes its logits."""
    from tests.conftest import _save_tiny

    out = tmp_path / "m"
    prune_to_directory(PruneJob(out=str(out), model=str(_save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)),
                                config=PruneConfig(quantize="int8"), **SMALL))
    model, report, captured, ids, expected = converted_model(out, exact_kernel())
    assert len(report.converted) == linears and all(".language_model.layers." in name for name in report.converted)
    assert check_linears(model, captured)["largest_share_of_bound"] <= 1.0
    with torch.no_grad():
        assert torch.isfinite(model(ids, use_cache=False).logits).all()


def test_a_mixture_of_experts_runs_its_experts_on_8bit_kernels_and_calls_only_the_routed_ones(tmp_path,
                                                                                            tmp_path_factory,
                                                                                            tiny_tokenizer_dir):
    """Each expert's 8-bit linears converted, each checked against the fake-quantized one on its own
    routed tokens; served, an expert no token is routed to is not called (no zero-row product)."""
    from tests.conftest import _save_tiny

    out = tmp_path / "m"
    prune_to_directory(PruneJob(out=str(out), model=str(_save_tiny("olmoe", tmp_path_factory, tiny_tokenizer_dir)),
                                config=PruneConfig(quantize="int8"), **SMALL))
    rows = []
    exact = exact_kernel()
    counting = Kernel("counting", exact.prepare, lambda grid, q: (rows.append(q.shape[0]), exact.multiply(grid, q))[1])
    model, report, captured, ids, expected = converted_model(out, counting)
    assert len(report.converted) == 2 * (4 + 4 * 3) and not report.dense
    assert check_linears(model, captured)["largest_share_of_bound"] <= 1.0
    rows.clear()
    with torch.no_grad():
        assert torch.isfinite(model(ids[:1, :1], use_cache=False).logits).all()  # one token: two of four experts
    assert min(rows) > 0 and len(rows) == 2 * (4 + 2 * 3)
