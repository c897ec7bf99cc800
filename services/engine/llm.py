"""Offline API in the style vLLM users know: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import atexit
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from glmserve.engine.engine import LLMEngine
from glmserve.engine.model_source import DEFAULT_CACHE_DIR, resolve_model
from glmserve.engine.parallel.rank_group import start_rank_group
from glmserve.engine.outputs import CompletionOutput, EngineOutput, Logprob, RequestOutput
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.spec_decode.config import parse_speculative_config
from glmserve.engine.tokenizer import Tokenizer
from glmserve.engine.vision_config import ImageProcessorConfig

@dataclass
class _Sequence:
    """Text-side state of one completion: incremental detokenizer, stop strings, collected tokens."""

    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    stops: StopStringMatcher | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class LLM:
    # Defaults are the config dataclasses' own (one source).
    def __init__(self, model: str | None = None, *, dtype: str = EngineConfig.dtype, device: str = EngineConfig.device,
                 load_format: str = EngineConfig.load_format, seed: int = EngineConfig.seed,
                 max_model_len: int | None = SchedulerConfig.max_model_len, block_size: int = CacheConfig.block_size,
                 num_kv_blocks: int | None = CacheConfig.num_blocks,
                 enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
                 max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
                 max_num_seqs: int = SchedulerConfig.max_num_seqs,
                 chunked_prefill_size: int = SchedulerConfig.chunked_prefill_size,
                 attention_backend: str = EngineConfig.prefill_attention_backend,
                 show_progress: bool = EngineConfig.show_progress, cache_dir: str | Path | None = None,
                 speculative_config: dict | None = None,
                 tensor_parallel_size: int = EngineConfig.tensor_parallel_size,
                 enable_expert_parallel: bool = EngineConfig.enable_expert_parallel):
        """speculative_config: vLLM's form, {"method": "mtp", "num_speculative_tokens": k} (k = 1..4).
        tensor_parallel_size > 1: this process becomes rank 0 and starts the other ranks itself (one GPU
        each on CUDA); `shutdown()` (or interpreter exit) stops them."""
        spec_algorithm, spec_steps = parse_speculative_config(speculative_config)
        model_path = resolve_model(model, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
        cfg = EngineConfig(
            model=model_path, dtype=dtype, device=device, load_format=load_format, seed=seed,
            prefill_attention_backend=attention_backend, decode_attention_backend=attention_backend,
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      chunked_prefill_size=chunked_prefill_size, max_model_len=max_model_len),
            show_progress=show_progress, speculative_algorithm=spec_algorithm, speculative_num_steps=spec_steps,
            tensor_parallel_size=tensor_parallel_size, enable_expert_parallel=enable_expert_parallel,
        )
        cfg, self._group = start_rank_group(cfg)
        try:
            self.engine = LLMEngine(cfg)
        except BaseException:
            self.shutdown()
            raise
        if self._group is not None:
            self._group.attach(self.engine.runner)
            atexit.register(self.shutdown)
        model_dir = self.engine.loaded.model_dir
        self.tokenizer = Tokenizer(model_dir) if model_dir and (Path(model_dir) / "tokenizer.json").exists() else None
        self._ids = itertools.count()
        # Vision models: how images become patches (the checkpoint's preprocessor_config.json).
        self._image_cfg = None
        if self.engine.model_config.vision is not None:
            self._image_cfg = ImageProcessorConfig.from_dir(model_dir) if model_dir else ImageProcessorConfig()

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do for one rank)."""
        group, self._group = self._group, None
        if group is not None:
            group.close(getattr(getattr(self, "engine", None), "runner", None))

    def get_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (dummy weights from a preset): pass prompt_token_ids")
        return self.tokenizer

    # -- generate -----------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompt_list = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                       else [sampling_params] * len(prompt_list))
        if len(params_list) != len(prompt_list):
            raise ValueError("give one SamplingParams, or one per prompt")
        results: dict[str, RequestOutput] = {}
        seqs: dict[str, tuple[str, _Sequence]] = {}
        order = []
        for prompt, params in zip(prompt_list, params_list):
            text, ids = self._prompt(prompt)
            ids, mm = self._images(prompt, ids)
            rid = str(next(self._ids))
            order.append(rid)
            results[rid] = RequestOutput(rid, text, ids, [], finished=False)
            for i in range(params.n):
                sub = self._sub_params(params, i)
                sub_id = f"{rid}-{i}"
                self.engine.add_request(sub_id, ids, sub, mm=mm)
                seqs[sub_id] = (rid, self._new_sequence(i, sub, ids))
        bar = tqdm(total=len(seqs), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                rid, seq = seqs[out.request_id]
                self._absorb(out, seq)
                results[rid].num_cached_tokens = max(results[rid].num_cached_tokens, out.num_cached_tokens)
                if seq.finish_reason is not None:
                    bar.update(1)
        bar.close()
        for sub_id, (rid, seq) in seqs.items():
            results[rid].outputs.append(CompletionOutput(seq.index, seq.text, seq.token_ids, seq.cumulative_logprob,
                                                         seq.logprobs, seq.finish_reason, seq.stop_reason))
        for r in results.values():
            r.outputs.sort(key=lambda o: o.index)
            r.finished = True
        return [results[rid] for rid in order]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        from glmserve.engine.media import split_chat_images

        tok = self.get_tokenizer()
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            conv, images = split_chat_images(conv, self._load_image_url)  # image parts -> placeholders
            prompt: dict = {"prompt": tok.apply_chat_template(conv, tools=tools, add_generation_prompt=add_generation_prompt,
                                                              **(chat_template_kwargs or {}))}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # -- helpers ------------------------------------------------------------------------------
    def _prompt(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.get_tokenizer().encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.get_tokenizer().encode(prompt["prompt"])
        raise TypeError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}")

    def _images(self, prompt: Any, ids: list[int]):
        """(ids with each image placeholder widened to its image's tokens, MultiModalPrompt or None)."""
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if not data:
            return ids, None
        from glmserve.engine.mm_inputs import prepare_images

        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise ValueError(f"multi_modal_data {unknown} is not supported (images only)")
        if self._image_cfg is None:
            raise ValueError(f"this model ({self.engine.model_config.arch}) takes no images")
        images = data["image"] if isinstance(data["image"], (list, tuple)) else [data["image"]]
        return prepare_images(ids, list(images), self.engine.model_config.vision, self._image_cfg)

    @staticmethod
    def _load_image_url(url: str):
        from glmserve.engine.media import MediaError, image_from_data_url

        if url.startswith("data:"):
            return image_from_data_url(url)
        raise MediaError("offline image_url parts take data: URLs; pass other images as image_pil parts")

    @staticmethod
    def _sub_params(params: SamplingParams, i: int) -> SamplingParams:
        if params.n == 1:
            return params
        sub = params.clone()
        sub.n = 1
        if params.seed is not None:
            sub.seed = params.seed + i  # n seeded samples must differ from each other
        return sub

    def _new_sequence(self, index: int, params: SamplingParams, prompt_ids: list[int]) -> _Sequence:
        detok = stops = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens,
                                           params.spaces_between_special_tokens)
            if params.stop:
                stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        return _Sequence(index, params, detok, stops,
                         logprobs=[] if params.logprobs is not None else None,
                         cumulative_logprob=0.0 if params.logprobs is not None else None)

    def _absorb(self, out: EngineOutput, seq: _Sequence) -> None:
        seq.token_ids += out.new_token_ids
        for tok in out.new_logprobs:
            entry = {tok.token_id: Logprob(tok.logprob, None, self._piece(tok.token_id))}
            for rank, (tid, lp) in enumerate(tok.top_logprobs or [], start=1):
                if tid == tok.token_id:
                    entry[tid] = Logprob(tok.logprob, rank, self._piece(tid))
                else:
                    entry.setdefault(tid, Logprob(lp, rank, self._piece(tid)))
            seq.logprobs.append(entry)
            seq.cumulative_logprob += tok.logprob
        if seq.detok is not None:
            delta = seq.detok.push(out.new_token_ids)
            if out.finished:
                delta += seq.detok.flush()  # bytes of an unfinished character, if any
            if seq.stops is not None:
                delta, stopped, matched = seq.stops.feed(delta)
                seq.text += delta
                if stopped:
                    seq.finish_reason, seq.stop_reason = "stop", matched
                    self.engine.abort(out.request_id)
                    return
            else:
                seq.text += delta
        if out.finished:
            if seq.stops is not None:
                seq.text += seq.stops.flush()
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason

    def _piece(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else None
