"""The persistent step inputs equal the plain reference (`build_context`) over a run of mixed steps, and
the model's layer loop calls the per-layer hook exactly once per layer."""

from __future__ import annotations

import random

import torch

from glmserve.engine.attention.context import SeqChunk, build_context
from glmserve.engine.request import Request
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import ScheduledChunk
from glmserve.engine.step_inputs import StepInputBuilder

BS = 4


def _assert_same(ctx, ref):
    for name in ("positions", "query_start_loc", "seq_lens", "slot_mapping"):
        torch.testing.assert_close(getattr(ctx, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    width = ref.block_tables.shape[1]
    assert ctx.block_tables.shape[1] >= width
    for i, n in enumerate(ref.seq_lens_cpu):  # only the blocks a sequence owns are meaningful
        used = -(-n // BS)
        assert torch.equal(ctx.block_tables[i, :used], ref.block_tables[i, :used])
    assert ctx.query_lens_cpu == ref.query_lens_cpu and ctx.seq_lens_cpu == ref.seq_lens_cpu


def test_builder_matches_reference_across_growth_release_and_row_reuse():
    rng = random.Random(0)
    builder = StepInputBuilder(max_blocks_per_seq=64, block_size=BS, device=torch.device("cpu"))
    next_block = iter(range(10_000))
    live: dict[str, Request] = {}
    for step in range(60):
        # Some requests finish (rows released and reused), some arrive, the rest advance.
        for rid in [r for r in live if rng.random() < 0.15]:
            builder.release([rid])
            del live[rid]
        while len(live) < (130 if step == 30 else rng.randint(1, 70)):  # beyond 64 rows: the table grows
            rid = f"r{step}-{len(live)}"
            live[rid] = Request(rid, [rng.randrange(100) for _ in range(rng.randint(1, 30))], SamplingParams())
        chunks = []
        for req in live.values():
            remaining = req.num_tokens - req.num_computed_tokens
            n = rng.randint(1, remaining) if remaining else 1
            if not remaining:
                req.token_ids.append(rng.randrange(100))
            need = -(-(req.num_computed_tokens + n) // BS)
            req.block_ids += [next(next_block) for _ in range(need - len(req.block_ids))]
            chunks.append(ScheduledChunk(req, n))
        ids, ctx = builder.build(chunks, [])
        ref = build_context([SeqChunk(list(c.request.block_ids), c.request.num_computed_tokens, c.num_new_tokens)
                             for c in chunks], BS, [], torch.device("cpu"))
        _assert_same(ctx, ref)
        expected_ids = [t for c in chunks for t in
                        c.request.token_ids[c.request.num_computed_tokens: c.request.num_computed_tokens + c.num_new_tokens]]
        assert ids.tolist() == expected_ids
        for c in chunks:
            c.request.num_computed_tokens += c.num_new_tokens


def test_the_layer_loop_reports_each_layer_once(tmp_path):
    from glmserve import LLM, SamplingParams as SP
    from glmserve.engine.tiny_model import build_tiny_model

    llm = LLM(model=str(build_tiny_model("glm4_moe", tmp_path / "m", seed=1)), dtype="float32")
    engine = llm.engine
    calls: list[list[int]] = []

    class Recorder:
        def before_forward(self, chunks):
            calls.append([])
            return calls[-1].append

    engine.step_observer = Recorder()
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], SP(temperature=0.0, max_tokens=3, ignore_eos=True))
    layers = list(range(engine.model_config.num_hidden_layers))
    assert len(calls) == 3 and all(c == layers for c in calls)


def test_steady_decode_reuses_last_tables_and_stays_equal_to_the_reference():
    """Decode steps over the same rows copy only rows that gained a block; a released row taken over by a
    new request at the same batch position, and a wider table, must still give the reference's tables."""
    rng = random.Random(1)
    builder = StepInputBuilder(max_blocks_per_seq=64, block_size=BS, device=torch.device("cpu"))
    next_block = iter(range(10_000))
    batch = [Request(f"r{i}", [rng.randrange(100) for _ in range(rng.randint(1, 12))], SamplingParams())
             for i in range(8)]
    reused = 0
    for step in range(40):
        if step == 20:  # r3 finishes; a new request takes its row and its place in the batch
            builder.release([batch[3].request_id])
            batch[3] = Request("late", [rng.randrange(100) for _ in range(9)], SamplingParams())
        chunks = []
        for req in batch:
            n = req.num_tokens - req.num_computed_tokens
            if not n:
                req.token_ids.append(rng.randrange(100))
                n = 1
            need = -(-(req.num_computed_tokens + n) // BS)
            req.block_ids += [next(next_block) for _ in range(need - len(req.block_ids))]
            chunks.append(ScheduledChunk(req, n))
        before = builder._bt
        _, ctx = builder.build(chunks, [])
        reused += builder._bt is before
        ref = build_context([SeqChunk(list(c.request.block_ids), c.request.num_computed_tokens, c.num_new_tokens)
                             for c in chunks], BS, [], torch.device("cpu"))
        _assert_same(ctx, ref)
        for c in chunks:
            c.request.num_computed_tokens += c.num_new_tokens
    assert reused > 20  # the reuse path ran (most steps), not only the full gather
