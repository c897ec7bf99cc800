"""Chat-completion chunks rewritten into Anthropic stream events: block order and indices, tool-call
argument fragments, stop reasons, and an error part-way through."""

from __future__ import annotations

import json

from glmserve.router.serving_anthropic import _EventWriter, stop_fields


def _events(lines: list[str]) -> list[tuple[str, dict]]:
    out = []
    for e in lines:
        name, data = e.strip().split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def _chunk(**delta) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def test_thinking_text_and_two_tool_calls():
    w = _EventWriter("m", None)
    raw = w.push({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "prompt_token_ids": [1, 2]})
    raw += w.push(_chunk(reasoning_content="hm"))
    raw += w.push(_chunk(content="ok"))
    raw += w.push(_chunk(tool_calls=[{"index": 0, "id": "c0", "type": "function",
                                      "function": {"name": "f", "arguments": '{"a": '}}]))
    raw += w.push(_chunk(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]))
    raw += w.push(_chunk(tool_calls=[{"index": 1, "id": "c1", "type": "function",
                                      "function": {"name": "g", "arguments": "{}"}}]))
    raw += w.push({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    raw += w.push({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 7}})
    events = _events(raw + w.finish())
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 2
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use", "tool_use"]
    assert [(b.get("id"), b.get("name")) for b in starts[2:]] == [("c0", "f"), ("c1", "g")]
    starts_idx = [d["index"] for n, d in events if n == "content_block_start"]
    stops_idx = [d["index"] for n, d in events if n == "content_block_stop"]
    assert starts_idx == stops_idx == [0, 1, 2, 3]
    partial = "".join(d["delta"]["partial_json"] for n, d in events
                      if n == "content_block_delta" and d["index"] == 2 and d["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"a": 1}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"output_tokens": 7}


def test_error_mid_stream_ends_with_an_error_event():
    w = _EventWriter("m", None)
    raw = w.push(_chunk(content="a"))
    raw += w.push({"error": {"message": "decode worker lost", "type": "service_unavailable", "code": "503"}})
    events = _events(raw)
    assert w.failed and events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                          "message": "decode worker lost"}})


def test_stop_fields():
    assert stop_fields("length", None, None) == ("max_tokens", None)
    assert stop_fields("stop", "END", ["END"]) == ("stop_sequence", "END")
    assert stop_fields("stop", 151336, ["END"]) == ("end_turn", None)  # an eos token id, not a stop string
    assert stop_fields("tool_calls", None, None) == ("tool_use", None)
