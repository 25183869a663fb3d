"""Weight-only quantization: the formats against their definitions (gguf-py for GGUF's blocks),
how models get quantized weights (kept from a GGUF file, or made at load), bad input, and whole
engines on quantized weights against the reference path on the same (dequantized) weights.
The kernels themselves are tested in test_native.py (test_quantized_*)."""

from __future__ import annotations

import json
import logging

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from thrifty import native
from thrifty.config import EngineConfig
from thrifty.model import gguf_loader
from thrifty.model.gguf_loader import from_gguf
from thrifty.model.quantization import quantize_int4, quantize_int8

needs_native = pytest.mark.skipif(not native.load(), reason=f"native kernels unavailable: {native.unavailable_reason()}")


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_kept_gguf_blocks_are_worth_what_gguf_py_decodes(qtype):
    """A kept Q8_0/Q4_0/Q4_1 matrix is worth gguf-py's values: exactly, or for Q4_0, whose
    d * (q - 8) is kept as d * q + (-8 d), within one fp32 rounding."""
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((6, 256)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block
    raw = gguf.quants.quantize(data, qtype)
    kept = from_gguf(qtype.name, raw, data.shape)
    assert kept.group_size == 32 and kept.bits == (8 if qtype == T.Q8_0 else 4)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    if qtype == T.Q4_0:
        assert torch.allclose(kept.dequantize(), ref, rtol=2 ** -23, atol=0)
    else:
        assert torch.equal(kept.dequantize(), ref)


def test_gguf_types_without_a_kernel_are_not_kept():
    assert from_gguf("Q5_0", np.zeros(22 * 4, np.uint8), (4, 32)) is None
    assert from_gguf("Q8_0", np.zeros(34, np.uint8), (32,)) is None  # not a matrix


def test_int8_and_int4_round_to_the_nearest_level():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1)
    w[3] = 0  # a zero row: scale 0, no division by it
    q8 = quantize_int8(w)
    assert q8.q.dtype == torch.int8 and q8.d.shape == (48, 1) and q8.m is None
    assert ((q8.dequantize() - w).abs() <= q8.d.float() / 2 * 1.001).all()
    for group in (32, 64, 128):
        q4 = quantize_int4(w, group)
        assert q4.q.max() <= 15 and q4.d.shape == (48, 128 // group) and q4.m is not None
        step = q4.d.float().repeat_interleave(group, dim=1)
        # Half a step, plus the fp16 rounding of the min that every level is offset by.
        slack = q4.m.float().abs().repeat_interleave(group, dim=1) * 2 ** -11
        assert ((q4.dequantize() - w).abs() <= step / 2 * 1.001 + slack).all()
    assert torch.equal(q8.dequantize()[3], torch.zeros(128)) and torch.equal(quantize_int4(w, 32).dequantize()[3],
                                                                              torch.zeros(128))


def test_bad_quantization_options_are_named():
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="quantization_group_size must be one of"):
        EngineConfig(quantization="int4", quantization_group_size=48)
    with pytest.raises(ValueError, match="quantization_group_size: 128 must be one of .* divide the "
                                         "input size of layers.0.mlp.down_proj, 576"):
        quantize_int4(torch.zeros(8, 576), 128, "layers.0.mlp.down_proj")


