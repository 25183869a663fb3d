"""Tool calling's pieces: the request's tools and tool_choice checked, calls parsed out of text
(whole and as it streams), the grammar that enforces required and named choices, and the turns
written for a template that knows no tools."""

from __future__ import annotations

import json

import pytest

from thrifty.entrypoints.openai.errors import APIError
from thrifty.entrypoints.openai.tools import (END, TAG, ToolCallParser, check_tools, grammar, parse, resolve_choice,
                                              tool_turn_as_text)
from thrifty.structured_output import StructuredOutputManager

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def test_tools_and_tool_choice_are_checked():
    tools = check_tools([WEATHER, TIME])
    assert resolve_choice(None, tools, True) == "auto" and resolve_choice(None, [], False) == "none"
    assert resolve_choice("required", tools, False) == "required"
    assert resolve_choice({"type": "function", "function": {"name": "get_time"}}, tools, False) == "get_time"
    for bad_tools, words in [([{"type": "function"}], "expected"), ([{"type": "code", "function": {}}], "expected"),
                             ([{"type": "function", "function": {"name": "a b"}}], "letters"),
                             ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema")]:
        with pytest.raises(APIError, match=words) as e:
            check_tools(bad_tools)
        assert e.value.param == "tools"
    for choice, words in [({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
                          ("sometimes", "expected"), ({"type": "function"}, "expected"),
                          ("auto", "--enable-auto-tool-choice")]:
        with pytest.raises(APIError, match=words) as e:
            resolve_choice(choice, tools, False)
        assert e.value.param == "tool_choice"
    with pytest.raises(APIError, match="needs tools"):
        resolve_choice("required", [], True)


def test_calls_are_parsed_whole_and_as_they_stream():
    text = (f'Let me check. {TAG}[{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}, '
            f'{{"name": "get_time", "arguments": {{"zone": "CET"}}}}]{END}')
    content, calls = parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {"zone": "CET"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29 and calls[0].id != calls[1].id
    hermes = f'{TAG}{{"name": "get_time", "arguments": {{"zone": "UTC"}}}}{END}\n{TAG}{{"name": "get_weather", ' \
             f'"parameters": {{"city": "Rome"}}}}{END}'
    assert [c.name for c in parse(hermes)[1]] == ["get_time", "get_weather"] and parse(hermes)[0] is None
    assert parse("No tools needed.") == ("No tools needed.", [])
    assert parse(f"{TAG}not json{END}") == (f"{TAG}not json{END}", [])  # not a call: content
    # Streamed a few characters at a time: the same content and calls, and text that could start
    # a tag is held back until it is known not to.
    for size in (1, 3, 7):
        parser, content, calls = ToolCallParser(), "", []
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for i, piece in enumerate(pieces):
            c, found = parser.feed(piece, final=i == len(pieces) - 1)
            assert "<" not in c  # never a piece of a tag
            content, calls = content + c, calls + found
        assert content.strip() == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    parser = ToolCallParser()
    assert parser.feed("a <tool") == ("a ", []) and parser.feed(" b", final=True) == ("<tool b", [])


@pytest.fixture(scope="module")
def manager():
    from thrifty.model.loader import load_tokenizer, resolve_model

    return StructuredOutputManager(load_tokenizer(resolve_model(None)), 49152, frozenset({2})), \
        load_tokenizer(resolve_model(None))


@pytest.mark.parametrize("parser", ["smollm2", "hermes"])
def test_required_and_named_choices_compile_to_grammars_that_take_only_valid_calls(manager, parser):
    mgr, tok = manager
    one = lambda name, args: {"name": name, "arguments": args}  # noqa: E731

    def text(calls):
        if parser == "smollm2":
            return TAG + json.dumps(calls) + END
        return "".join(TAG + json.dumps(c) + END for c in calls)

    def takes(constraint, s):
        template, _ = mgr.compile(constraint)
        m = template.deep_copy()
        ids = tok.encode(s, add_special_tokens=False) + [2]
        return m.validate_tokens(ids) == len(ids)

    tools = [WEATHER, TIME]
    named, required = grammar(tools, "get_weather", parser), grammar(tools, "required", parser)
    weather, time_ = one("get_weather", {"city": "Oslo"}), one("get_time", {"zone": "UTC"})
    assert takes(named, text([weather])) and not takes(named, text([time_]))
    assert not takes(named, text([one("get_weather", {"town": "Oslo"})]))  # arguments follow the schema
    assert not takes(named, text([weather, weather]))  # exactly one call
    assert takes(required, text([time_])) and takes(required, text([weather, time_]))
    assert not takes(required, text([one("get_time", {"zone": "EST"})])) and not takes(required, "Sure!")


def test_turns_for_a_template_without_tools():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assistant = tool_turn_as_text({"role": "assistant", "content": ""}, calls, "smollm2")
    assert assistant["content"] == f'{TAG}[{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}]{END}'
    assert parse(assistant["content"])[1][0].arguments == '{"city": "Oslo"}'  # what the parser reads back
    tool = tool_turn_as_text({"role": "tool", "content": "12 C, rain"}, None, "smollm2")
    assert tool == {"role": "user", "content": "<tool_response>\n12 C, rain\n</tool_response>"}
    user = {"role": "user", "content": "hi"}
    assert tool_turn_as_text(user, None, "hermes") is user
