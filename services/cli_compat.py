"""Launch lines copied from vLLM and LightLLM guides, made to work with `glmserve serve`.

`translate(argv)` rewrites the words after `serve` (or `up`, which takes the same flags) before argparse sees them:
- `serve MODEL` (vLLM's positional model) becomes `--model MODEL`;
- a LightLLM underscore spelling (`--max_req_total_len`) or vLLM name (`--enforce-eager`) becomes our flag;
- a flag that cannot apply here is dropped with a one-line note on stderr (it is never silently ignored);
- a flag we do not support ends the command with a one-line error naming our nearest equivalent.
JSON-valued vLLM flags (`--compilation-config`, `--speculative-config`) are parsed and mapped or refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from glmserve.engine.spec_decode.config import parse_speculative_config

# Their flag -> ours (same meaning, same value).
ALIASES: dict[str, str] = {
    # LightLLM
    "--model_dir": "--model",
    "--tp": "--tensor-parallel-size",
    "--max_req_total_len": "--max-model-len",
    "--llm_prefill_att_backend": "--prefill-attention-backend",
    "--llm_decode_att_backend": "--decode-attention-backend",
    "--graph_max_batch_size": "--cuda-graph-max-batch-size",
    "--disable_cudagraph": "--disable-cuda-graph",
    "--model_name": "--served-model-name",
    "--running_max_req_size": "--max-num-seqs",
    "--batch_max_tokens": "--max-num-batched-tokens",
    "--mem_fraction": "--gpu-memory-utilization",
    # vLLM
    "-tp": "--tensor-parallel-size",
    "--enforce-eager": "--disable-cuda-graph",
}

# Flags that take no value in their CLI (everything else here is followed by one value).
_SWITCHES = {"--trust-remote-code", "--trust_remote_code", "--async-scheduling", "--enable-auto-tool-choice",
             "--enable-expert-parallel", "--disable-log-requests", "--disable-log-stats", "--enforce-eager",
             "--disable_cudagraph"}

# Accepted, with a note saying why they change nothing here.
NOTES: dict[str, str] = {
    "--trust-remote-code": "glmserve runs its own GLM implementation; no model code is downloaded or run",
    "--trust_remote_code": "glmserve runs its own GLM implementation; no model code is downloaded or run",
    "--enable-auto-tool-choice": "tool calls are parsed whenever --tool-call-parser is set (tool_choice auto)",
    "--async-scheduling": "glmserve's engine thread already schedules apart from the HTTP side",
    "--disable-log-requests": "glmserve does not log requests",
    "--disable-log-stats": "glmserve logs no periodic stats (see /metrics)",
    "--additional-config": "vllm-ascend options have no meaning on glmserve",
    "--mm-encoder-tp-mode": "the vision encoder runs unsharded on each worker (no tensor parallelism yet)",
    "--mm-processor-cache-type": "glmserve caches encoder outputs by image content on the worker (not configurable)",
}

# Refused: (why, our nearest equivalent).
UNSUPPORTED: dict[str, str] = {
    "--quantization": "quantization is read from the checkpoint's config.json (FP8 compressed-tensors); "
                      "drop --quantization",
    "--pipeline-parallel-size": "pipeline parallelism is not built; use `glmserve up --decode N` to add replicas",
}


@dataclass
class Translated:
    argv: list[str]
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def _model_of(out: list[str]) -> str | None:
    return out[out.index("--model") + 1] if "--model" in out[:-1] else None


def _same_model(draft: str, out: list[str], flag: str) -> str | None:
    """MTP drafts come from the served checkpoint's own layer: a draft model elsewhere is refused."""
    model = _model_of(out)
    if model is not None and draft.rstrip("/") != model.rstrip("/"):
        return (f"{flag}: the MTP draft layer is read from --model's checkpoint; a separate draft model "
                f"({draft}) is not supported")
    return None


def _speculative(value: str, out: list[str]) -> str | None:
    """vLLM's --speculative-config JSON -> --speculative-algorithm mtp --speculative-num-steps K."""
    try:
        cfg = json.loads(value)
    except json.JSONDecodeError as exc:
        return f"--speculative-config is not valid JSON ({exc.msg})"
    if isinstance(cfg, dict) and "model" in cfg:
        cfg = dict(cfg)
        error = _same_model(str(cfg.pop("model")), out, "--speculative-config model")
        if error:
            return error
    try:
        algorithm, steps = parse_speculative_config(cfg)
    except ValueError as exc:
        return f"--speculative-config: {exc}"
    out += ["--speculative-algorithm", algorithm, "--speculative-num-steps", str(steps)]
    return None


