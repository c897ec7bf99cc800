"""Render a model's jinja chat template the way transformers' `apply_chat_template(tokenize=False)` does.

Prompts must be byte-identical to what the model saw in training, and the templates shipped with models are
written against transformers' environment: a sandbox with trim_blocks/lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII text and takes json.dumps options.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Older names for a message's reasoning; templates read `reasoning_content` (and gpt-oss ones `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A template called raise_exception(), or the request cannot be rendered."""


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers); render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller):
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, so templates cannot reach Python internals through it."""

    def __init__(*args, **kwargs):  # noqa: N805 - same trick as jinja's Namespace to allow `self=` keys
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


class _SafeDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja's built-in filter: no HTML escaping, non-ASCII kept, json.dumps options exposed.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    return env.from_string(source)


def select_chat_template(template: str | list | Mapping | None, tools: Any = None) -> str:
    """Pick from named templates as transformers does: 'tool_use' when tools are given, else 'default'."""
    if template is None:
        raise ChatTemplateError("this model has no chat template")
    if isinstance(template, str):
        return template
    named = dict(template) if isinstance(template, Mapping) else {t["name"]: t["template"] for t in template}
    if tools and "tool_use" in named:
        return named["tool_use"]
    if "default" in named:
        return named["default"]
    raise ChatTemplateError(f"no 'default' among the named chat templates {sorted(named)}")


def to_plain(value: Any) -> Any:
    """Deep copy into plain JSON-like types (dicts, lists, str, numbers); pydantic models and dataclasses too."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return to_plain(value.model_dump())
    raise TypeError(f"cannot pass a {type(value).__name__} to a chat template")


def _parse_tool_call_arguments(message: dict) -> None:
    # OpenAI clients send arguments as a JSON string; templates iterate them as a mapping (vLLM parses too).
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise ChatTemplateError(f"tool call arguments are not valid JSON: {args!r}") from exc


def normalize_messages(messages: Iterable[Any]) -> list[dict]:
    """Plain copies of the messages, prepared the way transformers (and vLLM) prepare them."""
    out = []
    for raw in messages:
        message = to_plain(raw)
        if not isinstance(message, dict):
            raise ChatTemplateError(f"a chat message must be a mapping, got {type(raw).__name__}")
        # Templates handle a missing key but often print a None (e.g. OpenAI's content=None with tool calls).
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        if message.get("role") == "assistant":
            _parse_tool_call_arguments(message)
        out.append(message)
    return out


def render_chat_template(template: str, messages: Iterable[Any], *, tools: list | None = None,
                         documents: list | None = None, add_generation_prompt: bool = False,
                         special_tokens: Mapping[str, str] | None = None, **kwargs: Any) -> str:
    """Render one conversation. special_tokens are the named ones (bos_token, eos_token, ...); kwargs
    (e.g. enable_thinking) are template variables and win over special_tokens on a clash."""
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping) and not callable(getattr(tool, "model_dump", None)):
                raise ChatTemplateError("a tool must be a JSON schema mapping")
    variables = {**dict(special_tokens or {}), **to_plain(kwargs)}
    try:
        return compile_chat_template(template).render(
            messages=normalize_messages(messages), tools=to_plain(tools), documents=to_plain(documents),
            add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
