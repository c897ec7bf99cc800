"""CUDA graphs for MTP speculative decoding (engine/spec_decode/graphs.py): the verify step ([last token +
k drafts] per sequence) and the greedy draft chain, captured per padded batch bucket.

On CPU: the k + 1-token static inputs against build_context, and the whole engine path with each "graph"
replaced by its captured function run over the static buffers (Triton attention under the interpreter,
host lengths an upper bound as at capture), against the eager engine: same tokens, same drafts. The `gpu`
tests capture and replay for real: same tokens, drafts and logprobs as eager, for k = 1 and 3.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports glmserve.kernels

import pytest  # noqa: E402

from glmserve.engine.attention.context import SeqChunk, build_context  # noqa: E402
from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from glmserve.engine.cuda_graphs import StaticDecodeInputs, graph_unsafe_reason  # noqa: E402
from glmserve.engine.engine import LLMEngine  # noqa: E402
from glmserve.engine.sampling_params import SamplingParams  # noqa: E402
from glmserve.engine.spec_decode.graphs import SpecDecodeGraphs  # noqa: E402
from glmserve.engine.tiny_model import build_tiny_model  # noqa: E402

BS = 4
NEW_TOKENS = 10
PROMPT_LENS = (5, 9)


def test_multi_token_static_inputs_match_build_context():
    seqs = [SeqChunk([5, 2, 9], 7, 3), SeqChunk([7, 1], 1, 3)]
    ids = [1, 2, 3, 4, 5, 6]
    inputs = StaticDecodeInputs(max_batch_size=4, max_blocks_per_seq=6, block_size=BS, device=torch.device("cpu"),
                                tokens_per_seq=3)
    inputs.fill(list(range(12)), [SeqChunk([8, 10, 11], 6, 3)] * 4, bucket=4)  # stale values in the padding rows
    inputs.fill(ids, seqs, bucket=4)
    ref = build_context(seqs, BS, [], torch.device("cpu"))
    assert inputs.input_ids[:12].tolist() == ids + [0] * 6
    assert torch.equal(inputs.positions[:6], ref.positions) and inputs.positions[6:12].tolist() == [0, 1, 2] * 2
    assert torch.equal(inputs.slot_mapping[:6], ref.slot_mapping) and (inputs.slot_mapping[6:12] == -1).all()
    assert torch.equal(inputs.seq_lens[:2], ref.seq_lens) and inputs.seq_lens[2:4].tolist() == [3, 3]
    assert torch.equal(inputs.query_start_loc[:3], ref.query_start_loc)
    assert inputs.query_start_loc[:5].tolist() == [0, 3, 6, 9, 12]
    assert (inputs.block_tables[2:4, :3] == 0).all()
    ctx = inputs.context(4, [], host_seq_len=64)
    assert ctx.query_lens_cpu == [3] * 4 and ctx.seq_lens_cpu == [64] * 4 and not ctx.is_decode_only
    assert inputs.fits(seqs) and not inputs.fits([SeqChunk([1], 0, 1)]) and not inputs.fits([SeqChunk([1], 22, 3)])


def test_verify_graphs_need_a_graph_safe_backend_for_multi_token_steps():
    from glmserve.engine.attention.split_backend import SplitAttentionBackend
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend

    model = torch.nn.Linear(2, 2)
    split = SplitAttentionBackend(TorchAttentionBackend(), TritonAttentionBackend())
    cuda = torch.device("cuda")
    assert graph_unsafe_reason(model, split, cuda) is None  # decode steps go to the Triton side
    assert "torch" in graph_unsafe_reason(model, split, cuda, tokens_per_seq=4)  # verify steps to the torch one
    assert graph_unsafe_reason(model, TritonAttentionBackend(), cuda, tokens_per_seq=4) is None


# -- the engine path with stand-in graphs (CPU) ------------------------------------------------------

class _EagerReplay:
    """A captured graph's stand-in: replay() runs the captured function over the static buffers."""

    def __init__(self, runner, bucket):
        self.runner, self.bucket = runner, bucket

    def replay(self):
        r = self.runner
        ctx = r.inputs.context(self.bucket, r.kv_caches, r.host_seq_len)
        r.outputs[self.bucket] = r._forward(self.bucket, ctx)


def _install_stand_in_graphs(engine: LLMEngine, k: int) -> SpecDecodeGraphs:
    runner = engine.runner
    graphs = SpecDecodeGraphs(engine.loaded.model, runner.kv_caches, runner.block_size, k, max_batch_size=4,
                              max_model_len=engine.max_model_len, device=engine.device, dtype=engine.loaded.dtype)
    for g in (graphs.verify, graphs.draft):
        g.graphs = {b: _EagerReplay(g, b) for b in g.sizes}
    engine.speculator.graphs = graphs
    return graphs


def _use_triton_attention(engine: LLMEngine) -> None:
    """The graphs' attention (host lengths only size launches) for every layer, the MTP layer's too."""
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend(num_splits=2)
    for m in engine.loaded.model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    engine.runner.backend = backend


def _engine(model_dir, k: int, device: str = "cpu", graphs: bool = False, dtype: str = "float32") -> LLMEngine:
    cfg = EngineConfig(model=str(model_dir), dtype=dtype, device=device, show_progress=False, seed=0,
                       prefill_attention_backend="triton" if device == "cuda" else "torch",
                       decode_attention_backend="triton" if device == "cuda" else "torch",
                       # an explicit pool: several engines live in one process, each cannot claim 85% of a GPU
                       cache=CacheConfig(block_size=BS, num_blocks=256), scheduler=SchedulerConfig(max_num_seqs=4),
                       enable_cuda_graph=graphs, cuda_graph_max_batch_size=4,
                       speculative_algorithm="mtp", speculative_num_steps=k)
    return LLMEngine(cfg)


