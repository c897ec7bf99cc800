"""Between the gRPC messages (glmserve.v1) and the engine's own types."""

from __future__ import annotations

from glmserve.engine.sampled_token import SampledToken
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.structured_output.spec import GrammarSpec
from glmserve.protos import worker_pb2 as pb
from glmserve.worker.lifecycle import ServingState

FINISH_TO_PB = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
FINISH_FROM_PB = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error"}

STATE_TO_PB = {ServingState.SERVING: pb.SERVING_STATE_SERVING, ServingState.DRAINING: pb.SERVING_STATE_DRAINING,
               ServingState.NOT_READY: pb.SERVING_STATE_NOT_READY}


def params_to_pb(p: SamplingParams, eos_token_ids: frozenset[int] | None = None) -> pb.SamplingOptions:
    msg = pb.SamplingOptions(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty, min_tokens=p.min_tokens, stop_token_ids=p.stop_token_ids or [],
        ignore_eos=p.ignore_eos, eos_token_ids=sorted(eos_token_ids or ()),
        resumed_output_tokens=p.resumed_output_tokens,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.max_tokens is not None:
        msg.max_tokens = p.max_tokens
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    _constraints_to_pb(p, msg)
    return msg


def _constraints_to_pb(p: SamplingParams, msg: pb.SamplingOptions) -> None:
    g = p.structured_output
    if g is not None:
        msg.grammar.CopyFrom(pb.GrammarSpec(kind=g.kind, value=g.value, start_after_token_id=g.start_after_token_id))
    for t, bias in (p.logit_bias or {}).items():
        msg.logit_bias[t] = bias
    msg.allowed_token_ids.extend(p.allowed_token_ids or [])
    msg.bad_words.extend(pb.TokenSequence(token_ids=seq) for seq in p.bad_words_token_ids or [])


def _constraints_from_pb(msg: pb.SamplingOptions) -> dict:
    g = msg.grammar if msg.HasField("grammar") else None
    return dict(
        structured_output=None if g is None else GrammarSpec(
            g.kind, g.value, g.start_after_token_id if g.HasField("start_after_token_id") else None),
        logit_bias=dict(msg.logit_bias) or None,
        allowed_token_ids=list(msg.allowed_token_ids) or None,
        bad_words_token_ids=[list(s.token_ids) for s in msg.bad_words] or None,
    )


def params_from_pb(msg: pb.SamplingOptions) -> tuple[SamplingParams, frozenset[int] | None]:
    """(params, eos ids or None for the worker's default). Raises ValueError on bad values."""
    params = SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k, min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        frequency_penalty=msg.frequency_penalty, presence_penalty=msg.presence_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens, stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        **_constraints_from_pb(msg),
        resumed_output_tokens=msg.resumed_output_tokens,
    )
    return params, (frozenset(msg.eos_token_ids) if msg.eos_token_ids else None)


def token_logprob_to_pb(t: SampledToken) -> pb.TokenLogprob:
    return pb.TokenLogprob(logprob=t.logprob or 0.0,
                           top_logprobs=[pb.TopLogprob(token_id=i, logprob=lp) for i, lp in (t.top_logprobs or [])])


def sampled_from_pb(token_id: int, lp: pb.TokenLogprob | None, want_logprobs: bool) -> SampledToken:
    if not want_logprobs or lp is None:
        return SampledToken(token_id)
    return SampledToken(token_id, lp.logprob, [(x.token_id, x.logprob) for x in lp.top_logprobs])
