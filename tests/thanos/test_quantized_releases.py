"""Quantized releases (DeepSeek V3's and Qwen3-FP8's block-scaled FP8, GPT-OSS's MXFP4 experts):
pruned from their dequantized weights, whatever the machine, and saved unquantized."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from thanos import PruneConfig
from thanos.experts import UnfusedExperts, expert_views
from thanos.models import ModelError, load_model
from thanos.pipeline import PruneJob, prune_to_directory
from tests.conftest import _save_tiny
from tests.thanos.helpers import assert_nm

BLOCK = 32  # the tiny models' block: 128 x 128 in the releases, wider than these layers
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


@pytest.fixture(params=[False, True], ids=["cpu", "gpu-visible"])
def gpu_visible(request, monkeypatch):
    """On a machine with an FP8-capable GPU, transformers keeps FP8 weights in FP8 linears unless asked
    to dequantize: seen here by telling it one is there (nothing runs on it)."""
    if request.param:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    return request.param


def _fp8_release(source, out):
    """`source`'s decoder linears as an FP8 release stores them: E4M3 codes and one fp32 scale per
    BLOCK x BLOCK block (`weight_scale_inv`); returns {name: the weight those codes and scales hold}."""
    shutil.copytree(source, out)
    tensors, meant = {}, {}
    for name, weight in load_file(out / "model.safetensors").items():
        if ".layers." in name and name.endswith("proj.weight"):
            rows, cols = weight.shape
            blocks = weight.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = codes.reshape(rows, cols), scale
            meant[name] = (codes.float() * scale[:, None, :, None]).reshape(rows, cols)
        else:
            tensors[name] = weight
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=[BLOCK, BLOCK])
    (out / "config.json").write_text(json.dumps(config))
    return meant


def test_an_fp8_release_is_pruned_from_its_dequantized_weights(gpu_visible, tiny_llama_dir, tmp_path, caplog):
    """Each linear loads as floats, its codes times its blocks' scales (exact in the tiny model's
    float32); with a GPU visible transformers would otherwise load FP8 linears, whose codes a solve
    would read without their scales. The pruned directory is a plain checkpoint."""
    meant = _fp8_release(tiny_llama_dir, tmp_path / "fp8")
    with caplog.at_level(logging.WARNING, logger="thanos.models"):
        model, _ = load_model(str(tmp_path / "fp8"))
    assert any("holds fp8-quantized weights: dequantized on load" in r.getMessage() for r in caplog.records)
    for name, weight in meant.items():
        linear = model.get_submodule(name.removesuffix(".weight"))
        assert type(linear) is torch.nn.Linear and torch.equal(linear.weight, weight), name
    assert getattr(model.config, "quantization_config", None) is None
    out = tmp_path / "pruned"
    prune_to_directory(PruneJob(out=str(out), model=str(tmp_path / "fp8"), config=PruneConfig(pattern="2:4"),
                                calib_samples=2, seqlen=32, evaluate=False, device="cpu"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    pruned = load_file(out / "model.safetensors")
    assert not any(name.endswith("_scale_inv") for name in pruned)
    for name in meant:
        assert pruned[name].dtype == torch.float32
        assert_nm(pruned[name], 2, 4)


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, rows, cols) weights as MXFP4 stores them along cols: E2M1 codes two to a byte (blocks
    (E, rows, cols / 32, 16)), a power-of-two scale per 32 (exponent + 127, uint8), and the
    weights those hold."""
    groups = weight.float().reshape(*weight.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1) / 6.0)).clamp(min=-127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - E2M1).abs().argmin(-1)  # the nearest E2M1 value (+0 before -0)
    held = E2M1[codes] * torch.exp2(exponent)[..., None]
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8), held.reshape(weight.shape)


def test_gpt_oss_released_in_mxfp4_is_pruned_from_its_dequantized_experts(gpu_visible, tmp_path, tmp_path_factory,
                                                                         tiny_tokenizer_dir):
    """GPT-OSS ships its experts in MXFP4 (`*_blocks`, `*_scales`; the rest in bfloat16): each expert
    loads as the floats its codes and scales hold, is pruned 2:4, and saves as a plain checkpoint."""
    source = _save_tiny("gpt_oss", tmp_path_factory, tiny_tokenizer_dir)
    release = tmp_path / "mxfp4"
    shutil.copytree(source, release)
    tensors, held = {}, {}
    for name, tensor in load_file(release / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stored (E, in, out): quantized along in
            blocks, scales, held[name] = _mxfp4(tensor.transpose(1, 2))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = tensor
    save_file(tensors, release / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((release / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="mxfp4", modules_to_not_convert=[
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"])
    (release / "config.json").write_text(json.dumps(config))

    model, _ = load_model(str(release))
    blocks = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        stored = held[f"model.layers.{index}.mlp.experts.gate_up_proj"]  # (E, out, in): interleaved gate, up
        for e in range(len(block)):
            views = expert_views(block.fused, e)
            assert torch.equal(views["gate_proj"][0].float(), stored[e, 0::2])
            assert torch.equal(views["up_proj"][0].float(), stored[e, 1::2])
            assert torch.equal(views["down_proj"][0].float(), held[f"model.layers.{index}.mlp.experts.down_proj"][e])
    out = tmp_path / "pruned"
    prune_to_directory(PruneJob(out=str(out), model=str(release), config=PruneConfig(pattern="2:4", preset="fast"),
                                calib_samples=2, seqlen=32, evaluate=False, device="cpu"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    pruned, _ = load_model(str(out))
    for block in (m for m in pruned.modules() if isinstance(m, UnfusedExperts)):
        for e in range(len(block)):
            assert_nm(expert_views(block.fused, e)["down_proj"][0], 2, 4)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantized_releases_are_refused_before_loading(method, tiny_llama_dir, tmp_path, monkeypatch):
    """Integer codes with their own kernels: no floats to prune. Refused by name, nothing loaded."""
    release = tmp_path / method
    shutil.copytree(tiny_llama_dir, release)
    config = json.loads((release / "config.json").read_text())
    config["quantization_config"] = dict(quant_method=method, bits=4)
    (release / "config.json").write_text(json.dumps(config))
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("loaded a model it refuses"))
    with pytest.raises(ModelError, match=f"holds {method}-quantized weights .* pass the model's unquantized release"):
        load_model(str(release))
