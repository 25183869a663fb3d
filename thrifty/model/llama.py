"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3) over a flat token batch.

The projections are fused (q|k|v and gate|up) so each layer runs two big matmuls instead of
five small ones: fewer kernel launches and better use of the CPU's vector units.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.layers.attention import AttentionMetadata, paged_attention, write_kv
from thrifty.layers.linear import Linear
from thrifty.layers.rotary import RotaryEmbedding, apply_rotary
from thrifty.model.config import ModelArchConfig
from thrifty.model.quantization import QuantizedWeight, cat_rows

logger = logging.getLogger(__name__)

# HF's separate projections and the fused parameter each is a shard of.
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and scale in the input dtype, exactly as HF does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata):
        T = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads side by side: one rotary pass over both.
        qk = qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping, meta.block_size, meta.kv_cache_dtype)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelArchConfig, max_len: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_len, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # see tie_weights
        # Quantized matmul weights by module name, for the native kernels; the parameters then
        # hold their dequantized values (what the reference path computes with).
        self.quantized: dict[str, QuantizedWeight] = {}

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                layers: list[int] | None = None) -> torch.Tensor:
        """The hidden states after every layer, or after only the given ones (a self-draft)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for i in range(len(self.layers)) if layers is None else layers:
            x = self.layers[i](x, rope, kv_caches[i], meta)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()

    def tie_weights(self) -> None:
        """A tied head reads the embedding table itself. Call once the parameters have real
        storage: moving a meta model to a device makes new parameters and would untie them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def release_weights(self) -> None:
        """Drop the matmul weights and embeddings once another copy serves them (the native
        model packs its own); the module can no longer run its forward."""
        empty = torch.empty(0, dtype=self.embed_tokens.weight.dtype, device=self.embed_tokens.weight.device)
        for module in self.modules():
            if isinstance(module, (Linear, nn.Embedding)):
                module.weight = nn.Parameter(empty, requires_grad=False)
                if isinstance(module, Linear):
                    module.packed = None
        self.weights_released = True

    def prepack(self) -> None:
        """Add oneDNN-packed copies of the matmul weights where oneDNN takes them, for small
        batches (see layers/linear.py); a tied head packs its own copy of the embedding table."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()

    # -- weights ------------------------------------------------------------------------
    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up; every parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor, offset: int = 0) -> None:
            param = params[name]
            with torch.no_grad():
                param.data[offset: offset + tensor.shape[0]].copy_(tensor)
            loaded.add(name)

        for hf_name, tensor in weights.items():
            target = self._param_for(hf_name)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                raise ValueError(f"unexpected weight {hf_name!r} for {self.config.model_type}")
            put(name, tensor, self._shard_offset(name.split(".")[-2], shard) if shard is not None else 0)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {missing[:5]}{'...' if len(missing) > 5 else ''}")

    def set_quantized(self, weights: dict[str, QuantizedWeight]) -> None:
        """Keep HF-named quantized matrices for the native kernels, fused as the parameters are
        (q, k, v into qkv_proj; gate, up into gate_up_proj), by module name. A fused matmul
        whose parts have different formats, or are not all quantized, stays float."""
        shards: dict[str, dict[int, QuantizedWeight]] = {}
        for hf_name, w in weights.items():
            target = self._param_for(hf_name)
            if target is None:
                continue
            name, shard = target
            module = name.removesuffix(".weight")
            if module == "embed_tokens":
                if not self.config.tie_word_embeddings:
                    continue  # a separate embedding table stays float: only a few rows are read
                module = "lm_head"
            shards.setdefault(module, {})[shard or 0] = w
        for module, parts in shards.items():
            count = 3 if module.endswith("qkv_proj") else 2 if module.endswith("gate_up_proj") else 1
            fused = cat_rows([parts[i] for i in range(count)]) if len(parts) == count else None
            if fused is None:
                logger.info("thrifty: %s: its parts are not all quantized alike; kept as float", module)
                continue
            self.quantized[module] = fused

    def quantized_linears(self) -> list[tuple[str, Linear]]:
        """The matmuls that can be quantized, by module name: every layer's and the LM head."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, Linear)]

    def _param_for(self, hf_name: str) -> tuple[str, int | None] | None:
        """The parameter an HF-named weight goes to, and its shard of a fused one (None: whole);
        None for weights that are not loaded (rotary tables, a tied head)."""
        name = hf_name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # tied: the embedding serves as the head
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            target, shard = _FUSED[parts[-2]]
            return ".".join(parts[:-2] + [target, parts[-1]]), shard
        return name, None

    def _shard_offset(self, target: str, shard: int) -> int:
        cfg = self.config
        if target == "gate_up_proj":
            return shard * cfg.intermediate_size
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        return (0, q, q + kv)[shard]
