"""MTP speculative decoding across the prefill/decode split, inside the engines (no network): the prefill
engine runs the MTP layer over the prompt and streams that layer's KV with the others (KVStreamer, with a
sender that copies straight into the decode engine's blocks) and keeps the last hidden state; the decode
engine drafts from token 2 on. Its drafts, step after step, and its tokens equal one engine doing it all,
also when either side serves part of the prompt from its prefix cache."""

from __future__ import annotations

import dataclasses

import pytest

from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.sampler import SampledToken
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from glmserve.prefill.kv_streamer import KVStreamer, Transfer
from glmserve.prefill.prompt_mtp import PromptMTP

BS = 4
K = 2
NEW = 10
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9]
EARLIER = PROMPT[:8] + [7, 7, 7]  # shares two blocks with PROMPT
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=["glm4_moe", "glm4_moe_lite"])
def model_dir(request, tmp_path_factory):
    return build_tiny_model(request.param, tmp_path_factory.mktemp("mtp_split") / "m", seed=7)


def make_engine(model_dir, mtp=True, chunk=64, k=K):
    cfg = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", show_progress=False,
                       cache=CacheConfig(block_size=BS, num_blocks=48),
                       scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, chunked_prefill_size=chunk),
                       speculative_algorithm="mtp" if mtp else "none", speculative_num_steps=k)
    return LLMEngine(cfg)


def record_drafts(engine) -> list[list[int]]:
    """Every draft list the speculator makes for request "r", in order."""
    spec, seen, original = engine.speculator, [], engine.speculator._draft

    def draft(jobs, hidden):
        original(jobs, hidden)
        if "r" in spec.drafts:
            seen.append(list(spec.drafts["r"]))

    spec._draft = draft
    return seen


class CopySender:
    """Plays the KV link: each sent token of a layer lands in the decode engine's block for it."""

    def __init__(self, dst_caches, dst_block_ids):
        self.dst_caches, self.dst_block_ids = dst_caches, dst_block_ids
        self.layers_sent: set[int] = set()

    def send_layer(self, transfer_id, layer, cache, block_ids, first, count, copy=True):
        # Lands synchronously, so copy=False (blocks read after the call) needs nothing more here.
        self.layers_sent.add(layer)
        dst = self.dst_caches[layer]
        for p in range(first, first + count):
            src_b, dst_b, off = block_ids[p // BS], self.dst_block_ids[p // BS], p % BS
            if cache.dim() == 5:  # GQA [N, 2, bs, H, D]
                dst[dst_b, :, off] = cache[src_b, :, off]
            else:  # MLA [N, bs, latent]
                dst[dst_b, off] = cache[src_b, off]


class Connector:
    def blocks_allocated(self, req):
        pass

    def request_freed(self, req):
        pass


def tokens(outputs, rid="r"):
    return [t for o in outputs if o.request_id == rid for t in o.new_token_ids]


SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=4, max_tokens=NEW, ignore_eos=True)


@pytest.mark.parametrize("cached_on, params, chunk, k", [
    (None, GREEDY, 64, K), (None, GREEDY, 64, 1), (None, GREEDY, 64, 4), ("prefill", GREEDY, 64, K),
    ("decode", GREEDY, 64, K), (None, GREEDY, 5, K), (None, SAMPLED, 64, K)],
    ids=["plain", "k1", "k4", "prefill-cache-hit", "decode-cache-hit", "chunked-prefill", "seeded-sampling"])
