"""The offline API: `LLM(...).generate(prompts, sampling_params)`, as in vLLM."""

from __future__ import annotations

from typing import Sequence

from thrifty.config import EngineConfig
from thrifty.engine.llm_engine import LLMEngine, PromptType
from thrifty.engine.sleep import SleepResult
from thrifty.outputs import RequestOutput
from thrifty.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        """kwargs are EngineConfig fields (dtype, device, max_model_len, kv_cache_memory,
        enable_prefix_caching, max_num_seqs, max_num_batched_tokens, block_size, seed, ...)."""
        unknown = set(kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"LLM: unknown argument(s) {sorted(unknown)}")
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> SleepResult:
        """Frees memory until wake_up() (vLLM's LLM.sleep; needs enable_sleep_mode=True): level 1
        the KV cache (on CUDA the weights also move to host memory), level 2 the weights too,
        reloaded from the model path on wake. See LLMEngine.sleep."""
        return self.llm_engine.sleep(level)

    def wake_up(self) -> float:
        """Returns the seconds waking took."""
        return self.llm_engine.wake_up()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """priority: one per prompt, with scheduling_policy="priority" (lower is served first)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority: {len(priorities)} given for {len(prompts)} prompts")
        engine = self.llm_engine
        if engine.is_sleeping:
            raise RuntimeError("LLM.generate: the engine is asleep; call wake_up() first")
        # Validate everything before any work starts, so a bad prompt rejects the whole call.
        tokenized = [engine.tokenize_prompt(p) for p in prompts]
        for (_, ids), p in zip(tokenized, priorities):
            engine.validate(ids)
            engine.check_priority(p)
        ids = [engine.add_request({"prompt": text, "prompt_token_ids": tok}, sp, priority=p)
               for (text, tok), sp, p in zip(tokenized, params, priorities)]
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = [
            {"prompt_token_ids": tok.apply_chat_template(
                conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=True, return_dict=False)}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in request_ids]
