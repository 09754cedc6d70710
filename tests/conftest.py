import importlib.util
import os
from pathlib import Path

import pytest
import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest-xdist: each worker its share of the cores, whose threads would spin against each other's
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Skip, with the reason, what needs a CUDA GPU or the onnx extra where they are absent; under
    pytest-xdist, the tests that read the real default model run in one worker, which builds it once."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        skips["onnx"] = pytest.mark.skip(reason=f"needs the onnx extra ({', '.join(missing)} not installed): "
                                                'pip install -e ".[onnx]"')
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("default_model"))
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_VOCAB = 384


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE trained in a second on Python's pydoc topics: no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    from thanos.calibration import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_text()[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


# model_type -> what its tiny config needs beyond the common sizes; sliding windows and longrope's
# pretraining length shorter than the exports' check prompts, so that both sides are exercised
ALTERNATING = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"])
FAMILIES = {"mistral": dict(sliding_window=16), "qwen2": {}, "qwen3": dict(head_dim=16), "granite": {}, "olmo2": {},
            "olmo3": ALTERNATING, "exaone4": ALTERNATING, "ministral": dict(sliding_window=16, head_dim=16), "ministral3": {},
            "seed_oss": {}, "ernie4_5": {}, "helium": dict(head_dim=16), "hunyuan_v1_dense": dict(head_dim=16),
            "internlm3": {}, "apertus": dict(head_dim=16),
            "cohere2": ALTERNATING, "stablelm": {}, "starcoder2": dict(sliding_window=16), "arcee": {},
            "glm4": {},
            "smollm3": dict(no_rope_layers=[1, 0]),  # its second layer without rotary positions (NoPE)
            "gemma": dict(head_dim=16),
            "gemma2": dict(head_dim=16, sliding_window=16), "gemma3_text": dict(head_dim=16, **ALTERNATING),
            # Phi-3.5 / Phi-4-mini's longrope: other frequencies past 56 tokens (the pretraining length),
            # which no check generation crosses (transformers then recomputes its cache, a graph cannot)
            "phi3": dict(original_max_position_embeddings=56,
                         rope_scaling=dict(type="longrope", short_factor=[1.0] * 8, long_factor=[1.0, 2.0, 4.0, 8.0,
                                                                                                 16.0, 32.0, 64.0, 128.0])),
            # hybrids: a Mamba-2 (LFM2: short-convolution) layer, then an attention one (Nemotron-H: then an MLP)
            "lfm2": dict(layer_types=["conv", "full_attention"], block_ff_dim=128, block_auto_adjust_ff_dim=False),
            "nemotron_h": dict(layers_block_type=["linear_attention", "full_attention", "mlp"], num_hidden_layers=3, mamba_num_heads=8,
                               mamba_head_dim=16, ssm_state_size=16, n_groups=2, head_dim=16, chunk_size=16),
            "granitemoehybrid": dict(layer_types=["mamba", "attention"], num_local_experts=0, shared_intermediate_size=128,
                                     mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                                     mamba_chunk_size=16),
            # Falcon-H1: Mamba-2 beside the attention in every layer
            "falcon_h1": dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_ssm=128, mamba_d_state=16, mamba_n_groups=1,
                              mamba_chunk_size=16, head_dim=16),
            # Qwen3.5: a linear-attention (Gated DeltaNet) layer, then a full-attention one
            "qwen3_5_text": dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                 linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
            # Gemma 4: a sliding layer, then a full one with heads twice as wide whose keys are its values
            # (no v_proj); no per-layer inputs, no layers sharing keys and values
            "gemma4_text": dict(head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                                hidden_size_per_layer_input=0, num_kv_shared_layers=0, **ALTERNATING)}
