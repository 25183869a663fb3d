"""Load llama.cpp GGUF checkpoints into an HF-style config and float32 state dict.

The container is parsed here rather than with `gguf.GGUFReader`, which builds
a Python object per tokenizer string and takes seconds on a 49k-token vocab;
the block dequantizers are our own, vectorized with numpy. The `gguf` package
supplies only the type enums and block sizes. Everything is dequantized to
float32 at load time (the reference path's weights); `load_gguf_weights` also
keeps the Q8_0, Q4_0 and Q4_1 matrices as they are, for the native kernels.
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

from thrifty.model.quantization import QuantizedWeight

logger = logging.getLogger(__name__)

_T = GGMLQuantizationType

# ---------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------
# Each block decoder takes the raw bytes viewed as (n_blocks, type_size) uint8
# and returns (n_blocks, block_size) float32. Deliberate choices:
# - numpy rather than torch: on small CPU hosts torch's OpenMP pool adds
#   milliseconds per op (8 ms per op on a 2-vCPU VM), which for ~1000 small ops
#   cost more than the arithmetic; numpy is single-threaded and predictable;
# - arithmetic order mirrors ggml's reference (scale first, then offset; no
#   fused multiply-add), so results are bit-identical to gguf-py and thus to
#   what transformers loads;
# - the float32 result is the only full-size allocation and is updated in
#   place: first-touching fresh memory is a large share of load time.

_F32 = np.float32


def _f16_raw(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 at byte `start` of every block, as (n,) float16."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16)[:, 0]


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 at byte `start` of every block, as (n, 1) float32."""
    return _f16_raw(blocks, start)[:, None].astype(_F32)


def _nibbles(qs: np.ndarray, dtype: type = np.uint8) -> np.ndarray:
    """Unpack (n, 16) bytes into (n, 32): low nibbles are elements 0..15, high
    nibbles elements 16..31 (the ggml layout for the 32-element quants)."""
    out = np.empty((qs.shape[0], 32), dtype)
    np.bitwise_and(qs, 0x0F, out=out[:, :16])
    np.right_shift(qs, 4, out=out[:, 16:])
    return out


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j = element j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q8_0(b: np.ndarray) -> np.ndarray:
    # f16 d | 32 x int8 q ; x = d * q
    x = b[:, 2:34].view(np.int8).astype(_F32)
    x *= _f16(b, 0)
    return x


def _q4_0(b: np.ndarray) -> np.ndarray:
    # f16 d | 16 bytes nibbles ; x = d * (q - 8)
    x = _nibbles(b[:, 2:18], _F32)
    x -= 8
    x *= _f16(b, 0)
    return x


def _q4_1(b: np.ndarray) -> np.ndarray:
    # f16 d | f16 m | 16 bytes nibbles ; x = d * q + m
    x = _nibbles(b[:, 4:20], _F32)
    x *= _f16(b, 0)
    x += _f16(b, 2)
    return x


def _q5_0(b: np.ndarray) -> np.ndarray:
    # f16 d | 4 bytes 5th bits | 16 bytes nibbles ; x = d * (q - 16)
    q = _nibbles(b[:, 6:22]) | (_fifth_bits(b[:, 2:6]) << 4)
    x = q.astype(_F32)
    x -= 16
    x *= _f16(b, 0)
    return x


def _q5_1(b: np.ndarray) -> np.ndarray:
    # f16 d | f16 m | 4 bytes 5th bits | 16 bytes nibbles ; x = d * q + m
    q = _nibbles(b[:, 8:24]) | (_fifth_bits(b[:, 4:8]) << 4)
    x = q.astype(_F32)
    x *= _f16(b, 0)
    x += _f16(b, 2)
    return x