def _oracle(engine: LLMEngine, truth: dict[tuple, list[int]], k: int) -> list:
    """Records every draft the MTP layer makes, then replaces the drafts by the true continuation (one wrong
    token when the output count is 1 mod 3), so that accepted runs of every length and rejections both happen."""
    spec, seen = engine.speculator, []
    original = spec._draft

    def draft(jobs, hidden):
        original(jobs, hidden)
        for rid in sorted(spec.drafts):
            req = engine.requests[rid]
            seen.append((rid, req.num_output_tokens, list(spec.drafts[rid])))
            n_out = req.num_output_tokens
            d = list(truth[tuple(req.prompt_token_ids)][n_out: n_out + k])
            if d and n_out % 3 == 1:
                d[len(d) // 2] = (d[len(d) // 2] + 1) % engine.model_config.vocab_size
            spec.drafts[rid] = d or spec.drafts[rid]

    spec._draft = draft
    return seen


def _run(engine: LLMEngine, prompts, logprobs: int | None = None):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=logprobs)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens = {str(i): [] for i in range(len(prompts))}
    lps = {str(i): [] for i in range(len(prompts))}
    for out in engine.run_until_done(deadline_s=600):
        tokens[out.request_id] += out.new_token_ids
        lps[out.request_id] += out.new_logprobs
    return [tokens[str(i)] for i in range(len(prompts))], [lps[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """A tiny GLM-4.7-Flash-shaped (MLA) checkpoint with an MTP layer, its prompts and greedy continuations."""
    d = build_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("lite") / "model", seed=4)
    plain = LLMEngine(EngineConfig(model=str(d), dtype="float32", device="cpu", show_progress=False))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return d, prompts, _run(plain, prompts)[0]


@pytest.mark.parametrize("k", [3])  # k = 1 on the GPU; the interpreter is slow
def test_stand_in_graph_path_gives_the_eager_tokens_and_drafts(lite, k):
    d, prompts, expected = lite
    truth = {tuple(p): e for p, e in zip(prompts, expected)}
    eager, graphed = _engine(d, k), _engine(d, k)
    for e in (eager, graphed):
        _use_triton_attention(e)
    graphs = _install_stand_in_graphs(graphed, k)
    eager_drafts, graph_drafts = _oracle(eager, truth, k), _oracle(graphed, truth, k)
    assert _run(eager, prompts)[0] == expected
    assert _run(graphed, prompts)[0] == expected
    assert graph_drafts == eager_drafts  # every draft the MTP layer made, in the same steps
    # Both decode together after the prompts: steps verifying k drafts each replayed both graphs (the last
    # steps verify fewer, capped by max_tokens, and run eagerly).
    assert graphs.verify.num_replays >= 2 and graphs.draft.num_replays >= 1
    stats = graphed.speculator.stats
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert graphed.pool.num_used == 0


def test_sampled_requests_verify_by_graph_and_draft_eagerly(lite):
    d, prompts, _ = lite
    eager, graphed = _engine(d, 2), _engine(d, 2)
    for e in (eager, graphed):
        _use_triton_attention(e)
    graphs = _install_stand_in_graphs(graphed, 2)
    params = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=5, min_tokens=5)
    out = []
    for e in (eager, graphed):
        for i, p in enumerate(prompts):
            e.add_request(str(i), p, params)
        toks = {}
        for o in e.run_until_done(deadline_s=600):
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
        out.append(toks)
    assert out[0] == out[1]  # seeded: the same draws either way
    assert graphs.verify.num_replays > 0 and graphs.draft.num_replays == 0


# -- GPU: real capture and replay ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("k", [1, 3])
def test_gpu_graph_replay_gives_the_eager_tokens_drafts_and_logprobs(arch, k, tmp_path):
    d = build_tiny_model(arch, tmp_path / arch, seed=5)
    g = torch.Generator().manual_seed(k)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in PROMPT_LENS]
    expected, _ = _run(_engine(d, k, device="cuda"), prompts)  # eager MTP = plain greedy (CPU tests)
    truth = {tuple(p): e for p, e in zip(prompts, expected)}
    eager, graphed = _engine(d, k, device="cuda"), _engine(d, k, device="cuda", graphs=True)
    stats = graphed.speculator.cuda_graph_stats()
    assert stats["enabled"], stats
    assert not eager.speculator.cuda_graph_stats()["enabled"]
    eager_drafts, graph_drafts = _oracle(eager, truth, k), _oracle(graphed, truth, k)
    eager_out, eager_lp = _run(eager, prompts, logprobs=3)
    graph_out, graph_lp = _run(graphed, prompts, logprobs=3)
    assert eager_out == expected and graph_out == expected
    assert graph_drafts == eager_drafts
    for a_seq, b_seq in zip(eager_lp, graph_lp):
        assert len(a_seq) == len(b_seq) == NEW_TOKENS
        for a, b in zip(a_seq, b_seq):  # the target's logits at every accepted position
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
            assert [lp for _, lp in a.top_logprobs] == pytest.approx([lp for _, lp in b.top_logprobs], abs=1e-4)
    stats = graphed.speculator.cuda_graph_stats()
    assert stats["verify"]["num_replays"] >= 2 and stats["draft"]["num_replays"] >= 2
    assert stats["verify"]["capture_seconds"] > 0 and stats["draft"]["pool_bytes"] >= 0
