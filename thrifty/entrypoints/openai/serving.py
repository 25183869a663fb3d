"""/v1/completions and /v1/chat/completions on top of AsyncLLM.

Each prompt (a completions list has several) is one engine request with n choices; their
delta streams are merged, and the same loop builds both the SSE chunks and, accumulated,
the non-streamed response, so the two cannot disagree.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from thrifty.engine.async_llm import AsyncLLM
from thrifty.engine.sleep import EngineSleepingError
from thrifty.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
)
from thrifty.entrypoints.openai.errors import APIError, bad_request
from thrifty.entrypoints.openai.limits import KeyPolicy, Limiter
from thrifty.entrypoints.openai.tools import (ToolCallParser, check_tools, grammar, parse, resolve_choice,
                                              system_prompt, tool_turn_as_text)
from thrifty.machine import usable_vcpus
from thrifty.outputs import CompletionOutput, Logprob, RequestOutput
from thrifty.sampling_params import SamplingParams, StructuredOutputsParams


def from_value_error(e: ValueError) -> APIError:
    # Our ValueErrors start with the field they are about ("SamplingParams.top_p must ...").
    m = re.match(r"(?:SamplingParams\.)?(\w+)[ :]", str(e))
    param = m.group(1) if m else None
    return bad_request(str(e), "prompt" if param == "prompt_token_ids" else param)


def unavailable(e: EngineSleepingError) -> APIError:
    """The engine is asleep: 503 with Retry-After (sleep mode)."""
    return APIError(503, str(e), type="service_unavailable", headers={"Retry-After": str(e.retry_after)})


async def _primed(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream with its first chunk computed before the response starts, so that a request
    the engine's sleep ended before any output gets the 503 as its status, not in-band."""
    first = await stream.__anext__()  # (an SSE stream always ends with [DONE])

    async def rest() -> AsyncIterator[str]:
        yield first
        async for chunk in stream:
            yield chunk

    return rest()


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False  # chat streams open each choice with the assistant role
    tools: ToolCallParser | None = None  # a chat request with tools: its calls, parsed as they stream