def test_decode_drafts_and_tokens_equal_one_engine(model_dir, cached_on, params, chunk, k):
    one = make_engine(model_dir, k=k)
    if cached_on:  # the same prefix-cache history as the side that holds it
        one.add_request("earlier", EARLIER, GREEDY)
        one.run_until_done()
    want_drafts = record_drafts(one)
    one.add_request("r", PROMPT, params)
    want = tokens(one.run_until_done())
    if params is GREEDY:
        plain = make_engine(model_dir, mtp=False)
        plain.add_request("r", PROMPT, params)
        assert want == tokens(plain.run_until_done())

    prefill, decode = make_engine(model_dir, chunk=chunk, k=k), make_engine(model_dir, k=k)
    decode.scheduler.kv_connector = Connector()
    for side in (prefill, decode):
        if side is (prefill if cached_on == "prefill" else decode if cached_on == "decode" else None):
            side.add_request("earlier", EARLIER, GREEDY)
            side.run_until_done()
    # What PrefillService does: no drafting on P, the MTP pass and streamer as its step observer.
    prefill.speculator = None
    streamer = KVStreamer(prefill.runner.kv_caches, PromptMTP(prefill))
    prefill.step_observer = streamer
    got_drafts = record_drafts(decode)

    decode.add_request("r", PROMPT, params, remote_prefill=True)
    decode.step()
    req = decode.requests["r"]
    local = req.num_computed_tokens
    assert local == (8 if cached_on == "decode" else 0)
    sender = CopySender(decode.runner.kv_caches, req.block_ids)
    transfer = Transfer(sender, 1, sent_upto=local, mtp=True)
    streamer.register("r", transfer)
    prefill.add_request("r", PROMPT, dataclasses.replace(params, max_tokens=1))  # P samples token 1 only
    first = tokens(prefill.run_until_done())
    assert len(first) == 1 and prefill.pool.num_used == 0
    n_layers = prefill.model_config.num_hidden_layers
    assert sender.layers_sent == set(range(n_layers + 1))  # the MTP layer's KV went too
    assert transfer.last_hidden is not None and transfer.last_hidden.shape == (prefill.model_config.hidden_size,)

    decode.remote_kv_arrived("r", SampledToken(first[0]), 0, mtp_hidden=transfer.last_hidden)
    assert decode.speculator.drafts["r"] == want_drafts[0]  # drafts from token 2 on, as one engine's
    got = first + tokens(decode.run_until_done())
    assert got == want
    assert got_drafts == want_drafts and decode.speculator.stats.num_drafts > 0
    assert decode.pool.num_used == 0


def test_a_transfer_without_mtp_gets_only_the_decoder_layers(model_dir):
    prefill = make_engine(model_dir)
    prefill.speculator = None
    n_layers = prefill.model_config.num_hidden_layers
    streamer = KVStreamer(prefill.runner.kv_caches, PromptMTP(prefill))
    prefill.step_observer = streamer
    sink = make_engine(model_dir, mtp=False)
    sender = CopySender(sink.runner.kv_caches, list(range(8)))
    transfer = Transfer(sender, 1, mtp=False)
    streamer.register("r", transfer)
    prefill.add_request("r", PROMPT, SamplingParams(temperature=0.0, max_tokens=1))
    prefill.run_until_done()
    assert sender.layers_sent == set(range(n_layers)) and transfer.last_hidden is None


def test_accepted_drafts_after_a_remote_prefill(model_dir):
    """Random MTP weights rarely guess right: drafts are replaced by the true continuation (one wrong token
    every third step), on one engine and on the decode side alike, so runs of accepted tokens, starting with
    the first verify step after the transfer, are checked too."""
    plain = make_engine(model_dir, mtp=False)
    plain.add_request("r", PROMPT, GREEDY)
    truth = tokens(plain.run_until_done())

    def use_oracle(engine):
        spec, original = engine.speculator, engine.speculator._draft

        def draft(jobs, hidden):
            original(jobs, hidden)
            for rid, d in list(spec.drafts.items()):
                n_out = engine.requests[rid].num_output_tokens
                good = list(truth[n_out : n_out + len(d)])
                if good and n_out % 3 == 2:
                    good[-1] = (good[-1] + 1) % engine.model_config.vocab_size
                spec.drafts[rid] = good or d

        spec._draft = draft

    one = make_engine(model_dir)
    use_oracle(one)
    one.add_request("r", PROMPT, GREEDY)
    assert tokens(one.run_until_done()) == truth

    prefill, decode = make_engine(model_dir), make_engine(model_dir)
    decode.scheduler.kv_connector = Connector()
    use_oracle(decode)
    prefill.speculator = None
    streamer = KVStreamer(prefill.runner.kv_caches, PromptMTP(prefill))
    prefill.step_observer = streamer
    decode.add_request("r", PROMPT, GREEDY, remote_prefill=True)
    decode.step()
    req = decode.requests["r"]
    transfer = Transfer(CopySender(decode.runner.kv_caches, req.block_ids), 1, mtp=True)
    streamer.register("r", transfer)
    prefill.add_request("r", PROMPT, dataclasses.replace(GREEDY, max_tokens=1))
    first = tokens(prefill.run_until_done())
    decode.remote_kv_arrived("r", SampledToken(first[0]), 0, mtp_hidden=transfer.last_hidden)
    assert first + tokens(decode.run_until_done()) == truth
    got, want = decode.speculator.stats, one.speculator.stats
    assert got.num_accepted_tokens > 0
    assert (got.num_drafts, got.num_accepted_tokens, got.accepted_per_position) == \
        (want.num_drafts, want.num_accepted_tokens, want.accepted_per_position)