def compilation_config(value: str, notes: list[str]) -> tuple[list[str], str | None]:
    """vLLM's --compilation-config JSON -> our flags. cudagraph_capture_sizes become our decode CUDA-graph
    buckets; cudagraph_mode NONE disables graphs; keys about torch.compile have no counterpart (noted)."""
    try:
        cfg = json.loads(value)
    except json.JSONDecodeError as exc:
        return [], f"--compilation-config is not valid JSON ({exc.msg})"
    if isinstance(cfg, int):  # vLLM also takes a bare optimisation level
        cfg = {"level": cfg}
    if not isinstance(cfg, dict):
        return [], "--compilation-config must be a JSON object"
    out: list[str] = []
    sizes = cfg.pop("cudagraph_capture_sizes", None)
    if sizes is not None:
        if not (isinstance(sizes, list) and sizes and all(isinstance(s, int) and s > 0 for s in sizes)):
            return [], "--compilation-config: cudagraph_capture_sizes must be a list of positive integers"
        out += ["--cuda-graph-capture-sizes", ",".join(str(s) for s in sizes)]
    biggest = cfg.pop("max_cudagraph_capture_size", None)
    if biggest is not None:
        out += ["--cuda-graph-max-batch-size", str(int(biggest))]
    mode = cfg.pop("cudagraph_mode", None)
    if mode is not None:
        mode = str(mode).upper()
        if mode == "NONE":
            out.append("--disable-cuda-graph")
        elif mode != "FULL_DECODE_ONLY":
            notes.append(f"--compilation-config cudagraph_mode {mode}: glmserve captures full graphs of decode "
                         "steps only (FULL_DECODE_ONLY)")
    if cfg:
        notes.append(f"--compilation-config {sorted(cfg)}: no torch.compile in glmserve; not applicable")
    return out, None


def translate(argv: list[str], known: dict[str, bool]) -> Translated:
    """argv: the words after `serve`; known: our `serve` parser's option strings -> whether each takes a value."""
    out: list[str] = []
    res = Translated(out)
    words = list(argv)
    if words and not words[0].startswith("-"):  # vllm serve MODEL
        out += ["--model", words.pop(0)]
    i = 0
    while i < len(words):
        word = words[i]
        flag, eq, inline = word.partition("=")
        if not flag.startswith("-") or flag in known:
            out.append(word)
            i += 1
            continue
        ours = ALIASES.get(flag, flag.replace("_", "-"))
        takes_value = known[ours] if ours in known else flag not in _SWITCHES
        if eq:
            value, step = inline, 1
        elif takes_value and i + 1 < len(words):
            value, step = words[i + 1], 2
        else:
            value, step = None, 1
        i += step
        if ours in known:
            out += [ours] if value is None else [ours, value]
        elif flag in NOTES:
            res.notes.append(f"{flag}: accepted, no effect: {NOTES[flag]}")
        elif flag == "--speculative-config":
            res.error = _speculative(value or "", out)
        elif flag in ("--mtp_step", "--mtp-step"):  # LightLLM: chained MTP drafts per step
            steps = int(value) if value and value.lstrip("-").isdigit() else value
            res.error = _speculative(json.dumps({"method": "mtp", "num_speculative_tokens": steps}), out)
            if res.error:
                res.error = f"{flag} {value}: " + res.error.removeprefix("--speculative-config: speculative_config: ")
        elif flag in ("--mtp_mode", "--mtp-mode"):
            if value != "eagle_with_att":
                res.error = f"{flag} {value}: glmserve chains the checkpoint's MTP layer (eagle_with_att) only"
        elif flag in ("--mtp_draft_model_dir", "--mtp-draft-model-dir"):
            res.error = _same_model(value or "", out, flag)
        elif flag == "--compilation-config":
            mapped, res.error = compilation_config(value or "", res.notes)
            out += mapped
        elif flag == "--kv-cache-dtype":
            if value != "auto":
                res.error = (f"--kv-cache-dtype {value} is not supported: the KV cache uses the model dtype; "
                             "nearest: --dtype")
        elif flag == "--data-parallel-size":
            if value != "1":
                res.error = (f"--data-parallel-size {value} is not supported by `serve`; nearest: "
                             "`glmserve up --decode N` (N decode replicas)")
        elif flag in UNSUPPORTED:
            res.error = f"{flag}: {UNSUPPORTED[flag]}"
        else:  # not ours and not known to us: argparse reports it with the subcommand's usage
            out.append(word)
            if step == 2:
                out.append(value)
        if res.error:
            return res
    return res