@dataclass
class _Job:
    """One API request: its prompts (one engine request each, with n samples), already queued."""

    prompts: list[_Prompt]
    n: int
    request_ids: list[str]
    outputs: list[AsyncIterator[RequestOutput]]
    choices: list[_Choice]
    key: KeyPolicy | None


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str | None
    num_cached_tokens: int = 0
    cost_usd: float = 0.0


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf; vLLM clamps the same way


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, served_model_names: list[str], chat_template: str | None = None,
                 key_usage_observer: Callable[[str, int, int, float], None] | None = None,
                 trust_request_chat_template: bool = False, enable_auto_tool_choice: bool = False,
                 tool_call_parser: str | None = None, limiter: Limiter | None = None):
        self.llm = llm
        self.limiter = limiter  # per-key rate limits and budgets (None: no key has any)
        # tool_choice "auto" needs both (as vLLM); required and named choices work without them,
        # in the parser's format (the default model's, smollm2, if none is named).
        self.enable_auto_tool_choice = enable_auto_tool_choice and tool_call_parser is not None
        self.tool_call_parser = tool_call_parser or "smollm2"
        self.trust_request_chat_template = trust_request_chat_template
        self.key_usage_observer = key_usage_observer  # (key name, prompt tokens, generated tokens, cost)
        self.engine = llm.engine
        self.tokenizer = llm.engine.tokenizer
        self.served_model_names = served_model_names
        self.chat_template = chat_template
        # One thread compiles grammars: a second would take the other core from the forward.
        self._compile_pool = ThreadPoolExecutor(1, thread_name_prefix="thrifty-grammar")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def check_limits(self, key: KeyPolicy | None) -> None:
        """A 429 naming the limit if the key is at one. Runs before any work on the request, so a
        key over its limits costs next to nothing, and before the queue check, so it is told about
        its own limit rather than a busy server."""
        if self.limiter is not None and key is not None:
            self.limiter.enforce(key)

    def check_queue(self, num_new: int, priority: int = 0) -> None:
        # Only the requests it would wait behind count: a backlog of less urgent ones never
        # refuses a more urgent request.
        limit = self.llm.max_waiting_requests
        waiting = self.llm.num_waiting_ahead_of(priority)
        if limit is not None and waiting + num_new > limit:
            raise APIError(429, f"Too many requests waiting ({waiting} queued, {num_new} more asked, the limit is "
                           f"{limit}); retry shortly.", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    # -- shared ---------------------------------------------------------------------------
    def _reported_model(self, req: _SamplingFields) -> str:
        return req.model if req.model is not None else self.model_name  # the alias the client asked for

    def _check_unsupported(self, req: _SamplingFields) -> None:
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")

    @staticmethod
    def _structured_outputs(req: _SamplingFields) -> tuple[StructuredOutputsParams | None, str]:
        """The request's constraint, from whichever field gives it, and that field's name."""
        given: list[tuple[dict, str]] = []
        fmt = req.response_format
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                given.append(({"json_object": True}, "response_format"))
            elif fmt.type == "json_schema":
                if fmt.json_schema is None:
                    raise bad_request("response_format: type 'json_schema' needs a json_schema object with a name "
                                      "and a schema", "response_format")
                # OpenAI's schema is optional: without one, any JSON object.
                schema = fmt.json_schema.json_schema
                given.append(({"json": schema} if schema is not None else {"json_object": True}, "response_format"))
            else:
                raise bad_request(f"response_format: unknown type {fmt.type!r}; expected 'text', 'json_object' or "
                                  "'json_schema'", "response_format")
        if req.structured_outputs is not None:
            given.append((req.structured_outputs, "structured_outputs"))
        for old, new in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                         ("guided_grammar", "grammar")):
            if getattr(req, old) is not None:
                given.append(({new: getattr(req, old)}, old))
        if not given:
            return None, ""
        if len(given) > 1:
            raise bad_request(f"{' and '.join(name for _, name in given)} each constrain the output: give one "
                              "(structured_outputs is the current field)", given[1][1])
        value, name = given[0]
        try:
            return StructuredOutputsParams.from_any(value), name
        except (ValueError, TypeError) as e:
            raise bad_request(f"{name}: {e}", name) from None

    async def _compile(self, constraint: StructuredOutputsParams | None, param: str) -> float:
        """Compiles the request's grammar off the event loop (and the engine's thread), so a long
        compile stalls neither; the engine then finds it cached. Returns the machine seconds it
        took (its CPU seconds over the vCPUs this server may use, which its price is for: 0 when
        cached), which the request pays. A grammar that does not compile is a 400 naming the field
        that gave it."""
        if constraint is None:
            return 0.0
        loop = asyncio.get_running_loop()
        try:
            _, seconds = await loop.run_in_executor(self._compile_pool, self.engine.structured.compile, constraint)
        except ValueError as e:
            raise bad_request(f"{param}: {e}", param) from None
        return seconds / usable_vcpus()

    def _sampling_params(self, req: _SamplingFields, max_tokens: int, logprobs: int | None,
                         constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        try:
            return SamplingParams(
                n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                min_p=req.min_p or 0.0, seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0, max_tokens=max_tokens,
                min_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
                include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
                logprobs=logprobs, skip_special_tokens=req.skip_special_tokens, structured_outputs=constraint)
        except ValueError as e:
            raise from_value_error(e) from None

    def _max_tokens(self, num_prompt_tokens: int, requested: int | None, param: str) -> int:
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your request has "
                              f"{num_prompt_tokens} input tokens. Please reduce the length of the input.", "messages"
                              if param == "max_completion_tokens" else "prompt")
        if requested is None:
            return limit - num_prompt_tokens
        if num_prompt_tokens + requested > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, "
                              f"{requested} in the completion). Please reduce the length of the prompt or "
                              f"{param}.", param)
        return requested

    def _validate_prompt(self, token_ids: list[int]) -> None:
        try:
            self.engine.validate(token_ids)
        except ValueError as e:
            raise from_value_error(e) from None

    def priority(self, req: _SamplingFields, key_priority: int | None = None) -> int:
        """The request's priority: its own or its key's default, never more urgent than its key's."""
        priority = req.priority if req.priority is not None else key_priority or 0
        if key_priority is not None:
            priority = max(priority, key_priority)
        try:
            self.engine.check_priority(priority)
        except ValueError as e:
            raise from_value_error(e) from None
        return priority

    def _start(self, prompts: list[_Prompt], params: list[SamplingParams], base_id: str,
               key: KeyPolicy | None, compile_seconds: float = 0.0, priority: int = 0) -> _Job:
        """Queues every prompt's engine request now, so the queue limit sees them at once; the
        first pays for compiling their grammar. Once queued, the request and its prompt tokens
        count toward the key's rpm and tpm. (The key's limits are checked again: other requests of
        the key may have been accepted while this one's grammar compiled.)"""
        self.check_limits(key)
        self.check_queue(len(prompts), priority)
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        outputs = []
        try:
            for rid, p, sp in zip(ids, prompts, params):
                outputs.append(self.llm.add_request(p.token_ids, sp, rid, p.text, priority))
        except (ValueError, EngineSleepingError) as e:
            for rid in ids:
                self.llm.abort(rid)
            raise (unavailable(e) if isinstance(e, EngineSleepingError) else from_value_error(e)) from None
        if compile_seconds:
            self.llm.cost.charge(ids[0], compile_seconds)
        if self.limiter is not None and key is not None and key.name is not None:
            self.limiter.record_start(key.name, sum(len(p.token_ids) for p in prompts))
        choices = [_Choice() for _ in range(len(prompts) * params[0].n)]
        return _Job(prompts, params[0].n, ids, outputs, choices, key)

    @staticmethod
    async def _merged(outputs: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) from every prompt's request, as they come."""
        if len(outputs) == 1:
            async for out in outputs[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for out in outputs[i]:
                    queue.put_nowait((i, out))
                queue.put_nowait(done)
            except BaseException as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(outputs))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    def _usage(self, prompts: list[_Prompt], choices: list[_Choice]) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(p.num_cached_tokens for p in prompts)},
                # thrifty's addition (clients ignore it): this request's share of the engine steps it ran in
                "cost_usd": sum(p.cost_usd for p in prompts)}

    async def _run(self, job: _Job) -> AsyncIterator[tuple[int, _Choice, CompletionOutput]]:
        """Accumulates every delta into its choice and yields (choice index, choice, delta). When it
        ends (done, failed, or the client gone) unfinished requests are aborted and the usage is
        counted for the API key's name (and toward its limits: its output tokens and its cost,
        whether it finished or not)."""
        try:
            async for i, out in self._merged(job.outputs):
                prompt = job.prompts[i]
                prompt.num_cached_tokens = out.num_cached_tokens
                prompt.cost_usd = out.cost_usd or 0.0
                for c in out.outputs:
                    index = i * job.n + c.index
                    choice = job.choices[index]
                    choice.text += c.text
                    choice.token_ids += c.token_ids
                    if c.logprobs:
                        choice.logprobs += c.logprobs
                    if c.finish_reason is not None and choice.finish_reason is None:
                        choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
                    elif not (c.text or c.token_ids):
                        continue  # this choice had nothing new
                    yield index, choice, c
        finally:
            for rid in job.request_ids:
                self.llm.abort(rid)  # a no-op for the finished ones
            name = job.key.name if job.key is not None else None
            if name is not None:
                usage = self._usage(job.prompts, job.choices)
                if self.key_usage_observer is not None:
                    self.key_usage_observer(name, usage["prompt_tokens"], usage["completion_tokens"],
                                            usage["cost_usd"])
                if self.limiter is not None:
                    self.limiter.record_end(name, usage["completion_tokens"], usage["cost_usd"])

    @staticmethod
    def _sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"

    async def _sse_stream(self, req: _SamplingFields, job: _Job, head: dict,
                          choice_chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        """SSE framing shared by both endpoints: one chunk per choice dict, usage per chunk or at the
        end (stream_options), an error in-band (the status is already sent), then [DONE]."""
        opts = req.stream_options
        include_usage, continuous = bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats)
        sent = False
        try:
            async for choice in choice_chunks:
                chunk = {**head, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = self._usage(job.prompts, job.choices) if continuous else None
                yield self._sse(chunk)
                sent = True
            if include_usage:
                yield self._sse({**head, "choices": [], "usage": self._usage(job.prompts, job.choices)})
        except EngineSleepingError as e:
            if not sent:
                raise unavailable(e) from None  # no status sent yet (see _primed): the 503 itself
            yield self._sse(unavailable(e).body())
        except APIError as e:
            yield self._sse(e.body())
        except Exception as e:  # the engine died
            yield self._sse(APIError(500, str(e), type="internal_error").body())
        yield self._sse("[DONE]")

    # -- /v1/completions -------------------------------------------------------------------
    def _completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        p = req.prompt
        if isinstance(p, str):
            raw = [p]
        elif not p:
            raise bad_request("prompt: must not be empty", "prompt")
        elif isinstance(p[0], int):
            raw = [p]
        else:
            raw = list(p)
        return [_Prompt(self.encode(item), item) if isinstance(item, str) else _Prompt(list(item), None)
                for item in raw]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:  # e.g. a lone UTF-16 surrogate the tokenizer cannot take
            raise bad_request(f"prompt: cannot be tokenized: {e}", "prompt") from None

    async def create_completion(self, req: CompletionRequest, key: KeyPolicy | None = None):
        self.check_model(req.model)
        self.check_limits(key)
        self._check_unsupported(req)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported yet", "echo")
        priority = self.priority(req, key and key.priority)
        constraint, param = self._structured_outputs(req)
        prompts = self._completion_prompts(req)
        params = []
        for p in prompts:
            self._validate_prompt(p.token_ids)
            max_tokens = self._max_tokens(len(p.token_ids), req.max_tokens, "max_tokens")
            params.append(self._sampling_params(req, max_tokens, req.logprobs, constraint))
        compile_seconds = await self._compile(constraint, param)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        job = self._start(prompts, params, request_id, key, compile_seconds, priority)
        if req.echo:
            for i, choice in enumerate(job.choices):
                p = prompts[i // req.n]
                choice.text = p.text if p.text is not None else self.tokenizer.decode(p.token_ids)
        head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": self._reported_model(req)}
        if req.stream:
            return await _primed(self._sse_stream(req, job, head, self._completion_chunks(req, job)))
        async for _ in self._run(job):
            pass
        return {**head, "choices": [self._completion_choice(i, c, c.text, c.logprobs, 0)
                                    for i, c in enumerate(job.choices)],
                "usage": self._usage(prompts, job.choices)}

    def _completion_choice(self, index: int, choice: _Choice, text: str, logprobs: list | None,
                           text_offset: int, final: bool = True) -> dict:
        return {"index": index, "text": text,
                "logprobs": self._completion_logprobs(logprobs, text_offset) if logprobs else None,
                "finish_reason": choice.finish_reason if final else None,
                "stop_reason": choice.stop_reason if final else None}

    def _completion_logprobs(self, entries: list[dict[int, Logprob]], offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for entry in entries:
            sampled = next(iter(entry.values()))  # the sampled token comes first
            tokens.append(sampled.decoded_token or "")
            token_logprobs.append(_finite(sampled.logprob))
            top.append({lp.decoded_token or "": _finite(lp.logprob) for lp in entry.values()})
            offsets.append(offset)
            offset += len(sampled.decoded_token or "")
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    async def _completion_chunks(self, req: CompletionRequest, job: _Job) -> AsyncIterator[dict]:
        echoed = [False] * len(job.choices)
        sent_chars = [0] * len(job.choices)  # for text_offset
        async for index, choice, delta in self._run(job):
            text = delta.text
            if req.echo and not echoed[index]:
                echoed[index] = True
                text = choice.text[: len(choice.text) - len(delta.text)] + text
            final = delta.finish_reason is not None
            if not (text or delta.logprobs or final):
                continue  # tokens whose text is still held back (a partial character or stop string)
            yield self._completion_choice(index, choice, text, delta.logprobs, sent_chars[index], final)
            sent_chars[index] += len(text)

    # -- /v1/chat/completions --------------------------------------------------------------
    def chat_prompt(self, req: ChatCompletionRequest, tools: list[dict] | None = None) -> _Prompt:
        """The conversation through the chat template; with `tools`, a template that does not
        render tools itself gets them in a system prompt, and the calls and their results as
        text in the format the tool-call parser reads."""
        template = req.chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None) or ""
        knows_tools = "tools" in template  # (a template that renders tools reads a `tools` variable)
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad_request(f"messages[{i}].content: only text content parts are supported, "
                                          f"got type {part.get('type')!r}", "messages")
                    parts.append(part["text"])
                content = "\n".join(parts)
            msg = {"role": m.role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            if not knows_tools:  # (with tool_choice "none" too, so that the history stays readable)
                msg = tool_turn_as_text(msg, m.tool_calls, self.tool_call_parser)
            elif m.tool_calls is not None or m.tool_call_id is not None:
                msg.update({k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id))
                            if v is not None})
            messages.append(msg)
        if tools and not knows_tools:
            prompt = system_prompt(tools, self.tool_call_parser)
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": prompt + "\n\n" + messages[0]["content"]}
            else:
                messages.insert(0, {"role": "system", "content": prompt})
        if req.chat_template is not None and not self.trust_request_chat_template:
            raise bad_request("chat_template in a request is refused (a template is code the server runs); start "
                              "the server with --trust-request-chat-template to allow it", "chat_template")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, chat_template=req.chat_template or self.chat_template, tokenize=True, return_dict=False,
                **({"tools": tools} if tools and knows_tools else {}),
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message)
        except Exception as e:  # a template that rejects the conversation (roles, order, ...)
            raise bad_request(f"messages: the chat template could not render them: {e}", "messages") from None
        return _Prompt(list(ids), None)

    async def create_chat_completion(self, req: ChatCompletionRequest, key: KeyPolicy | None = None):
        self.check_model(req.model)
        self.check_limits(key)
        self._check_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        priority = self.priority(req, key and key.priority)
        tools = check_tools(req.tools or [])
        tool_choice = resolve_choice(req.tool_choice, tools, self.enable_auto_tool_choice)
        if tool_choice == "none":
            tools = []
        prompt = self.chat_prompt(req, tools)
        self._validate_prompt(prompt.token_ids)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(len(prompt.token_ids), requested, "max_completion_tokens")
        top = req.top_logprobs or 0
        constraint, param = self._structured_outputs(req)
        if tool_choice not in ("none", "auto"):  # required, or a named function: the grammar enforces it
            if constraint is not None:
                raise bad_request(f"tool_choice {tool_choice!r} and {param} each constrain the output: give one",
                                  "tool_choice")
            constraint, param = grammar(tools, tool_choice, self.tool_call_parser), "tools"
        params = [self._sampling_params(req, max_tokens, top if req.logprobs else None, constraint)]
        compile_seconds = await self._compile(constraint, param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        job = self._start([prompt], params, request_id, key, compile_seconds, priority)
        head = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": self._reported_model(req)}
        if tools:
            for c in job.choices:
                c.tools = ToolCallParser()
        if req.stream:
            return await _primed(self._sse_stream(req, job, {**head, "object": "chat.completion.chunk"},
                                                  self._chat_chunks(req, job)))
        async for _ in self._run(job):
            pass
        return {**head, "choices": [self._chat_choice(i, c, req, top) for i, c in enumerate(job.choices)],
                "usage": self._usage([prompt], job.choices)}

    def _chat_choice(self, index: int, c: _Choice, req: ChatCompletionRequest, top: int) -> dict:
        message = {"role": "assistant", "content": c.text}
        finish_reason = c.finish_reason
        if c.tools is not None:
            content, calls = parse(c.text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [call.as_dict() for call in calls]}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"index": index, "message": message,
                "logprobs": self._chat_logprobs(c.logprobs, top) if req.logprobs else None,
                "finish_reason": finish_reason, "stop_reason": c.stop_reason}

    @staticmethod
    def _chat_logprobs(entries: list[dict[int, Logprob]], top: int) -> dict:
        def item(lp: Logprob) -> dict:
            token = lp.decoded_token or ""
            return {"token": token, "logprob": _finite(lp.logprob), "bytes": list(token.encode("utf-8"))}

        content = []
        for entry in entries:
            sampled = next(iter(entry.values()))
            ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
            content.append({**item(sampled), "top_logprobs": [item(lp) for lp in ranked[:top]]})
        return {"content": content}

    async def _chat_chunks(self, req: ChatCompletionRequest, job: _Job) -> AsyncIterator[dict]:
        top = req.top_logprobs or 0
        async for index, choice, delta in self._run(job):
            final = delta.finish_reason is not None
            text, calls = delta.text, []
            if choice.tools is not None:  # text that may be a call is held back until it is known
                text, calls = choice.tools.feed(delta.text, final=final)
            if not (text or calls or delta.logprobs or final):
                continue
            if not choice.started:  # the role opens each choice, with its first output (as vLLM)
                choice.started = True
                yield {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}
            out = {"content": text} if text else {}
            if calls:
                first = len(choice.tools.calls) - len(calls)
                out["tool_calls"] = [{"index": first + i, **call.as_dict()} for i, call in enumerate(calls)]
            finish_reason = choice.finish_reason
            if final and finish_reason == "stop" and choice.tools is not None and choice.tools.calls:
                finish_reason = "tool_calls"
            yield {"index": index, "delta": out,
                   "logprobs": self._chat_logprobs(delta.logprobs, top) if req.logprobs and delta.logprobs else None,
                   "finish_reason": finish_reason if final else None,
                   **({"stop_reason": choice.stop_reason} if final else {})}
