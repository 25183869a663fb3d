"""AsyncLLM: the engine loop behind the server, driven directly with asyncio."""

from __future__ import annotations

import asyncio

import pytest
from conftest import PROMPTS

from thrifty import SamplingParams
from thrifty.config import EngineConfig
from thrifty.engine.async_llm import AsyncLLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_config():
    return EngineConfig(dtype="float32", seed=0)


async def _collect(llm: AsyncLLM, prompt: str, params: SamplingParams, request_id: str) -> tuple[str, list[int], str]:
    ids = llm.engine.tokenizer.encode(prompt)
    text, tokens, reason = "", [], None
    async for out in llm.generate(ids, params, request_id, prompt):
        c = out.outputs[0]
        text += c.text
        tokens += c.token_ids
        reason = c.finish_reason
    return text, tokens, reason


def test_deltas_concatenate_to_the_offline_result(engine_config, llm):
    stop_params = SamplingParams(temperature=0, max_tokens=40)
    refs = llm.generate(PROMPTS[:5], stop_params, use_tqdm=False)
    # A stop string spanning two words of the greedy output: its first word must not leak into
    # the stream before the second one shows it is a stop.
    words = refs[2].outputs[0].text.split()
    stop = f"{words[3]} {words[4]}"

    async def main():
        alm = AsyncLLM(engine_config)
        alm.start()
        results = await asyncio.gather(*(_collect(alm, p, stop_params, f"r{i}") for i, p in enumerate(PROMPTS[:5])))
        stopped = await _collect(alm, PROMPTS[2], SamplingParams(temperature=0, max_tokens=40, stop=[stop]), "s")
        await alm.shutdown()
        return results, stopped

    results, stopped = asyncio.run(main())
    for (text, tokens, reason), ref in zip(results, refs):
        assert (text, tokens, reason) == (ref.outputs[0].text, ref.outputs[0].token_ids, ref.outputs[0].finish_reason)
    full = refs[2].outputs[0].text
    assert stopped[0] == full[: full.index(stop)] and stopped[2] == "stop"


def test_a_failing_step_fails_only_its_requests(engine_config):
    async def main():
        alm = AsyncLLM(engine_config)
        execute = alm.engine.runner.execute

        def flaky(out):
            if any(s.request.request_id == "poison" for s in out.scheduled):
                raise RuntimeError("simulated kernel failure")
            return execute(out)

        alm.engine.runner.execute = flaky
        alm.start()
        params = SamplingParams(temperature=0, max_tokens=8)
        with pytest.raises(RuntimeError, match="simulated kernel failure"):
            await _collect(alm, "hello", params, "poison")
        text, tokens, _ = await _collect(alm, PROMPTS[0], params, "fine")
        assert alm.is_running and len(tokens) == 8 and text
        assert alm.engine.kv_cache_manager.pool.num_used_blocks == 0
        await alm.shutdown()

    asyncio.run(main())


def test_leaving_early_aborts_and_frees(engine_config):
    async def main():
        alm = AsyncLLM(engine_config)
        alm.start()
        ids = alm.engine.tokenizer.encode(PROMPTS[7])
        params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        agen = alm.generate(ids, params, "leaver")
        async for _ in agen:
            break  # the consumer goes away after the first delta
        await agen.aclose()
        for _ in range(100):
            if not alm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        assert not alm.engine.has_unfinished_requests()
        assert alm.engine.kv_cache_manager.pool.num_used_blocks == 0
        with pytest.raises(ValueError, match="empty"):
            async for _ in alm.generate([], params, "empty"):
                pass
        await alm.shutdown()

    asyncio.run(main())
