"""From an API request body to engine SamplingParams, with the context-length checks of vLLM."""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.sampling_params import SamplingParams
from glmserve.router.backend import ModelInfo
from glmserve.router.errors import APIError
from glmserve.router.protocol import SamplingFields


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults from the model's generation_config.json (as vLLM applies them)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def max_tokens_for(requested: int | None, prompt_len: int, info: ModelInfo) -> int:
    room = info.max_model_len - prompt_len
    if prompt_len >= info.max_model_len or room < 1:
        raise APIError(400, f"This model's maximum context length is {info.max_model_len} tokens. However, "
                            f"your prompt has {prompt_len} tokens, leaving no room for output.",
                       param="messages", code="context_length_exceeded")
    if requested is None:
        return room
    if requested < 1:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    if prompt_len + requested > info.max_model_len:
        raise APIError(400, f"This model's maximum context length is {info.max_model_len} tokens. However, "
                            f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                            f"{requested} for the completion). Reduce the prompt or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def build_sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None,
                          defaults: SamplingDefaults) -> SamplingParams:
    def pick(value, default):
        return default if value is None else value

    try:
        return SamplingParams(
            n=body.n,
            temperature=pick(body.temperature, defaults.temperature),
            top_p=pick(body.top_p, defaults.top_p),
            top_k=pick(body.top_k, defaults.top_k),
            min_p=pick(body.min_p, 0.0),
            presence_penalty=pick(body.presence_penalty, 0.0),
            frequency_penalty=pick(body.frequency_penalty, 0.0),
            repetition_penalty=pick(body.repetition_penalty, 1.0),
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
        )
    except ValueError as exc:  # SamplingParams' messages start with the field's name
        raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from exc


def per_choice_params(params: SamplingParams) -> list[SamplingParams]:
    """n choices become n engine requests; seeded ones get distinct seeds so they differ."""
    out = []
    for i in range(params.n):
        p = params.clone()
        p.n = 1
        if params.seed is not None:  # wraps within int64, so a seed near the top stays valid
            p.seed = (params.seed + i + (1 << 63)) % (1 << 64) - (1 << 63)
        out.append(p)
    return out
