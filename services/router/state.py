"""Everything a request handler needs, built once when the router starts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from glmserve.engine.tokenizer import Tokenizer
from glmserve.metrics import ServiceMetrics
from glmserve.router.backend import GenerationBackend
from glmserve.router.config import RouterConfig
from glmserve.router.errors import APIError
from glmserve.router.request_params import SamplingDefaults
from glmserve.router.vision_inputs import VisionInputs


def sampling_defaults(model_dir: str | Path) -> SamplingDefaults:
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return SamplingDefaults()
    g = json.loads(path.read_text())
    return SamplingDefaults(temperature=float(g.get("temperature", 1.0)), top_p=float(g.get("top_p", 1.0)),
                            top_k=int(g.get("top_k", 0) or 0))


@dataclass
class RouterState:
    config: RouterConfig
    tokenizer: Tokenizer
    backend: GenerationBackend
    metrics: ServiceMetrics
    defaults: SamplingDefaults
    tool_parser_cls: type | None = None
    reasoning_parser_cls: type | None = None
    vision: VisionInputs | None = None  # image handling, for GLM-4.xV models

    @classmethod
    def build(cls, config: RouterConfig, backend: GenerationBackend, metrics: ServiceMetrics) -> "RouterState":
        from glmserve.router.reasoning_parser import get_reasoning_parser
        from glmserve.router.tool_parsers import get_tool_parser

        for error in ("backend", "timeout"):  # failure series exist (at 0) before the first failure
            metrics.get("request_failure", error=error)

        tokenizer = Tokenizer(config.tokenizer or config.model)
        if config.chat_template is not None:
            tokenizer.chat_template = config.chat_template
        return cls(
            config=config,
            tokenizer=tokenizer,
            backend=backend,
            metrics=metrics,
            defaults=sampling_defaults(config.model),
            tool_parser_cls=get_tool_parser(config.tool_call_parser) if config.tool_call_parser else None,
            reasoning_parser_cls=get_reasoning_parser(config.reasoning_parser) if config.reasoning_parser else None,
            vision=VisionInputs.for_model(config),
        )

    def check_model(self, name: str | None) -> None:
        if name and name != self.config.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    @staticmethod
    def close_open_think(prompt: str) -> str:
        """A prompt that ends inside an opened <think> block gets it closed (forced tool calls skip thinking)."""
        if prompt.rstrip().endswith("<think>"):
            return prompt + "</think>"
        return prompt
