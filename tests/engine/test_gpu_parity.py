"""The CPU parity checks again on CUDA in bf16 (skipped without a GPU): logits close to transformers'
within bf16 tolerance, and greedy tokens agreeing for most of a 32-token generation."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_bf16_cuda_logits_and_greedy_tokens(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from glmserve import LLM, SamplingParams
    from glmserve.engine.tiny_model import build_tiny_model

    model_dir = build_tiny_model(arch, tmp_path / "m", seed=1)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    # An explicit pool: a second engine in this pytest process cannot claim 85% of the GPU again.
    llm = LLM(str(model_dir), dtype="bfloat16", device="cuda", show_progress=False, num_kv_blocks=64)
    prompt = list(range(20, 60))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False)[0, len(prompt):].tolist()
        ref_logits = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32, logprobs=0))[0]
    ours = out.outputs[0].token_ids
    # bf16 rounding may flip a near-tie; the first tokens and most of the rest must agree.
    assert ours[:4] == ref[:4]
    assert sum(a == b for a, b in zip(ours, ref)) >= 24
    first_lp = next(iter(out.outputs[0].logprobs[0].values())).logprob
    ref_lp = torch.log_softmax(ref_logits, -1)[ours[0]].item()
    assert abs(first_lp - ref_lp) < 0.05
