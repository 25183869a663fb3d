"""Tool calling on chat completions: the tools in the prompt, the calls parsed out of the model's
text, and tool_choice "required" or a named function enforced with a grammar.

Calls are written as text between `<tool_call>` and `</tool_call>` (ordinary tokens for the
default model). Two formats, as vLLM's `--tool-call-parser` names them:
- smollm2: a JSON list of calls inside one tag, `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`,
  the format SmolLM2 was tuned on (Argilla's Synth-APIGen, as Ollama's smollm2 template writes it);
- hermes: one JSON object per tag, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
Either parser reads both: each tag may hold an object or a list of them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from thrifty.entrypoints.openai.errors import bad_request
from thrifty.sampling_params import StructuredOutputsParams

PARSERS = ("smollm2", "hermes")
TAG, END = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
# Inside the enforced grammar JSON is written compactly, as for response_format.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call is "
    "needed, please make the tool calls an empty list '[]'.\n{example}")
EXAMPLES = {
    "smollm2": (f'{TAG}[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
                f'... (more tool calls as required)\n]{END}'),
    "hermes": f'{TAG}\n{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}\n{END}',
}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools: list) -> list[dict]:
    """The request's tools, each {"type": "function", "function": {"name", "description"?,
    "parameters"?}}; a 400 naming the first that is not."""
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}]: expected {{'type': 'function', 'function': {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise bad_request(f"tools[{i}].function.name: must be 1-64 letters, digits, '_' or '-', got "
                              f"{fn.get('name')!r}", "tools")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise bad_request(f"tools[{i}].function.parameters: must be a JSON schema object", "tools")
    return tools


def resolve_choice(tool_choice, tools: list[dict], auto_enabled: bool) -> str:
    """"none", "auto", "required", or the named function's name (a 400 for anything else)."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request("tool_choice: expected 'none', 'auto', 'required' or {'type': 'function', "
                              "'function': {'name': ...}}", "tool_choice")
        if name not in names:
            raise bad_request(f"tool_choice: function {name!r} is not among the tools ({', '.join(names) or 'none'})",
                              "tool_choice")
        return name
    if tool_choice not in ("none", "auto", "required"):
        raise bad_request(f"tool_choice: expected 'none', 'auto', 'required' or a function, got {tool_choice!r}",
                          "tool_choice")
    if tool_choice != "none" and not tools:
        raise bad_request(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    if tool_choice == "auto" and not auto_enabled:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                          "tool_choice")
    return tool_choice


def system_prompt(tools: list[dict], parser: str) -> str:
    return SYSTEM_PROMPT.format(tools=json.dumps(tools, ensure_ascii=False), example=EXAMPLES[parser])


def tool_turn_as_text(message: dict, tool_calls: list[dict] | None, parser: str) -> dict:
    """A turn for a template that knows no tools: an assistant's calls written in the parser's
    format after its content, a tool's result as a user turn in <tool_response> tags (as
    Ollama's smollm2 template writes them)."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    if message["role"] != "assistant" or not tool_calls:
        return message
    calls = []
    for call in tool_calls:
        fn = call.get("function") or {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            pass  # the client's own text: kept as it is
        calls.append({"name": fn.get("name"), "arguments": args})
    if parser == "smollm2":
        text = f"{TAG}{json.dumps(calls, ensure_ascii=False)}{END}"
    else:
        text = "\n".join(f"{TAG}{json.dumps(c, ensure_ascii=False)}{END}" for c in calls)
    return {**message, "content": (message["content"] + "\n" if message["content"] else "") + text}


def grammar(tools: list[dict], choice: str, parser: str) -> StructuredOutputsParams:
    """The constraint for tool_choice "required" (one call or more, of any tool) or a named
    function (exactly one call of it): the calls in the parser's format, each call's arguments
    valid for its function's parameters."""
    chosen = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    calls = [{"type": "object", "properties": {"name": {"const": fn["name"]},
                                                "arguments": fn.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for fn in chosen]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    one = choice != "required"
    if parser == "smollm2":
        schema = {"type": "array", "items": call, "minItems": 1, **({"maxItems": 1} if one else {}),
                  "x-guidance": COMPACT}
        lark = f"start: {json.dumps(TAG)} %json{json.dumps(schema)} {json.dumps(END)}"
    else:
        schema = {**call, "x-guidance": COMPACT}
        body = f"{json.dumps(TAG)} %json{json.dumps(schema)} {json.dumps(END)}"
        lark = f"start: call{'' if one else '+'}\ncall: {body}"
    return StructuredOutputsParams(grammar=lark)


def _calls_in(block: str) -> list[ToolCall] | None:
    """The calls in one tag's text (an object or a list of them), or None if it is not that."""
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        calls.append(ToolCall(item["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls


class ToolCallParser:
    """Splits a choice's text, as it streams, into content and complete tool calls: text that
    could be the start of a tag is held back, a tag's text until it closes. A tag that does not
    hold calls stays content."""

    def __init__(self) -> None:
        self.pending = ""  # text not yet sent: a possible tag start, or an open tag
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """New text -> (content to send now, calls completed now); `final` flushes what is held."""
        self.pending += text
        content, calls = "", []
        while self.pending:
            start = self.pending.find(TAG)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.pending, TAG)
                content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content += self.pending[:start]
            end = self.pending.find(END, start)
            if end < 0:
                if final:  # an unclosed tag: content as it is
                    content += self.pending[start:]
                    self.pending = ""
                else:
                    self.pending = self.pending[start:]
                break
            block = self.pending[start + len(TAG): end]
            found = _calls_in(block)
            if found is None:
                content += self.pending[: end + len(END)][start:]
            else:
                calls += found
            self.pending = self.pending[end + len(END):]
        self.calls += calls
        return content, calls


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's content (None if only calls) and tool calls."""
    content, calls = ToolCallParser().feed(text, final=True)
    return (content.strip() or None, calls) if calls else (content, calls)
