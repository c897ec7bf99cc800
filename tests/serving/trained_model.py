"""A tiny glm4_moe checkpoint trained for a few seconds to reproduce fixed replies.

The replies contain what the router's parsers must handle on the real model path: `<think>` reasoning,
a GLM-4.7 compact tool call, a GLM-4.5 style tool call with non-string arguments, and plain content with
thinking turned off. Each prompt is rendered by the model's own chat template exactly as the router
renders it, so greedy decoding through glmserve reproduces each reply token for token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmserve.engine.tiny_model import build_tiny_model
from glmserve.engine.tokenizer import Tokenizer

SEED = 1234
MAX_STEPS = 400
LEARNING_RATE = 1e-2
# Training stops once every reply token is the argmax by at least this logit margin, so that the small
# numeric differences between transformers and glmserve's own kernels cannot flip a greedy choice.
MIN_MARGIN = 3.0

GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}
SET_CONFIG = {"type": "function", "function": {
    "name": "set_config", "description": "Change settings",
    "parameters": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                                    "options": {"type": "object"}}}}}

SKY_QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
TRIP_REQUEST = [{"role": "user", "content": "Plan my Paris trip; check the forecast."}]
CONFIG_REQUEST = [{"role": "user", "content": "Tag the run fast and small, level 2 with debug."}]

WEATHER_CALL_ARGS = ("<arg_key>city</arg_key><arg_value>Paris</arg_value>"
                     "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")


@dataclass(frozen=True)
class Conversation:
    """One fixed request and the exact text the model is trained to answer with (then `eos`)."""

    messages: list
    reply: str
    eos: str
    tools: list | None = None
    chat_template_kwargs: dict = field(default_factory=dict)
    # Text the router appends to the rendered prompt itself (a forced tool call closes an open <think>).
    forced_suffix: str = ""


CONVERSATIONS: dict[str, Conversation] = {
    # a) thinking on: the template opens <think> in the prompt, the model closes it.
    "reasoning": Conversation(SKY_QUESTION, "Light scatters in air.</think>Because of scattering.", "<|user|>"),
    # b) reasoning, then a GLM-4.7 compact tool call; GLM ends a tool-call turn with <|observation|>.
    "glm47_call": Conversation(WEATHER_QUESTION, "The user wants a forecast.</think><tool_call>get_weather"
                               + WEATHER_CALL_ARGS, "<|observation|>", tools=[GET_WEATHER]),
    # c) GLM-4.5 layout (newlines after the name and between pairs), content before it, list/object values.
    "glm45_call": Conversation(
        CONFIG_REQUEST,
        "Tags and options are needed.</think>\nSaving the config.\n<tool_call>set_config\n"
        '<arg_key>tags</arg_key>\n<arg_value>["fast", "small"]</arg_value>\n'
        '<arg_key>options</arg_key>\n<arg_value>{"level": 2, "debug": true}</arg_value>\n</tool_call>',
        "<|observation|>", tools=[GET_WEATHER, SET_CONFIG]),
    # d) same question as a) with thinking off: the prompt closes <think>, the reply is plain content.
    "no_thinking": Conversation(SKY_QUESTION, "Blue light scatters most.", "<|endoftext|>",
                                chat_template_kwargs={"enable_thinking": False}),
    # b) with tool_choice naming get_weather: the router closes <think> in the prompt; the grammar makes
    # the reply that one call (the model writes it as trained, within the grammar).
    "named_choice": Conversation(WEATHER_QUESTION, "<tool_call>get_weather" + WEATHER_CALL_ARGS, "<|observation|>",
                                 tools=[GET_WEATHER], forced_suffix="</think>"),
    # e) GLM-4.7 calling a tool from inside its thinking block (no </think>): reasoning ends at <tool_call>.
    "call_in_think": Conversation(TRIP_REQUEST, "Need the weather first.<tool_call>get_weather"
                                  + WEATHER_CALL_ARGS, "<|observation|>", tools=[GET_WEATHER, SET_CONFIG]),
}


def prompt_ids(tok: Tokenizer, conv: Conversation) -> list[int]:
    """The prompt token ids the router sends to the workers for this conversation."""
    text = tok.apply_chat_template(conv.messages, tools=conv.tools, add_generation_prompt=True,
                                   **conv.chat_template_kwargs)
    return tok.encode(text + conv.forced_suffix)


def reply_ids(tok: Tokenizer, conv: Conversation) -> list[int]:
    """The token ids the model must generate: the reply, then its eos token."""
    eos = tok.token_to_id(conv.eos)
    assert eos in tok.eos_token_ids, f"{conv.eos} is not a stop token of this model"
    return tok.encode(conv.reply) + [eos]


def _batch(tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 except on reply tokens). With causal attention, real tokens
    never see the padding after them, so no attention mask is needed."""
    seqs = [(prompt_ids(tok, c), reply_ids(tok, c)) for c in CONVERSATIONS.values()]
    length = max(len(p) + len(r) for p, r in seqs)
    pad = tok.pad_token_id
    inputs = torch.full((len(seqs), length), pad, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for row, (p, r) in enumerate(seqs):
        inputs[row, : len(p) + len(r)] = torch.tensor(p + r)
        labels[row, len(p): len(p) + len(r)] = torch.tensor(r)
    return inputs, labels


def _smallest_margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """min over reply tokens of (target logit - best other logit); negative when greedy would go wrong."""
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    others = logits.scatter(-1, targets[:, None], float("-inf")).amax(-1)
    return (target - others).min().item()


def train_tool_model(out_dir: Path) -> Path:
    """Build the tiny model in out_dir, train it on CONVERSATIONS and save it back; returns out_dir.

    Writes train_info.json (steps, seconds, final loss and margin) next to the weights.
    """
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    out_dir = Path(out_dir)
    # No MTP layer (transformers would drop it on save, and nothing here uses it); a context longer than
    # the default 512 tokens, which the two-tool prompt plus its reply exceeds.
    build_tiny_model("glm4_moe", out_dir, seed=SEED,
                     overrides={"num_nextn_predict_layers": 0, "max_position_embeddings": 2048})
    tok = Tokenizer(out_dir)
    inputs, labels = _batch(tok)
    # Position t predicts token t+1: shift once, then keep only reply positions.
    targets = labels[:, 1:]
    on_reply = targets != -100

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.train()
    # One thread: on a shared, oversubscribed CPU, multi-threaded kernels stall for seconds per step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss, margin, steps = _train(model, inputs, targets, on_reply)
    finally:
        torch.set_num_threads(threads)

    model.eval()
    model.save_pretrained(out_dir)  # config.json, generation_config.json (same eos ids), model.safetensors
    info = {"steps": steps, "seconds": round(time.monotonic() - started, 1), "loss": loss, "margin": margin}
    (out_dir / "train_info.json").write_text(json.dumps(info))
    return out_dir


def _train(model, inputs, targets, on_reply) -> tuple[float, float, int]:
    """Optimise until every reply token wins by MIN_MARGIN; returns (loss, margin, optimizer steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    margin = float("-inf")
    for step in range(MAX_STEPS + 1):
        hidden = model.model(input_ids=inputs).last_hidden_state[:, :-1]
        logits = model.lm_head(hidden[on_reply])
        loss = torch.nn.functional.cross_entropy(logits, targets[on_reply])
        margin = _smallest_margin(logits.detach(), targets[on_reply])
        if margin >= MIN_MARGIN:
            return loss.item(), margin, step
        opt.zero_grad()
        loss.backward()
        opt.step()
    raise RuntimeError(f"training did not converge in {MAX_STEPS} steps (smallest margin {margin:.2f})")
