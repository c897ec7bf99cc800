"""Router configuration, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.media import DEFAULT_MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class RouterConfig:
    model: str  # model directory (tokenizer, chat template, generation_config)
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    tool_call_parser: str | None = None  # glm45 | glm47
    reasoning_parser: str | None = None  # glm45
    request_timeout: float | None = 600.0
    routing_policy: str = "prefix-affinity"  # prefix-affinity | least-loaded | round-robin
    health_interval: float = 1.0
    # A request waits this long for a healthy worker before a 503: long enough for a restart.
    worker_wait_timeout: float = 30.0
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    api_key: str | None = None  # required as a Bearer token (or x-api-key) when set
    chat_template: str | None = None  # replaces the model's chat template
    tokenizer: str | None = None  # tokenizer directory, when not the model's
    # Images (GLM-4.xV models): local files only under this directory; at most this many per request;
    # http(s) images are fetched with this timeout and byte cap; decoded pixels per image are capped.
    allowed_local_media_path: str | None = None
    limit_mm_per_prompt: int = 16
    media_fetch_timeout: float = 10.0
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
