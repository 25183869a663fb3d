"""Builds the native model (torch.classes.thrifty.LlamaModel, csrc/cpu/model.cpp) from a loaded
torch model: every matmul weight packed once into the kernels' layout, norms and rope tables
copied. The torch model's matmul weights are released afterwards: the native model holds the
only copy the engine needs."""

from __future__ import annotations

import torch

from thrifty.model.llama import LlamaForCausalLM
from thrifty.model.quantization import interleave_gate_up, pack_quantized


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
                       v_caches: list[torch.Tensor], kv_cache_dtype: str = "auto"):
    cfg = model.config
    native = torch.classes.thrifty.LlamaModel(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
        cfg.vocab_size, cfg.rms_norm_eps, block_size)
    packed: list[torch.Tensor] = []

    def pack(name: str, weight: torch.Tensor, gate_up: bool = False) -> torch.Tensor:
        quantized = model.quantized.get(name)
        if quantized is not None:
            if gate_up:
                quantized = interleave_gate_up(quantized, cfg.intermediate_size)
            packed.append(pack_quantized(quantized))
        elif gate_up:
            packed.append(torch.ops.thrifty.pack_gate_up_weight(weight))
        else:
            packed.append(torch.ops.thrifty.pack_linear_weight(weight))
        return packed[-1]

    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"layers.{i}."
            native.add_layer(
                layer.input_layernorm.weight, pack(prefix + "self_attn.qkv_proj", attn.qkv_proj.weight),
                attn.qkv_proj.bias,
                attn.q_norm.weight if attn.q_norm is not None else None,
                attn.k_norm.weight if attn.k_norm is not None else None,
                pack(prefix + "self_attn.o_proj", attn.o_proj.weight), layer.post_attention_layernorm.weight,
                pack(prefix + "mlp.gate_up_proj", mlp.gate_up_proj.weight, gate_up=True),
                pack(prefix + "mlp.down_proj", mlp.down_proj.weight))
        tied = model.lm_head.weight is model.embed_tokens.weight
        embedding = None if tied else model.embed_tokens.weight
        native.set_head(embedding, pack("lm_head", model.lm_head.weight), model.norm.weight)
        native.set_rope(model.rotary.cos, model.rotary.sin)
        native.set_kv_caches(k_caches, v_caches, kv_cache_dtype)
    weight_bytes = sum(t.numel() * t.element_size() for t in packed)
    if embedding is not None:
        weight_bytes += embedding.numel() * embedding.element_size()
    model.release_weights()
    model.quantized = {}  # packed: the native model holds the only copy
    return native, weight_bytes
