"""CUDA graphs for decode (engine/cuda_graphs.py).

On CPU: the buckets, the padding of a step into the static buffers (against build_context), a padded
forward pass over those buffers giving the eager rows (Triton backend under the interpreter, host
lengths an upper bound as at capture), the model runner's dispatch and the eligibility checks. The
`gpu` tests capture and replay for real: same greedy tokens as eager, capture time and memory reported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports glmserve.kernels

import pytest  # noqa: E402

from glmserve.engine.attention.context import SeqChunk, build_context  # noqa: E402
from glmserve.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from glmserve.engine.config import CacheConfig  # noqa: E402
from glmserve.engine.cuda_graphs import (  # noqa: E402
    StaticDecodeInputs, bucket_for, capture_batch_sizes, graph_unsafe_reason,
)
from glmserve.engine.kv_cache import allocate_kv_caches, kv_cache_spec  # noqa: E402
from glmserve.engine.model_runner import ModelRunner  # noqa: E402
from glmserve.engine.models.moe import MoE  # noqa: E402
from glmserve.engine.request import Request  # noqa: E402
from glmserve.engine.sampling_params import SamplingParams  # noqa: E402
from glmserve.engine.scheduler import ScheduledChunk  # noqa: E402
from tests.engine.hf_reference import load_ours, make_checkpoint  # noqa: E402

VOCAB = 200
BS = 4  # block size
# Three decoding sequences over scattered blocks: (blocks, tokens already cached).
SEQS = [SeqChunk([5, 2, 9], 9, 1), SeqChunk([7], 2, 1), SeqChunk([1, 3, 11, 4, 6], 17, 1)]
IDS = [11, 42, 199]


def test_buckets_cover_every_batch_size_up_to_the_maximum():
    sizes = capture_batch_sizes(512)
    assert sizes[:7] == [1, 2, 4, 8, 16, 24, 32] and sizes[-1] == 512 and len(sizes) == 67
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_batch_sizes(3) == [1, 2, 3] and capture_batch_sizes(0) == []
    for n in range(1, 513):
        b = bucket_for(n, sizes)
        assert b >= n and (b - n < 8)  # padding stays under one step of the ladder
    assert [bucket_for(n, sizes) for n in (1, 3, 5, 9, 17, 511)] == [1, 4, 8, 16, 24, 512]
    assert bucket_for(513, sizes) is None and bucket_for(0, sizes) is None


def test_fill_pads_a_step_into_the_static_buffers():
    inputs = StaticDecodeInputs(max_batch_size=8, max_blocks_per_seq=6, block_size=BS, device=torch.device("cpu"))
    # A bigger step first, so stale values sit in the rows the next step pads.
    inputs.fill(list(range(6)), [SeqChunk([8, 10], 6, 1)] * 6, bucket=8)
    inputs.fill(IDS, SEQS, bucket=4)
    ref = build_context(SEQS, BS, [], torch.device("cpu"))
    assert inputs.input_ids[:4].tolist() == IDS + [0]
    assert torch.equal(inputs.positions[:3], ref.positions) and inputs.positions[3] == 0
    assert torch.equal(inputs.slot_mapping[:3], ref.slot_mapping) and inputs.slot_mapping[3] == -1
    assert torch.equal(inputs.seq_lens[:3], ref.seq_lens) and inputs.seq_lens[3] == 1
    width = ref.block_tables.shape[1]
    assert torch.equal(inputs.block_tables[:3, :width], ref.block_tables)
    assert inputs.block_tables[3, 0] == 0
    assert inputs.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]
    ctx = inputs.context(4, [], host_seq_len=64)
    assert ctx.is_decode_only and ctx.num_seqs == 4 and ctx.seq_lens_cpu == [64] * 4
    assert ctx.seq_lens.data_ptr() == inputs.seq_lens.data_ptr()  # views: a replay sees new values


def test_only_decode_steps_that_fit_are_eligible():
    inputs = StaticDecodeInputs(max_batch_size=4, max_blocks_per_seq=5, block_size=BS, device=torch.device("cpu"))
    assert inputs.fits(SEQS)
    assert not inputs.fits(SEQS + [SeqChunk([0], 0, 2)])  # a prefill chunk
    assert not inputs.fits(SEQS * 2)  # more rows than the largest bucket
    assert not inputs.fits([SeqChunk(list(range(6)), 20, 1)])  # context beyond the block table
    assert not inputs.fits([])


@pytest.fixture(scope="module", params=["glm4_moe", "glm4_moe_lite"])
def tiny(request, tmp_path_factory):
    d = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), vocab_size=VOCAB, seed=2)
    return load_ours(d)


def test_padded_static_forward_gives_the_eager_rows(tiny):
    """The graph's forward pass, run eagerly: padding rows and host lengths that are only an upper bound
    change nothing in the real rows nor in the cache (Triton backend, split-KV on)."""
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend
    from glmserve.engine.kernel_selection import KernelChoice, apply_kernels

    backend = TritonAttentionBackend(num_splits=3)
    for m in tiny.model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    apply_kernels(tiny.model, KernelChoice(moe="triton", rmsnorm="triton"))  # the kernels graphs replay
    try:
        spec = kv_cache_spec(tiny.config, BS)
        caches = allocate_kv_caches(spec, tiny.config.num_hidden_layers, 12, torch.float32, torch.device("cpu"))
        for c in caches:
            c.normal_(generator=torch.Generator().manual_seed(0))
        original = [c.clone() for c in caches]
        static_caches = [c.clone() for c in caches]
        with torch.inference_mode():
            ctx = build_context(SEQS, BS, caches, torch.device("cpu"))
            eager = tiny.model(torch.tensor(IDS), ctx.positions, ctx)
            inputs = StaticDecodeInputs(8, 6, BS, torch.device("cpu"))
            inputs.fill(IDS, SEQS, bucket=4)
            sctx = inputs.context(4, static_caches, host_seq_len=64)
            padded = tiny.model(inputs.input_ids[:4], sctx.positions, sctx)
        assert padded.shape[0] == 4 and torch.isfinite(padded).all()
        torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
        new_slots = ctx.slot_mapping
        for before, a, b in zip(original, caches, static_caches):
            flat = (lambda c: c.transpose(1, 2).flatten(0, 1)) if spec.kind == "gqa" else (lambda c: c.flatten(0, 1))
            fa, fb, f0 = flat(a), flat(b), flat(before)  # [slots, ...]
            torch.testing.assert_close(fb[new_slots], fa[new_slots], rtol=1e-5, atol=1e-5)  # same new KV
            keep = torch.ones(fb.shape[0], dtype=torch.bool)
            keep[new_slots] = False
            assert torch.equal(fb[keep], f0[keep])  # padding rows stored nothing anywhere
    finally:
        apply_kernels(tiny.model, KernelChoice())
        for m in tiny.model.modules():
            if hasattr(m, "backend"):
                m.backend = tiny.model.backend


def test_graph_eligibility_is_checked_before_capture(tiny):
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend
    from glmserve.engine.kernel_selection import KernelChoice, apply_kernels

    cuda, triton = torch.device("cuda"), TritonAttentionBackend()
    assert "CUDA" in graph_unsafe_reason(tiny.model, triton, torch.device("cpu"))
    assert "torch" in graph_unsafe_reason(tiny.model, TorchAttentionBackend(), cuda)
    assert "reference experts" in graph_unsafe_reason(tiny.model, triton, cuda)
    apply_kernels(tiny.model, KernelChoice(moe="triton"))
    try:
        assert graph_unsafe_reason(tiny.model, triton, cuda) is None
    finally:
        apply_kernels(tiny.model, KernelChoice())
    assert all(m.experts_fn.__name__ == "experts_reference" for m in tiny.model.modules() if isinstance(m, MoE))


class StubGraphs:
    """Stands in for a captured CudaGraphRunner on CPU: records what the runner sends to it."""

    def __init__(self, hidden_size):
        self.hidden_size, self.calls = hidden_size, []

    def can_run(self, seqs):
        return StaticDecodeInputs(4, 16, BS, torch.device("cpu")).fits(seqs)

    def run(self, ids, seqs):
        self.calls.append(list(ids))
        return torch.ones(len(seqs), self.hidden_size)


def _chunk(prompt, done, n):
    req = Request("r%d" % done, prompt, SamplingParams(max_tokens=4))
    req.block_ids = list(range(done // BS, done // BS + 4))
    req.num_computed_tokens = done
    return ScheduledChunk(req, n)


def test_runner_replays_decode_steps_and_runs_the_rest_eagerly(tiny):
    runner = ModelRunner(tiny.model, tiny.config, TorchAttentionBackend(), CacheConfig(block_size=BS, num_blocks=32),
                         torch.float32, torch.device("cpu"), enable_cuda_graph=True)
    assert runner.graphs is None and "CUDA" in runner.cuda_graph_stats()["reason"]
    runner.graphs = stub = StubGraphs(tiny.config.hidden_size)
    decode = [_chunk([3, 4, 5, 6], 3, 1), _chunk([7, 8], 1, 1)]
    out = runner.execute(decode)
    assert stub.calls == [[6, 8]] and out.logits.shape == (2, VOCAB)
    expected = tiny.model.compute_logits(torch.ones(2, tiny.config.hidden_size)).float()
    torch.testing.assert_close(out.logits, expected)
    runner.execute([_chunk([3, 4, 5, 6], 0, 4)])  # prefill: eager
    runner.execute(decode, on_layer_done=lambda layer: None)  # layer-wise KV streaming: eager
    assert len(stub.calls) == 1
    kept = runner.execute(decode, keep_hidden=True)
    assert kept.hidden is not None and len(stub.calls) == 2


# -- GPU: real capture and replay ------------------------------------------------------------------

def _generate(model_dir, enable: bool, prompts, dtype: str, max_batch: int = 16):
    from glmserve.engine.config import EngineConfig, SchedulerConfig
    from glmserve.engine.engine import LLMEngine

    # An explicit pool: the two engines of a test live in one process and cannot each claim 85% of the GPU.
    cfg = EngineConfig(model=str(model_dir), dtype=dtype, device="cuda", prefill_attention_backend="triton",
                       show_progress=False, enable_cuda_graph=enable, cuda_graph_max_batch_size=max_batch,
                       scheduler=SchedulerConfig(max_num_seqs=max_batch), cache=CacheConfig(num_blocks=256))
    engine = LLMEngine(cfg)
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for out in engine.run_until_done(deadline_s=300):
        tokens[out.request_id] += out.new_token_ids
    return [tokens[str(i)] for i in range(len(prompts))], engine.runner.cuda_graph_stats()



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("num_prompts", [3, 9])  # buckets 4 and 16: padding rows in every step
def test_gpu_graph_replay_gives_the_eager_tokens(arch, num_prompts, tmp_path):
    d = make_checkpoint(arch, tmp_path / arch, vocab_size=VOCAB, seed=5)
    g = torch.Generator().manual_seed(num_prompts)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (num_prompts,), generator=g)]
    eager, off = _generate(d, False, prompts, "float32")
    graphed, stats = _generate(d, True, prompts, "float32")
    assert not off["enabled"]
    assert stats["enabled"] and stats["num_graphs"] == len(capture_batch_sizes(16))
    assert stats["num_replays"] >= 11  # every decode step after the first token
    assert stats["capture_seconds"] > 0 and stats["pool_bytes"] > 0
    assert graphed == eager
    bf16_eager, _ = _generate(d, False, prompts, "bfloat16")
    bf16_graphed, _ = _generate(d, True, prompts, "bfloat16")
    same = sum(a == b for x, y in zip(bf16_eager, bf16_graphed) for a, b in zip(x, y))
    assert same >= 0.9 * sum(len(x) for x in bf16_eager)  # bf16: split-KV order may flip a near-tie


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backend_without_graph_support_runs_eagerly(tmp_path):
    from glmserve.engine.config import EngineConfig
    from glmserve.engine.engine import LLMEngine

    d = make_checkpoint("glm4_moe", tmp_path / "m", vocab_size=VOCAB, seed=5)
    engine = LLMEngine(EngineConfig(model=str(d), device="cuda", prefill_attention_backend="torch",
                                    decode_attention_backend="torch", show_progress=False,
                                    cache=CacheConfig(num_blocks=64)))
    stats = engine.runner.cuda_graph_stats()
    assert not stats["enabled"] and "torch" in stats["reason"]
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, min_tokens=3))
    assert sum(len(o.new_token_ids) for o in engine.run_until_done(deadline_s=120)) == 3


def test_cli_flags_reach_the_engine_config(tmp_path):
    import argparse

    from glmserve.cli_args import add_engine_args, engine_config

    p = argparse.ArgumentParser()
    add_engine_args(p)
    default = engine_config(p.parse_args(["--model", "GLM-4.7-Flash"]), tmp_path)
    assert default.enable_cuda_graph and default.cuda_graph_max_batch_size == 512
    cfg = engine_config(p.parse_args(["--model", "GLM-4.7-Flash", "--disable-cuda-graph",
                                      "--cuda-graph-max-batch-size", "64"]), tmp_path)
    assert not cfg.enable_cuda_graph and cfg.cuda_graph_max_batch_size == 64
