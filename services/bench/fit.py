"""`glmserve bench` lengths that fit the server: read max_model_len from /v1/models before sending anything,
shrink the default prompt/output lengths to fit it, and fail fast when explicit ones cannot."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128
# Without --tokenizer, prompts are random words whose token count is only estimated: leave this share of
# the context as slack so the chat template and tokenization never push a request over the limit.
UNTOKENIZED_SLACK = 0.5


class BenchSetupError(ValueError):
    pass


def server_max_model_len(base_url: str, model: str, timeout: float = 10.0) -> int | None:
    url = base_url.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            cards = json.load(r).get("data") or []
    except urllib.error.HTTPError:
        return None  # a server without /v1/models: nothing to fit to
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BenchSetupError(f"cannot reach the server at {url}: {exc}") from exc
    names = [c.get("id") for c in cards]
    card = next((c for c in cards if c.get("id") == model), None)
    if card is None:
        raise BenchSetupError(f"the server does not serve model {model!r} (it serves {names}): pass --model with one of them")
    return card.get("max_model_len")


def fit_lengths(input_len: int | None, output_len: int | None, max_model_len: int | None,
                tokenized: bool, range_ratio: float = 0.0, extra_prompt_len: int = 0) -> tuple[int, int]:
    """(input_len, output_len): the defaults, shrunk to fit max_model_len; explicit values are kept and
    checked. extra_prompt_len: tokens every prompt carries besides input_len (a shared prefix)."""
    explicit_in, explicit_out = input_len is not None, output_len is not None
    input_len = DEFAULT_INPUT_LEN if input_len is None else input_len
    output_len = DEFAULT_OUTPUT_LEN if output_len is None else output_len
    if max_model_len is None:
        return input_len, output_len
    grow = 1 + range_ratio
    budget = int(max_model_len * (1.0 if tokenized else 1 - UNTOKENIZED_SLACK)) - 1
    if not explicit_out:
        output_len = max(1, min(output_len, max_model_len // 4))
    if not explicit_in:
        input_len = max(1, min(input_len, int((budget - extra_prompt_len) / grow) - int(output_len * grow)))
    need = int((input_len + output_len) * grow) + extra_prompt_len
    if need > budget:
        raise BenchSetupError(
            f"prompts of ~{int(input_len * grow) + extra_prompt_len} tokens plus {int(output_len * grow)} output "
            f"tokens do not fit the server's max_model_len of {max_model_len}"
            + ("" if tokenized else " (with slack for untokenized random words; --tokenizer makes lengths exact)")
            + ": lower --random-input-len / --random-output-len")
    return input_len, output_len