# mixture of experts: four experts, two per token; where the family has them, a dense first layer
# and a shared expert
_ROUTED = dict(moe_intermediate_size=32, num_experts_per_tok=2)
MOE = dict(mixtral=dict(num_local_experts=4, num_experts_per_tok=2), olmoe=dict(num_experts=4, num_experts_per_tok=2),
           phimoe=dict(num_local_experts=4, num_experts_per_tok=2),
           # Llama 4: a dense layer, then a layer of 4 experts (top 1) with a shared expert; chunked attention
           llama4_text=dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=128,
                            interleave_moe_layer_step=2, attention_chunk_size=16, head_dim=16),
           minimax_m2=dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
           # a dense first layer; value heads twice as wide as the query and key heads
           mimo_v2_flash=dict(n_routed_experts=4, head_dim=16, v_head_dim=32, mlp_layer_types=["dense", "sparse"],
                              layer_types=["full_attention", "sliding_attention"], sliding_window=16, **_ROUTED),
           granitemoe=dict(num_local_experts=4, num_experts_per_tok=2),
           flex_olmo=dict(num_experts=4, num_experts_per_tok=2),
           qwen3_moe=dict(head_dim=16, num_experts=4, mlp_only_layers=[0], **_ROUTED),
           qwen2_moe=dict(shared_expert_intermediate_size=64, num_experts=4, mlp_only_layers=[0], **_ROUTED),
           qwen3_5_moe_text=dict(FAMILIES["qwen3_5_text"], shared_expert_intermediate_size=64, num_experts=4,
                                 **_ROUTED),
           glm4_moe=dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                         **_ROUTED),
           dots1=dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                      **_ROUTED),
           exaone_moe=dict(num_experts=4, num_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                           first_k_dense_replace=1, **_ROUTED),
           ernie4_5_moe=dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                             moe_layer_start_index=1, moe_layer_end_index=1),
           hunyuan_v1_moe=dict(num_experts=4, moe_topk=2, head_dim=16),
           gpt_oss=dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),
           qwen3_next=dict(FAMILIES["qwen3_5_text"], shared_expert_intermediate_size=64, num_experts=4, **_ROUTED),
           minimax=dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"]),
           # latent attention: low-rank queries (V3) or not (V2-Lite), keys and values
           deepseek_v3=dict(num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                            q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                            **_ROUTED),
           # GLM-4.7-Flash: DeepSeek V3's latent attention and experts
           glm4_moe_lite=dict(num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                              n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                              qk_nope_head_dim=16, v_head_dim=16, **_ROUTED),
           deepseek_v2=dict(num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                            q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                            **_ROUTED),
           # LFM2-MoE: a dense first layer (short convolution), then experts (attention)
           lfm2_moe=dict(FAMILIES["lfm2"], num_dense_layers=1, num_experts=4, **_ROUTED),
           # Granite 4's hybrid with experts beside its MLP (H-Tiny, H-Small)
           granitemoehybrid_moe=dict(FAMILIES["granitemoehybrid"], model_type="granitemoehybrid", num_local_experts=4,
                                     num_experts_per_tok=2, intermediate_size=32),
           # Nemotron 3 (Nano): Mamba-2, experts of up and down alone (ReLU²) beside a shared expert, attention,
           # an MLP; and (Super) experts reading and writing a narrower latent through two more linears
           nemotron_h_moe=dict(FAMILIES["nemotron_h"], model_type="nemotron_h", num_hidden_layers=4,
                               layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
                               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               moe_shared_expert_intermediate_size=64, n_group=1, topk_group=1),
           nemotron_h_latent_moe=dict(FAMILIES["nemotron_h"], model_type="nemotron_h", num_hidden_layers=2,
                                      layers_block_type=["moe", "full_attention"], n_routed_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32, moe_latent_size=32,
                                      moe_shared_expert_intermediate_size=64, n_group=1, topk_group=1),
           # Gemma 4 with experts: a dense MLP and, beside it, experts a router picks (the same model type)
           gemma4_text_moe=dict(FAMILIES["gemma4_text"], model_type="gemma4_text", enable_moe_block=True, num_experts=4,
                                top_k_experts=2, moe_intermediate_size=32))
