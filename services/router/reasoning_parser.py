"""GLM reasoning parser: splits model text into reasoning_content (the <think> block) and content.

GLM-4.5/4.6 write `<think>...</think>` themselves (after a newline); GLM-4.7's chat template opens
`<think>` in the prompt, so its output starts inside the block. Which of the two applies is decided from
the rendered prompt (`starts_in_think`: did it end with an open `<think>`?), never from the model name:
- the output starts inside the block when the prompt left it open, or when it opens with `<think>`;
  otherwise it is content (a GLM-4.5 reply that skipped thinking is not swallowed as reasoning);
- reasoning ends at `</think>`, or at `<tool_call>` (GLM-4.7 may call a tool from inside the block:
  the call is kept for the tool parser), and a missing end means everything so far is reasoning.
With thinking disabled everything is content.
Leading whitespace of the reasoning and of the content is dropped (the chat template strips both
when it renders history, so it carries nothing). `parse` runs the streaming machine on the whole
text, so streaming and non-streaming always agree; a partial `</think>` is never emitted.
"""

from __future__ import annotations

from glmserve.router.tool_parsers import partial_tag_len

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START = "<tool_call>"


class Glm45ReasoningParser:
    def __init__(self, thinking_enabled: bool = True, starts_in_think: bool = True):
        self._thinking_enabled = thinking_enabled
        self._starts_in_think = starts_in_think
        # start -> reasoning_lead -> reasoning -> content_lead -> content; *_lead skip whitespace.
        self._state = "start" if thinking_enabled else "content_lead"
        self._buf = ""

    def parse(self, text: str) -> tuple[str | None, str]:
        """Non-streaming: (reasoning or None when there is none, content)."""
        fresh = type(self)(self._thinking_enabled, self._starts_in_think)
        r1, c1 = fresh.feed(text)
        r2, c2 = fresh.finish()
        return (r1 + r2) or None, c1 + c2

    def feed(self, delta: str) -> tuple[str, str]:
        """Streaming: (reasoning delta, content delta); either may be empty."""
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        """End of output: flush what was held back."""
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while True:
            state = self._state
            if state in ("start", "reasoning_lead", "content_lead"):
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
            if state == "start":
                if self._buf.startswith(THINK_START):
                    self._buf, self._state = self._buf[len(THINK_START):], "reasoning_lead"
                elif THINK_START.startswith(self._buf) and not final:
                    break  # "<thi..." may still become the opening tag
                else:
                    self._state = "reasoning_lead" if self._starts_in_think else "content_lead"
            elif state == "reasoning_lead":
                self._state = "reasoning"
            elif state == "reasoning":
                ends = [(i, tag) for tag in (THINK_END, TOOL_CALL_START) if (i := self._buf.find(tag)) >= 0]
                if ends:
                    i, tag = min(ends)
                    reasoning.append(self._buf[:i])
                    # </think> is dropped; a <tool_call> stays, it starts the content.
                    self._buf = self._buf[i + len(THINK_END):] if tag == THINK_END else self._buf[i:]
                    self._state = "content_lead"
                    continue
                keep = 0 if final else partial_tag_len(self._buf, (THINK_END, TOOL_CALL_START))
                reasoning.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            elif state == "content_lead":
                self._state = "content"
            else:
                content.append(self._buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)


_REASONING_PARSERS: dict[str, type[Glm45ReasoningParser]] = {"glm45": Glm45ReasoningParser}


def get_reasoning_parser(name: str) -> type[Glm45ReasoningParser]:
    try:
        return _REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {sorted(_REASONING_PARSERS)}") from None
