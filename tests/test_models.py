"""Tiny random-weight models of every supported family, saved by transformers as HF folders,
loaded by thrifty and compared with transformers: prefill logprobs and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from thrifty import LLM, SamplingParams

VOCAB = 49152  # the default tokenizer's vocabulary, saved into each folder

FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "llama-untied-rope-scaled": dict(model_type="llama", tie_word_embeddings=False,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=32),
}


def _make_folder(tmp_path, family: str, shard: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    from thrifty.model.loader import load_tokenizer, resolve_model

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, rope_theta=10000.0, eos_token_id=2, bos_token_id=1,
                               **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if model_type == "qwen2":  # random init leaves biases at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    folder = tmp_path / family
    model.save_pretrained(folder, max_shard_size="1MB" if shard else "10GB")
    load_tokenizer(resolve_model(None)).save_pretrained(folder)
    return folder, model


def _compare(folder, hf_model, prompt_ids: list[list[int]], new_tokens: int = 12, backend: str = "auto"):
    llm = LLM(str(folder), dtype="float32", backend=backend)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids],
                        SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=5, ignore_eos=True),
                        use_tqdm=False)
    for ids, out in zip(prompt_ids, outs):
        x = torch.tensor([ids])
        with torch.inference_mode():
            ref_lp = torch.log_softmax(hf_model(x).logits[0, -1], -1)
            ref = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        for tid, lp in out.outputs[0].logprobs[0].items():
            assert lp.logprob == pytest.approx(ref_lp[tid].item(), abs=1e-4)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()


PROMPTS = [[5, 17, 900, 33, 4000, 12], list(range(100, 170)), [7]]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(tmp_path, family, backend):
    folder, hf_model = _make_folder(tmp_path, family)
    _compare(folder, hf_model, PROMPTS, backend=backend)


def test_sharded_checkpoint(tmp_path):
    folder, hf_model = _make_folder(tmp_path, "qwen3", shard=True)
    assert len(list(folder.glob("*.safetensors"))) > 1
    _compare(folder, hf_model, PROMPTS[:1])


def test_dummy_weights_from_config(tmp_path):
    cfg = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               tie_word_embeddings=True, eos_token_id=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    llm = LLM(str(path), load_format="dummy", dtype="float32")
    out = llm.generate("hello", SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5
    assert llm.llm_engine.runner.model.config.num_hidden_layers == 2


def test_builtin_dummy_shapes_are_known():
    from thrifty.model.config import ModelArchConfig
    from thrifty.model.loader import load_hf_config, resolve_model

    cfg = ModelArchConfig.from_hf(load_hf_config(resolve_model("qwen3-0.6b", "dummy")))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.qk_norm, cfg.head_dim) == (28, 1024, True, 128)
    assert 0.55e9 < cfg.num_params < 0.65e9


def test_widened_bf16_linear_matches_the_bf16_gemm():
    """The fp32 path for bf16 weights (CPUs without native bf16) gives the bf16 GEMM's answer:
    each output within one bf16 rounding of the exact float64 result, sliced or not."""
    from thrifty.layers.linear import UPCAST_MIN_ROWS, UPCAST_SLICE_ROWS, linear

    torch.manual_seed(0)
    n = UPCAST_SLICE_ROWS * 2 + 77  # a ragged last slice
    w = torch.randn(n, 96, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16)
    for rows in (UPCAST_MIN_ROWS - 1, UPCAST_MIN_ROWS, 64):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        got = linear(x, w, b, widen=True)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
        ulp = exact.abs().clamp(min=1e-3) * 2.0 ** -7  # bf16 keeps 8 significant bits
        assert ((got.double() - exact).abs() <= ulp).all()
        bf16 = torch.nn.functional.linear(x, w, b)
        if rows < UPCAST_MIN_ROWS:  # small batches keep the bf16 GEMM itself
            assert torch.equal(got, bf16)
        else:
            assert ((got.double() - bf16.double()).abs() <= 2 * ulp).all()


def test_packed_fp32_linear_serves_small_batches_and_matches():
    """fp32 weights on CPU get a oneDNN-packed copy for batches of up to PACKED_MAX_ROWS rows; the
    result agrees with the exact one to fp32 rounding, bias included; larger batches keep F.linear."""
    from thrifty.layers.linear import PACKED_MAX_ROWS, Linear

    torch.manual_seed(0)
    layer = Linear(96, 200, bias=True)
    layer.prepack()
    if not torch.backends.mkldnn.is_available():
        assert layer.packed is None
        return
    assert layer.packed is not None
    for rows in (1, 7, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1):
        x = torch.randn(rows, 96)
        got = layer(x)
        exact = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        assert got.shape == (rows, 200) and torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5)
        if rows > PACKED_MAX_ROWS:
            assert torch.equal(got, torch.nn.functional.linear(x, layer.weight, layer.bias))
    bf16 = Linear(96, 200).to(torch.bfloat16)
    bf16.prepack()
    assert bf16.packed is None  # bf16 weights keep their own path


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bf16_model_close_to_transformers_bf16(tmp_path, backend):
    """bf16 end to end (the native kernels; on the torch path, the widened matmuls and decode
    attention on CPUs without native bf16): prefill logprobs stay within bf16 noise of
    transformers running the same weights in bf16."""
    folder, hf_model = _make_folder(tmp_path, "llama")
    hf_model = hf_model.to(torch.bfloat16)
    llm = LLM(str(folder), dtype="bfloat16", backend=backend)
    prompts = [list(range(100, 170)), [5, 17, 900, 33, 4000, 12]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True), use_tqdm=False)
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
        for tid, lp in out.outputs[0].logprobs[0].items():
            assert lp.logprob == pytest.approx(ref[tid].item(), abs=0.05)
        assert len(out.outputs[0].token_ids) == 8