# Gemma 4 as its small releases (E2B, E4B): each layer also reads its own embedding of the tokens, and
# the last layer reuses the keys and values of the one before it (of its kind)
FAMILIES["gemma4_text_ple"] = dict(FAMILIES["gemma4_text"], model_type="gemma4_text", hidden_size_per_layer_input=16,
                                   num_kv_shared_layers=1, attention_k_eq_v=False,
                                   layer_types=["full_attention", "full_attention"])
FAMILIES.update(MOE)
# vision-language checkpoints: a vision tower beside the language model, which stays as it is
VISION_LANGUAGE = ("gemma3", "gemma4", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe")
# Qwen3-VL's language models (no text-only model type of their own): Qwen3's, and Qwen3-MoE's with a
# dense first layer
QWEN3_VL_TEXT = dict(qwen3_vl=dict(head_dim=16),
                     qwen3_vl_moe=dict(head_dim=16, num_local_experts=4, mlp_only_layers=[0], **_ROUTED))


def tiny_config(kind: str, **overrides):
    """The config of a tiny model of family `kind` (one of FAMILIES): two decoder layers, LLaMA-sized."""
    from transformers import AutoConfig

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0)
    family = {**FAMILIES[kind], **overrides}
    return AutoConfig.for_model(family.pop("model_type", kind), **{**settings, **family})


def _traced_families() -> list[str]:
    from exporters import untraceable

    return sorted(kind for kind in FAMILIES if untraceable(tiny_config(kind)) is None)


# the families the ONNX-based targets export (not a recurrent state, a routing, or heads of more than
# one size: `exporters.untraceable`)
TRACED_FAMILIES = _traced_families()