def _q4_k(b: np.ndarray) -> np.ndarray:
    # Super-block of 256 = 8 sub-blocks of 32:
    # f16 d | f16 dmin | 12 bytes of packed 6-bit (scale, min) x 8 | 128 bytes nibbles.
    n = b.shape[0]
    s = b[:, 4:16]
    # Sub-blocks 0..3 keep their 6 bits in the low bits of bytes 0..7; sub-blocks
    # 4..7 take 4 bits from bytes 8..11 and their top 2 bits from the spare
    # high bits of bytes 0..7.
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    d = _f16(b, 0) * sc.astype(_F32)  # (n, 8)
    m = _f16(b, 2) * mn.astype(_F32)
    # Each 32-byte chunk holds two sub-blocks: low nibbles then high nibbles.
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    x = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(_F32)
    x *= d[:, :, None]
    x -= m[:, :, None]
    return x.reshape(n, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    # Super-block of 256 = 16 sub-blocks of 16:
    # 128 bytes low nibbles | 64 bytes 2-bit highs | 16 x int8 scales | f16 d.
    n = b.shape[0]
    # Two halves of 128 elements. In a half, element group g (32 elements each)
    # takes nibble g // 2 of ql[(g % 2) * 32 + l] and bits 2g..2g+1 of qh[l].
    ql = b[:, 0:128].reshape(n, 2, 1, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    x = (low | (high << 4)).astype(_F32).reshape(n, 16, 16)
    x -= 32
    x *= (_f16(b, 208) * b[:, 192:208].view(np.int8).astype(_F32))[:, :, None]
    return x.reshape(n, 256)


def _bf16(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32; numpy has no bf16 dtype.
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(_F32)


_BLOCK_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    _T.Q8_0: _q8_0,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _q5_0,
    _T.Q5_1: _q5_1,
    _T.Q4_K: _q4_k,
    _T.Q6_K: _q6_k,
}

_FLOAT_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    _T.F32: lambda raw: raw.view(_F32).copy(),  # copy: raw may be a read-only mmap
    _T.F16: lambda raw: raw.view(np.float16).astype(_F32),
    _T.BF16: _bf16,
}

SUPPORTED_GGUF_TYPES: tuple[str, ...] = tuple(t.name for t in (*_FLOAT_DECODERS, *_BLOCK_DECODERS))
_BLOCK_TYPE_NAMES = frozenset(t.name for t in _BLOCK_DECODERS)


# ---------------------------------------------------------------------------
# Blocks kept quantized (the native kernels' formats: thrifty/model/quantization.py)
# ---------------------------------------------------------------------------
# Each takes a matrix's blocks as (n_blocks, type_size) uint8 and its [N, K] shape.

def _kept_q8_0(b: np.ndarray, n: int, k: int) -> QuantizedWeight:
    q = np.ascontiguousarray(b[:, 2:34]).view(np.int8)
    return QuantizedWeight(8, torch.from_numpy(q.reshape(n, k)), torch.from_numpy(_f16_raw(b, 0).reshape(n, -1)),
                           None, 32, "Q8_0")


def _kept_q4_0(b: np.ndarray, n: int, k: int) -> QuantizedWeight:
    d = _f16_raw(b, 0)
    m = (d * np.float16(-8)).astype(np.float16)  # d * (q - 8) = d * q + m, m exact: a power of two
    return QuantizedWeight(4, torch.from_numpy(_nibbles(b[:, 2:18]).reshape(n, k)),
                           torch.from_numpy(d.reshape(n, -1)), torch.from_numpy(m.reshape(n, -1)), 32, "Q4_0")


def _kept_q4_1(b: np.ndarray, n: int, k: int) -> QuantizedWeight:
    return QuantizedWeight(4, torch.from_numpy(_nibbles(b[:, 4:20]).reshape(n, k)),
                           torch.from_numpy(_f16_raw(b, 0).reshape(n, -1)),
                           torch.from_numpy(_f16_raw(b, 2).reshape(n, -1)), 32, "Q4_1")


_KEPT: dict[GGMLQuantizationType, Callable[[np.ndarray, int, int], QuantizedWeight]] = {
    _T.Q8_0: _kept_q8_0, _T.Q4_0: _kept_q4_0, _T.Q4_1: _kept_q4_1,
}


def from_gguf(type_name: str, raw: np.ndarray, shape: tuple[int, ...]) -> QuantizedWeight | None:
    """A GGUF tensor's blocks as a QuantizedWeight, or None for a type thrifty has no kernel for
    (it is then dequantized at load) or a tensor that is not a matrix."""
    qtype = getattr(_T, type_name, None)
    if qtype not in _KEPT or len(shape) != 2:
        return None
    return _KEPT[qtype](np.asarray(raw).reshape(-1, GGML_QUANT_SIZES[qtype][1]), *shape)


def dequantize(
    data: np.ndarray, ggml_type: int | GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode one GGUF tensor to float32.

    `data` holds the tensor's bytes (raw uint8 or the typed array GGUFReader
    exposes); `shape` is the logical PyTorch shape, i.e. GGUF's `ne` reversed,
    and is the shape of the result.
    """
    return torch.from_numpy(_dequantize_np(data, ggml_type, shape))


def _dequantize_np(
    data: np.ndarray, ggml_type: int | GGMLQuantizationType, shape: tuple[int, ...]
) -> np.ndarray:
    qtype = GGMLQuantizationType(ggml_type)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n_elements = int(np.prod(shape, dtype=np.int64))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_elements % block_size or raw.size != n_elements // block_size * type_size:
        raise ValueError(
            f"{raw.size} bytes of {qtype.name} do not encode a tensor of shape {tuple(shape)}"
        )
    if qtype in _FLOAT_DECODERS:
        values = _FLOAT_DECODERS[qtype](raw)
    elif qtype in _BLOCK_DECODERS:
        values = _BLOCK_DECODERS[qtype](raw.reshape(-1, type_size))
    else:
        supported = ", ".join(SUPPORTED_GGUF_TYPES)
        raise ValueError(f"unsupported GGUF tensor type {qtype.name}; supported: {supported}")
    return values.reshape(shape)


# ---------------------------------------------------------------------------
# Container parsing
# ---------------------------------------------------------------------------

_V = GGUFValueType
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    _V.UINT8: "<B", _V.INT8: "<b", _V.UINT16: "<H", _V.INT16: "<h",
    _V.UINT32: "<I", _V.INT32: "<i", _V.FLOAT32: "<f", _V.BOOL: "<?",
    _V.UINT64: "<Q", _V.INT64: "<q", _V.FLOAT64: "<d",
}  # fmt: skip


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # logical PyTorch order: GGUF's ne reversed
    type_id: int  # raw id: it may be a type this gguf package does not know
    offset: int  # absolute byte offset in the file


class _Cursor:
    """Sequential little-endian reads over the memory-mapped file."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> int | float | bool:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        vtype = GGUFValueType(vtype)
        if vtype == _V.STRING:
            return self.string()
        if vtype == _V.ARRAY:
            return self.array()
        return self.scalar(_SCALAR_FORMATS[vtype])

    def array(self) -> list | np.ndarray:
        item_type = GGUFValueType(self.scalar("<I"))
        count = self.scalar("<Q")
        if item_type in _SCALAR_FORMATS:
            # Numeric arrays (token types, scores) can be large: read in bulk.
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            values = np.frombuffer(self.buf, dtype, count, self.pos).copy()
            self.pos += count * dtype.itemsize
            return values
        if item_type == _V.STRING:
            return self._strings(count)
        return [self.value(item_type) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        # Hot loop (vocab and merges: ~100k strings), hence the local names.
        buf, pos, out = self.buf, self.pos, []
        unpack_len = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (length,) = unpack_len(buf, pos)
            pos += 8
            out.append(buf[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out


def _parse_gguf(buf: mmap.mmap) -> tuple[dict[str, object], list[_TensorInfo]]:
    cur = _Cursor(buf)
    if cur.scalar("<I") != GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    version = cur.scalar("<I")
    if version not in (2, 3):  # v1 used 32-bit counts; big-endian files read as huge
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")

    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ne = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        infos.append((name, tuple(reversed(ne)), type_id, offset))

    alignment = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [_TensorInfo(n, s, t, data_start + o) for n, s, t, o in infos]
    return meta, tensors


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"<unknown ggml type id {type_id}>"


def _tensor_bytes(buf: mmap.mmap, info: _TensorInfo) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.type_id)]
    n_elements = int(np.prod(info.shape, dtype=np.int64))
    nbytes = n_elements // block_size * type_size
    return np.frombuffer(buf, np.uint8, nbytes, info.offset)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# llama.cpp's converter interleaves q/k rows for its RoPE kernel only for llama.
_PERMUTED_ARCHS = frozenset({"llama"})


def _rope_scaling(meta: dict[str, object], arch: str) -> dict[str, object] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind is None or kind == "none":
        return None
    scaling: dict[str, object] = {"rope_type": kind}
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if factor is not None:
        scaling["factor"] = float(factor)
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _build_config(
    meta: dict[str, object], arch: str, tensor_shapes: dict[str, tuple[int, ...]]
) -> dict[str, object]:
    def key(suffix: str, default: object = None) -> object:
        return meta.get(f"{arch}.{suffix}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    vocab = tensor_shapes["token_embd.weight"][0]
    return {
        "model_type": arch,
        "architectures": [_ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (HF rotate-half -> interleaved pairs).

    The converter reshaped rows as (n_head, 2, head_dim/2) and swapped the last
    two axes; reshaping as (n_head, head_dim/2, 2) and swapping back inverts it.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (hf_config, state_dict) for a llama/qwen2/qwen3 GGUF file.

    All tensor types are validated before any tensor is decoded, so an
    unsupported file fails fast. `lm_head.weight` is present only when the file
    has an untied `output.weight`.
    """
    config, state_dict, _ = load_gguf_weights(path, keep_quantized=False)
    return config, state_dict


def load_gguf_weights(
    path: str, keep_quantized: bool
) -> tuple[dict, dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """load_gguf, plus (with `keep_quantized`) the matrices of the types thrifty has kernels for
    (Q8_0, Q4_0, Q4_1) as the file stores them, by HF name; the state dict still holds every
    tensor dequantized (the reference path's weights)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta, tensors = _parse_gguf(buf)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}"
        )

    wanted = []
    for info in tensors:
        hf_name = _hf_name(info.name)
        if hf_name is None:
            # e.g. rope_freqs.weight: llama3-style per-frequency RoPE factors,
            # which HF derives from config instead; we do not reconstruct them.
            logger.warning("skipping GGUF tensor %s: no HF equivalent", info.name)
            continue
        type_name = _type_name(info.type_id)
        if type_name not in SUPPORTED_GGUF_TYPES:
            raise ValueError(
                f"unsupported GGUF tensor type {type_name} in tensor {info.name}; "
                f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}"
            )
        wanted.append((info, hf_name))

    config = _build_config(meta, arch, {t.name: t.shape for t in tensors})
    heads_for = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    state_dict: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    without_kernel: set[str] = set()
    for info, hf_name in wanted:
        raw = _tensor_bytes(buf, info)
        weight = _dequantize_np(raw, info.type_id, info.shape)
        type_name = _type_name(info.type_id)
        kept = from_gguf(type_name, raw, info.shape) if keep_quantized else None
        if keep_quantized and kept is None and len(info.shape) == 2 and type_name in _BLOCK_TYPE_NAMES:
            without_kernel.add(type_name)
        proj = hf_name.split(".")[-2]
        if arch in _PERMUTED_ARCHS and proj in heads_for:
            weight = _unpermute_rope(weight, heads_for[proj])
            if kept is not None:
                kept = kept.map_rows(lambda t, n=heads_for[proj]: _unpermute_rope(t, n).contiguous())
        state_dict[hf_name] = torch.from_numpy(weight)
        if kept is not None:
            quantized[hf_name] = kept
    for type_name in sorted(without_kernel):
        logger.info("thrifty: no kernel for GGUF type %s: its tensors are dequantized at load", type_name)
    return config, state_dict, quantized