def _tiny_config(tmp_path, hidden=64):
    cfg = dict(model_type="llama", vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               eos_token_id=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_a_group_that_does_not_divide_a_layer_fails_at_load(tmp_path):
    from thrifty import LLM

    with pytest.raises(ValueError, match=r"quantization_group_size: 128 .* input size of layers\.0\.self_attn\.qkv_proj, 96"):
        LLM(_tiny_config(tmp_path, hidden=96), load_format="dummy", quantization="int4",
            quantization_group_size=128, kv_cache_memory=0.01)


def test_quantization_gguf_needs_a_gguf_file(tmp_path):
    from thrifty import LLM

    with pytest.raises(ValueError, match="quantization 'gguf' keeps a GGUF file's"):
        LLM(_tiny_config(tmp_path), load_format="dummy", quantization="gguf", kv_cache_memory=0.01)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_file_keeps_the_matrices_it_has_kernels_for(arch, tmp_path, caplog):
    """The tiny GGUF models of test_gguf.py mix every type: what is kept is exactly the fused
    matmuls whose parts are all Q8_0/Q4_0/Q4_1 alike; a type without a kernel is dequantized,
    with a log line; the float parameters hold the kept weights' values."""
    from test_gguf import _hf_originals, _write_model

    from thrifty.model.loader import ModelSource, load_model

    path = str(tmp_path / f"tiny-{arch}.gguf")
    _write_model(path, arch, _hf_originals(arch, np.random.default_rng(7)))
    with caplog.at_level(logging.INFO, logger=gguf_loader.__name__):
        model = load_model(ModelSource("gguf", path, "tiny"), torch.float32, torch.device("cpu"),
                           quantization="auto")
    assert "no kernel for GGUF type Q5_0" in caplog.text
    # test_gguf.LAYER_TYPES: layer 0's down is Q8_0, layer 1's o_proj Q4_1; no qkv or gate/up is
    # quantized alike; the head is the Q8_0 embedding (llama, tied) or a Q4_1 output (qwen2).
    assert set(model.quantized) == {"layers.0.mlp.down_proj", "layers.1.self_attn.o_proj", "lm_head"}
    assert model.quantized["lm_head"].kind == ("Q8_0" if arch == "llama" else "Q4_1")
    for name, w in model.quantized.items():
        assert torch.equal(w.dequantize(), model.get_submodule(name).weight), name
    none = load_model(ModelSource("gguf", path, "tiny"), torch.float32, torch.device("cpu"), quantization="none")
    assert none.quantized == {}


# -- engines on quantized weights ------------------------------------------------------------------

def _greedy(llm, prompts, max_tokens=24):
    from thrifty import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@needs_native
@pytest.mark.parametrize("quantization, group", [("auto", 32), ("int8", 32), ("int4", 32), ("int4", 64)])
def test_fp32_quantized_native_equals_reference(quantization, group):
    """The default model is a Q4_1 file: "auto" serves its own 4-bit weights, int8 and int4
    requantize them. Native quantized kernels against the reference path computing with the
    dequantized values, in fp32, on chunked steps (prefill rows over the dequantize-then-float
    path, decode rows over the quantized kernels): the same greedy tokens."""
    from conftest import PROMPTS

    from thrifty import LLM

    runs = {}
    for backend in ("native", "torch"):
        llm = LLM(dtype="float32", backend=backend, quantization=quantization, quantization_group_size=group,
                  max_model_len=512, max_num_batched_tokens=32, kv_cache_memory=0.05)
        runs[backend] = (_greedy(llm, PROMPTS), llm.llm_engine.runner.weight_bytes)
    assert runs["native"][0] == runs["torch"][0]
    # The packed quantized weights against the reference's fp32 parameters (135M of them).
    limit = {"auto": 0.2, "int8": 0.28, "int4": 0.2}[quantization]
    assert runs["native"][1] < limit * runs["torch"][1], (runs["native"][1], runs["torch"][1])


@needs_native
def test_default_model_serves_its_own_4_bit_weights_in_bf16():
    """By default the Q4_1 file is served 4-bit (a third of the bf16 bytes) and greedy answers
    match the dequantized bf16 model's on the test prompts' first tokens."""
    from conftest import PROMPTS

    from thrifty import LLM

    quantized = LLM(dtype="bfloat16", max_model_len=512, kv_cache_memory=0.05)
    dense = LLM(dtype="bfloat16", quantization="none", max_model_len=512, kv_cache_memory=0.05)
    assert quantized.llm_engine.runner.backend == "native"
    assert quantized.llm_engine.runner.weight_bytes < 0.4 * dense.llm_engine.runner.weight_bytes
    a, b = _greedy(quantized, PROMPTS, 8), _greedy(dense, PROMPTS, 8)
    assert sum(x[:4] == y[:4] for x, y in zip(a, b)) >= len(PROMPTS) - 1, (a, b)


# -- quantized KV cache ----------------------------------------------------------------------------

def test_bad_kv_cache_dtype_is_named():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int4")
    assert EngineConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8_e4m3"  # vLLM's name


@pytest.mark.parametrize("dtype, ratio", [("bfloat16", 128 / 68), ("float32", 256 / 68)])
def test_a_quantized_kv_cache_holds_more_tokens(dtype, ratio):
    """head_dim 64: a bf16 key is 128 bytes per head, an int8 or fp8 one 64 plus a 4-byte scale."""
    from thrifty import LLM

    blocks = {}
    for kv in ("auto", "int8", "fp8_e4m3"):
        engine = LLM(dtype=dtype, kv_cache_dtype=kv, max_model_len=512, kv_cache_memory=0.1).llm_engine
        blocks[kv] = engine.kv_cache_manager.num_blocks
        assert engine.runner.kv_bytes_per_token == 2 * 30 * 3 * (68 if kv != "auto" else 64 * (2 if dtype == "bfloat16" else 4))
    # Each count is floor(budget / bytes per block): the quantized one within ratio of auto x ratio.
    assert blocks["int8"] == blocks["fp8_e4m3"] == pytest.approx(blocks["auto"] * ratio, abs=ratio)


@needs_native
@pytest.mark.parametrize("kv, within", [("int8", 0.05), ("fp8_e4m3", 0.1)])
def test_quantized_kv_native_stays_close_to_the_reference(kv, within):
    """fp32, chunked steps, both paths over the same kind of cache (the kernels are tested exact
    on a cache's values in test_native.py). The paths' fp32 noise (other summation orders) can
    flip a code's rounding, an int8 step being 1/254 of the head's largest value and an fp8 one
    1/16 of itself, and greedy runs part where the model nearly ties; so the first token's choice
    must agree, its logprob within `within` and the top-5's within twice that, and while the two
    runs agree (decoding from the quantized cache) each chosen token's logprob within twice that."""
    from conftest import PROMPTS

    from thrifty import LLM, SamplingParams

    runs = {}
    for backend in ("native", "torch"):
        llm = LLM(dtype="float32", backend=backend, kv_cache_dtype=kv, max_model_len=512,
                  max_num_batched_tokens=32, kv_cache_memory=0.05)
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, logprobs=5), use_tqdm=False)
        runs[backend] = [o.outputs[0] for o in outs]
    for a, b in zip(runs["native"], runs["torch"]):
        assert a.token_ids[0] == b.token_ids[0]
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                break
            assert abs(a.logprobs[i][x].logprob - b.logprobs[i][x].logprob) < 2 * within
        first_a, first_b = a.logprobs[0], b.logprobs[0]
        token = a.token_ids[0]
        assert abs(first_a[token].logprob - first_b[token].logprob) < within
        assert max(abs(first_a[t].logprob - first_b[t].logprob) for t in first_a if t in first_b) < 2 * within