def _save_tiny(kind, tmp_path_factory, tokenizer_dir, **overrides):
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              OPTConfig, OPTForCausalLM)

    torch.manual_seed(0)
    if kind == "llama":
        settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256,
                        tie_word_embeddings=True)
        cfg = LlamaConfig(**{**settings, **overrides})
        model = LlamaForCausalLM(cfg)
    elif kind == "opt":
        cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=TINY_VOCAB, word_embed_proj_dim=64, max_position_embeddings=256, **overrides)
        model = OPTForCausalLM(cfg)
    elif kind == "gemma3":  # Gemma 3 from 4B up: a vision tower beside the language model
        from transformers import AutoModelForCausalLM, Gemma3Config

        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0, **FAMILIES["gemma3_text"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        model = AutoModelForCausalLM.from_config(Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=TINY_VOCAB - 3,
            eoi_token_index=TINY_VOCAB - 2, image_token_index=TINY_VOCAB - 1, **overrides))
    elif kind in ("qwen3_5", "qwen3_5_moe"):  # Qwen3.5 as released: a vision tower beside the language model
        from transformers import AutoConfig, AutoModelForImageTextToText

        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0, **FAMILIES[f"{kind}_text"])
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14)
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(kind, text_config=text,
                                                                             vision_config=vision, **overrides))
    elif kind in QWEN3_VL_TEXT:  # Qwen3-VL: a vision tower whose features join the first layer's output
        from transformers import AutoConfig, AutoModelForImageTextToText

        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0, **QWEN3_VL_TEXT[kind])
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      deepstack_visual_indexes=[0])
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(
            kind, text_config=text, vision_config=vision, image_token_id=TINY_VOCAB - 1, video_token_id=TINY_VOCAB - 2,
            vision_start_token_id=TINY_VOCAB - 3, **overrides))
    elif kind == "gemma4":  # Gemma 4 as released: a vision tower beside the language model
        from transformers import AutoConfig, AutoModelForImageTextToText

        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0, **FAMILIES["gemma4_text"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, patch_size=14)
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(kind, text_config=text,
                                                                             vision_config=vision, **overrides))
    elif kind in FAMILIES:  # the other architectures thanos.models.ADAPTERS names, LLaMA-sized as above
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
    else:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=TINY_VOCAB, n_positions=256,
                         bos_token_id=0, eos_token_id=0, **overrides)
        model = GPT2LMHeadModel(cfg)
    path = tmp_path_factory.mktemp(f"tiny_{kind}")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def _write_tiny_gguf(model_dir: Path, path: Path) -> None:
    """The tiny llama at `model_dir` as a float32 GGUF file laid out as llama.cpp writes one (its query
    and key rows in llama.cpp's rotary order, which transformers undoes on loading; the tokenizer as
    GGUF's "gpt2" BPE): GGUF loading tested on a model small enough to load in a second."""
    import json

    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = sorted(backend["model"]["vocab"], key=backend["model"]["vocab"].get)
    special = {added["content"] for added in backend["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)

    def rotary_order(t: np.ndarray, heads: int) -> np.ndarray:  # (heads * head_dim, in): halves interleaved
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        tensor = tensor.float().numpy()
        if name == "lm_head.weight":
            continue  # tied to the embedding
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        else:
            _, _, index, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                tensor = rotary_order(tensor, cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads)
            out = f"blk.{index}.{names[module]}.{kind}"
        writer.add_tensor(out, np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny_gguf_file(tmp_path_factory, tiny_llama_dir) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    _write_tiny_gguf(tiny_llama_dir, path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    return _save_tiny("llama", tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tiny_tokenizer_dir):
    return _save_tiny("opt", tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir):
    return _save_tiny("gpt2", tmp_path_factory, tiny_tokenizer_dir)


def _pruned(tmp_path_factory, model_dir, pattern, **config):
    from thanos import PruneConfig
    from thanos.pipeline import PruneJob, prune_to_directory

    out = tmp_path_factory.mktemp(f"pruned_{pattern.replace(':', 'of')}")
    prune_to_directory(PruneJob(out=str(out / "m"), model=str(model_dir), config=PruneConfig(pattern=pattern, **config),
                                calib_samples=4, seqlen=32, evaluate=False, device="cpu"))
    return out / "m"


@pytest.fixture(scope="session")
def pruned_llama_2of4(tmp_path_factory, tiny_llama_dir):
    return _pruned(tmp_path_factory, tiny_llama_dir, "2:4")


@pytest.fixture(scope="session")
def pruned_llama_4of8(tmp_path_factory, tiny_llama_dir):
    return _pruned(tmp_path_factory, tiny_llama_dir, "4:8")


@pytest.fixture(scope="session")
def pruned_gpt2_2of4(tmp_path_factory, tiny_gpt2_dir):
    return _pruned(tmp_path_factory, tiny_gpt2_dir, "2:4")


@pytest.fixture(scope="session")
def default_model_build(tmp_path_factory):
    """The README's main command on the real default model, with little calibration: built once for every
    test that reads it (a build takes minutes on a slow CPU). Returns the build folder (its `pruned/`
    holds the model and `thanos_report.json`). Without the onnx extra, where `--target auto`'s export
    cannot run, the compact target stands in, so that the pruned model is still there to test."""
    from click.testing import CliRunner

    from cli import main

    onnx = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
    out = tmp_path_factory.mktemp("smollm2") / "build"
    result = CliRunner().invoke(main, ["prune-and-build", "--pattern", "2:4", "--target", "auto" if onnx else "safetensors",
                                       "--calib-samples", "2", "--seqlen", "64", "--eval-windows", "2", "--device",
                                       "cpu", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def pruned_with_outliers(tmp_path_factory, tiny_llama_dir):
    """2:4 with 5% dense outlier rows (alpha): what --split-dense-rows exports."""
    return _pruned(tmp_path_factory, tiny_llama_dir, "2:4", alpha=0.05)
