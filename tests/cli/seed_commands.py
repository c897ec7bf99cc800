"""The launch commands of the deployment guides in shared/seeds/, word for word after the program name,
with only the model path, host and port substituted (MODEL, HOST, PORT). `python -m
lightllm.server.api_server` and `vllm serve` both become `glmserve serve`."""

from __future__ import annotations

COMPILATION = '{"cudagraph_capture_sizes": [1,2,4,8,16,32], "cudagraph_mode": "FULL_DECODE_ONLY"}'
COMPILATION_FP8 = '{"cudagraph_capture_sizes": [1,2,4,8,16,32,64,128,256,512], "cudagraph_mode": "FULL_DECODE_ONLY"}'
ADDITIONAL_FP8 = '{"enable_shared_expert_dp": true, "ascend_fusion_config": {"fusion_ops_gmmswigluquant": false}}'
SPECULATIVE = '{"num_speculative_tokens": 1, "model":"MODEL", "method":"mtp"}'

# 000/001: LightLLM's GLM-4.7-Flash guide, basic launch.
LIGHTLLM = ["--model_dir", "MODEL", "--tp", "1", "--max_req_total_len", "202752", "--chunked_prefill_size", "8192",
            "--llm_prefill_att_backend", "fa3", "--llm_decode_att_backend", "flashinfer",
            "--graph_max_batch_size", "512", "--tool_call_parser", "glm47", "--reasoning_parser", "glm45",
            "--host", "HOST", "--port", "PORT"]
# 000/001: the same with MTP.
LIGHTLLM_MTP = LIGHTLLM[:-4] + ["--mtp_step", "4", "--mtp_mode", "eagle_with_att", "--mtp_draft_model_dir", "MODEL",
                                "--host", "HOST", "--port", "PORT"]
# 002: vllm-ascend GLM-4.x single node.
VLLM_ASCEND = ["MODEL", "--data-parallel-size", "1", "--tensor-parallel-size", "16", "--seed", "1024",
               "--served-model-name", "glm", "--max-model-len", "35000", "--max-num-batched-tokens", "16384",
               "--max-num-seqs", "16", "--trust-remote-code", "--gpu-memory-utilization", "0.9",
               "--speculative-config", SPECULATIVE, "--compilation-config", COMPILATION, "--async-scheduling"]
# 003: GLM-4.7-FP8 on 8 NPUs, and its troubleshooting variant with --enforce-eager.
VLLM_FP8 = ["MODEL", "--tensor-parallel-size", "8", "--enable-expert-parallel", "--seed", "1024",
            "--served-model-name", "glm47-fp8", "--max-model-len", "133000", "--max-num-batched-tokens", "8192",
            "--max-num-seqs", "16", "--async-scheduling", "--gpu-memory-utilization", "0.9",
            "--compilation-config", COMPILATION_FP8, "--additional-config", ADDITIONAL_FP8]
# 004: vLLM's GLM-4.5V guide, tensor parallel.
VLLM_V = ["MODEL", "--tensor-parallel-size", "4", "--tool-call-parser", "glm45", "--reasoning-parser", "glm45",
          "--enable-auto-tool-choice", "--enable-expert-parallel", "--allowed-local-media-path", "/",
          "--mm-encoder-tp-mode", "data", "--mm-processor-cache-type", "shm"]


def substitute(words: list[str], model: str, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    table = {"MODEL": model, "HOST": host, "PORT": str(port)}
    return [table.get(w, w.replace('"MODEL"', f'"{model}"')) for w in words]


def with_value(words: list[str], flag: str, value: str) -> list[str]:
    """A copy with `flag`'s value replaced (the one substitution the hardware forces, e.g. --tp 16 -> 1)."""
    out = list(words)
    out[out.index(flag) + 1] = value
    return out


def without(words: list[str], flag: str) -> list[str]:
    out = list(words)
    i = out.index(flag)
    del out[i:i + 2]
    return out
