"""Builds the native model (torch.classes.thrifty.LlamaModel, csrc/cpu/model.cpp) from a loaded
torch model: every matmul weight packed once into the kernels' layout, norms and rope tables
copied. The torch model's matmul weights are released afterwards: the native model holds the
only copy the engine needs."""

from __future__ import annotations

import torch

from thrifty.model.llama import LlamaForCausalLM


def native_unsupported_reason(model: LlamaForCausalLM, dtype: torch.dtype, device: torch.device,
                              block_size: int) -> str | None:
    cfg = model.config
    if device.type != "cpu":
        return f"device {device} (the native kernels are for CPUs)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype}"
    if cfg.head_dim not in (16, 32, 64, 128, 256):
        return f"head_dim {cfg.head_dim} (the kernels take 16, 32, 64, 128 or 256)"
    if block_size % 16:
        return f"block_size {block_size} (needs a multiple of 16)"
    if cfg.num_attention_heads // cfg.num_key_value_heads > 16:
        return "more than 16 query heads per KV head"
    if cfg.hidden_size % 2 or cfg.intermediate_size % 2:
        return "odd hidden or intermediate size"
    return None


def build_native_model(model: LlamaForCausalLM, block_size: int, k_caches: list[torch.Tensor],
                       v_caches: list[torch.Tensor]):
    cfg = model.config
    native = torch.classes.thrifty.LlamaModel(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
        cfg.vocab_size, cfg.rms_norm_eps, block_size)
    pack = torch.ops.thrifty.pack_linear_weight
    with torch.no_grad():
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            native.add_layer(
                layer.input_layernorm.weight, pack(attn.qkv_proj.weight), attn.qkv_proj.bias,
                attn.q_norm.weight if attn.q_norm is not None else None,
                attn.k_norm.weight if attn.k_norm is not None else None,
                pack(attn.o_proj.weight), layer.post_attention_layernorm.weight,
                torch.ops.thrifty.pack_gate_up_weight(mlp.gate_up_proj.weight),
                pack(mlp.down_proj.weight))
        tied = model.lm_head.weight is model.embed_tokens.weight
        native.set_head(None if tied else model.embed_tokens.weight, pack(model.lm_head.weight), model.norm.weight)
        native.set_rope(model.rotary.cos, model.rotary.sin)
        native.set_kv_caches(k_caches, v_caches)
    model.release_weights()
    return native
