"""Request bodies of the HTTP API (OpenAI and LightLLM), validated with pydantic.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do; values out of range are
rejected with a 400 by SamplingParams' own validation (see to_sampling_params).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Integer ranges the workers' gRPC fields can carry (uint32 / int64), so a value out of range is a 400
# naming the field instead of a failure deep inside the request; MAX_N is OpenAI's limit on n.
UINT31 = (1 << 31) - 1
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]
TokenId = Annotated[int, Field(ge=0, le=UINT31)]
MAX_N = 128


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionSpec(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # true: a call's arguments are grammar-constrained to `parameters`


class ToolSpec(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedToolChoiceFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class SamplingFields(_Lenient):
    """Sampling options shared by chat and completions (OpenAI names plus vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=UINT31)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Seed | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=UINT31)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    user: str | None = None
    # Constraints on the output (router/constraint_params.py, router/structured_request.py).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    best_of: int | None = None


class ChatMessage(_Lenient):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=UINT31)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolSpec] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    max_tokens: int | None = Field(16, ge=1, le=UINT31)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class GenerateParameters(_Lenient):
    """LightLLM's `parameters` object."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(-1, ge=-1, le=UINT31)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = Field(16, ge=1, le=UINT31)
    min_new_tokens: int = Field(0, ge=0, le=UINT31)
    stop_sequences: Union[str, list[str], None] = None
    ignore_eos: bool = False
    seed: Seed | None = None
    return_details: bool = False
    skip_special_tokens: bool = True
    best_of: int = Field(1, ge=1, le=MAX_N)
    n: int = Field(1, ge=1, le=MAX_N)


class GenerateRequest(_Lenient):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
