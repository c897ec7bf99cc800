"""One engine step with MTP speculative decoding: verify last step's drafts, accept, draft again.

Each running request's k drafts are appended to its token list just for scheduling, so the scheduler
sizes, budgets and allocates blocks for the verify chunk [last token + drafts] like any other chunk;
they are taken out again right after the inputs are built. One target forward runs the whole batch
(verify chunks mixed with prefill chunks). Verification goes position by position through the
ordinary sampler, so every accepted token is exactly the one the target would have produced alone,
with the target's logprobs, penalties, min_tokens and stops applied after each token.

Rejected positions roll back for free: computed counts advance only over accepted tokens, and the
cache slots past them are overwritten by the next step.

Draft layout (vLLM's for GLM/DeepSeek MTP): the MTP layer's input at position i is the token at i + 1
with the target's hidden state at i; its output there predicts the token at i + 2. After each forward,
the MTP layer runs over every position whose target hidden state is now final (this writes its own KV
layer, `num_hidden_layers`), then k - 1 more one-token steps chain its own hidden state and argmax.
Greedy requests draft the MTP argmax and accept the longest matching prefix; sampled requests draft from
the MTP layer's processed distribution and accept by rejection sampling (rejection.py), so their tokens
follow the target's distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from glmserve.engine.attention.context import SeqChunk
from glmserve.engine.logits_processors import has_token_constraints
from glmserve.engine.outputs import EngineOutput
from glmserve.engine.request import Request, RequestStatus
from glmserve.engine.sampler import SamplingRow, _has_penalty
from glmserve.engine.scheduler import ScheduledChunk
from glmserve.engine.spec_decode.graphs import build_spec_graphs
from glmserve.engine.spec_decode.rejection import accept_or_resample, draw, processed_probs


class _Shifted:
    """A token list read `offset` positions ahead (the MTP input at position i is the token at i + 1);
    StepInputBuilder only reads `token_ids[start]` and `token_ids[start:start + n]`."""

    __slots__ = ("ids", "offset")

    def __init__(self, ids: Sequence[int], offset: int):
        self.ids, self.offset = ids, offset

    def __getitem__(self, s: slice | int):
        if isinstance(s, int):
            return self.ids[s + self.offset]
        return list(self.ids[s.start + self.offset : s.stop + self.offset])


@dataclass
class _View:
    """What StepInputBuilder reads of a request, for an MTP pass over its blocks."""

    request_id: str
    token_ids: Any
    num_computed_tokens: int
    block_ids: list[int]


@dataclass
class _Chunk:
    request: _View
    num_new_tokens: int


@dataclass
class SpecDecodeStats:
    """Counters with vLLM's meaning: drafts (verify passes with >= 1 draft), draft tokens, accepted tokens,
    and accepted tokens per draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        while len(self.accepted_per_position) < proposed:
            self.accepted_per_position.append(0)
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify pass (accepted drafts + the target's own token), vLLM's definition."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class MTPSpeculator:
    def __init__(self, engine, num_speculative_tokens: int):
        self.engine = engine
        self.k = num_speculative_tokens
        self.mtp = engine.loaded.model.mtp
        self.drafts: dict[str, list[int]] = {}
        # Sampled requests: the distribution each draft was drawn from, [num drafts, V] (rejection sampling).
        self.draft_probs: dict[str, torch.Tensor] = {}
        self.stats = SpecDecodeStats()
        # CUDA graphs of the verify and draft steps (graphs.py), or why there are none.
        self.graphs, self.cuda_graph_disabled_reason = build_spec_graphs(engine, num_speculative_tokens)
        # This step verified k drafts for every sequence and prefilled nothing (read once by _draft).
        self._pure_verify = False

    def cuda_graph_stats(self) -> dict:
        if self.graphs is None:
            return {"enabled": False, "reason": self.cuda_graph_disabled_reason}
        return self.graphs.stats()

    def num_drafts_for(self, req: Request) -> int:
        """How many drafts a request may verify next step: none under a grammar (it constrains each token
        given the previous one), and never past max_tokens or the context (so no draft position exceeds the
        model's length)."""
        if req.request_id in self.engine.structured.grammars:
            return 0
        n = min(self.k, self.engine.max_model_len - req.num_tokens - 1)
        if req.params.max_tokens is not None:
            n = min(n, req.params.max_tokens - req.num_output_tokens - 1)
        return max(n, 0)

    # -- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        eng = self.engine
        drafted: dict[str, tuple[Request, list[int]]] = {}
        for req in eng.scheduler.running:
            d = self.drafts.get(req.request_id)
            n = min(len(d), self.num_drafts_for(req)) if d else 0
            if n:
                req.token_ids += d[:n]
                drafted[req.request_id] = (req, d[:n])
        self.drafts.clear()
        draft_probs, self.draft_probs = self.draft_probs, {}
        graph_seqs = None
        try:
            plan = eng.scheduler.schedule()
            if not plan.is_empty():
                runner = eng.runner
                graph_seqs = self._verify_graph_seqs(plan.chunks) if self.graphs is not None else None
                if graph_seqs is not None:  # [last token + k drafts] of each sequence, drafts still appended
                    q = self.k + 1
                    graph_ids = [t for c in plan.chunks
                                 for t in c.request.token_ids[c.request.num_computed_tokens:][:q]]
                else:
                    input_ids, ctx = runner.inputs.build(plan.chunks, runner.kv_caches)
        finally:
            for req, d in drafted.values():
                del req.token_ids[len(req.token_ids) - len(d):]
        outputs = eng.settle_plan(plan)
        if plan.is_empty():
            return outputs
        if graph_seqs is not None:
            hidden = self.graphs.verify.run(graph_ids, graph_seqs)  # the graph's buffer: used up within this step
        else:
            eng.runner.backend.prepare(ctx)
            hidden = eng.loaded.model(input_ids, ctx.positions, ctx)
        outputs += self._verify_and_draft(plan.chunks, hidden, drafted, draft_probs)
        return outputs

    def _verify_graph_seqs(self, chunks: list[ScheduledChunk]) -> list[SeqChunk] | None:
        """The step's sequences when it is a pure verify batch that a captured bucket holds: every chunk is
        [last token + k drafts] (drafts appended to token_ids at this point). None: run eagerly."""
        q = self.k + 1
        for c in chunks:
            r = c.request
            if c.num_new_tokens != q or r.num_computed_tokens + q != r.num_tokens:
                return None
        seqs = [SeqChunk(c.request.block_ids, c.request.num_computed_tokens, q) for c in chunks]
        return seqs if self.graphs.verify.can_run(seqs) else None

    def _verify_and_draft(self, chunks: list[ScheduledChunk], hidden: torch.Tensor,
                          drafted: dict[str, tuple[Request, list[int]]],
                          draft_probs: dict[str, torch.Tensor]) -> list[EngineOutput]:
        eng = self.engine
        # Per chunk: (request, first position, hidden offset, rows to verify or 0 when it does not sample).
        verify: list[tuple[Request, int, int, list[int]]] = []
        prefill_only: list[tuple[Request, int, int, int]] = []
        off = 0
        pure = True
        for c in chunks:
            req, start, n = c.request, c.request.num_computed_tokens, c.num_new_tokens
            real = req.num_tokens
            if start + n >= real:  # the chunk reaches the real last token: sample there and verify drafts
                d = drafted.get(req.request_id, (req, []))[1][: start + n - real]
                verify.append((req, start, off, d))
                pure = pure and n == self.k + 1 and len(d) == self.k
            else:
                prefill_only.append((req, start, off, n))
                pure = False
            off += n
        self._pure_verify = pure
        # Logits of every verify row at once: the real last token, then each covered draft.
        row_index = [o + (r.num_tokens - 1 - s) + i for r, s, o, d in verify for i in range(len(d) + 1)]
        logits = (eng.loaded.model.compute_logits(hidden[torch.tensor(row_index, device=hidden.device)]).float()
                  if row_index else None)
        base, b = [], 0
        for _, _, _, d in verify:
            base.append(b)
            b += len(d) + 1
        if verify and eng.structured.grammars:  # requests under a grammar never draft: only their first row
            rids = [r.request_id for r, _, _, _ in verify]
            with torch.inference_mode(False):  # the bitmask is filled on a helper thread, outside this mode
                masks = eng.structured.begin_masks(rids)
            if masks is not None:
                first = torch.tensor(base, device=logits.device)
                rows0 = logits[first]
                eng.structured.apply(masks, rows0, rids)
                logits[first] = rows0
        new_tokens: list[list] = [[] for _ in verify]
        accepted = [0] * len(verify)
        # Greedy requests: every position's token from one sampler call (position i's history is the real
        # tokens plus drafts before i, which is exactly what it is whenever position i is reached).
        greedy = [v for v in range(len(verify)) if verify[v][0].params.greedy]
        if greedy:
            self._verify_greedy(greedy, verify, logits, base, new_tokens, accepted)
        active = [v for v in range(len(verify)) if not verify[v][0].params.greedy]
        i = 0
        while active:
            # Sampled requests with a draft here go through rejection sampling; the rest through the sampler.
            rejecting = [v for v in active if not verify[v][0].params.greedy and i < len(verify[v][3])]
            plain = [v for v in active if v not in rejecting]
            picked = {}
            if plain:
                rows = [eng._sampling_row(verify[v][0]) for v in plain]
                picked.update(zip(plain, eng.sampler(logits[torch.tensor([base[v] + i for v in plain])], rows)))
            for v in rejecting:
                picked[v] = self._rejection_step(logits[base[v] + i], verify[v][0], verify[v][3][i],
                                                 draft_probs[verify[v][0].request_id][i])
            still = []
            for v in active:
                tok = picked[v]
                req, _, _, d = verify[v]
                req.append_token(tok)
                eng.structured.accept(req.request_id, tok.token_id)
                req.check_stop()
                new_tokens[v].append(tok)
                if not req.is_finished and i < len(d) and tok.token_id == d[i]:
                    accepted[v] += 1
                    still.append(v)
            active, i = still, i + 1

        outputs: list[EngineOutput] = []
        # (request, first position, hidden offset, count, sampled this step)
        mtp_jobs: list[tuple[Request, int, int, int, bool]] = []
        for req, start, off, n in prefill_only:
            eng.scheduler.advance(ScheduledChunk(req, n))
            mtp_jobs.append((req, start, off, n, False))
        for v, (req, start, off, d) in enumerate(verify):
            self.stats.record(len(d), accepted[v])
            toks = new_tokens[v]
            ids = [t.token_id for t in toks]
            lps = toks if req.params.logprobs is not None else []
            if req.is_finished:
                eng.retire(req)  # also keeps the engine's count of non-plain requests right
                outputs.append(eng._finished_output(req, ids, lps))
                continue
            # Valid KV: the real tokens up to the last one, plus the accepted drafts; the newest token is not computed.
            valid = req.num_tokens - 1 - start
            eng.scheduler.advance(ScheduledChunk(req, valid))
            mtp_jobs.append((req, start, off, valid, True))
            outputs.append(EngineOutput(req.request_id, ids, list(lps), num_prompt_tokens=req.num_prompt_tokens,
                                        num_cached_tokens=max(req.num_cached_tokens, 0)))
        self._draft(mtp_jobs, hidden)
        return outputs

    def _verify_greedy(self, group: list[int], verify, logits: torch.Tensor, base: list[int],
                       new_tokens: list[list], accepted: list[int]) -> None:
        """Accept each greedy request's longest matching draft prefix plus the target's next token."""
        eng = self.engine
        rows, index = [], []
        for v in group:
            req, _, _, d = verify[v]
            eos = frozenset() if req.params.ignore_eos else req.eos_token_ids
            p = req.params
            # the history matters to min_tokens, penalties and bad words only: copy it only for them
            exact = p.min_tokens > req.num_output_tokens or _has_penalty(p) or has_token_constraints(p)
            for i in range(len(d) + 1):
                hist = req.token_ids + d[:i] if exact and i else req.token_ids
                rows.append(SamplingRow(p, hist, req.num_prompt_tokens, req.generator, eos))
                index.append(base[v] + i)
        sel = logits if len(index) == logits.shape[0] else logits[torch.tensor(index, device=logits.device)]
        picked = eng.sampler(sel, rows)
        j = 0
        for v in group:
            req, _, _, d = verify[v]
            for i in range(len(d) + 1):
                tok = picked[j + i]
                req.append_token(tok)
                if eng.structured.grammars:
                    eng.structured.accept(req.request_id, tok.token_id)
                req.check_stop()
                new_tokens[v].append(tok)
                if req.is_finished or i == len(d) or tok.token_id != d[i]:
                    break
                accepted[v] += 1
            j += len(d) + 1

    def _rejection_step(self, logits: torch.Tensor, req: Request, draft: int, q: torch.Tensor):
        """The target's token at a draft position of a sampled request, with the target's logprobs."""
        eng = self.engine
        row = eng._sampling_row(req)
        p = processed_probs(eng.sampler, logits[None], [row])[0]
        token, _ = accept_or_resample(p, q.to(p.device), draft, req.generator)
        return eng.sampler._package(logits[None].float(), [row], torch.tensor([token], device=logits.device))[0]

    def _pick_drafts(self, logits: torch.Tensor, reqs: list[Request], drafts: list[list[int]],
                     probs: list[list[torch.Tensor]]) -> list[int]:
        """Next draft of each request: the argmax for greedy ones; for sampled ones a draw from the MTP
        distribution processed like the target's (penalties see the drafts so far), kept for verification."""
        out = logits.argmax(dim=-1).tolist()
        for j, r in enumerate(reqs):
            if r.params.greedy:
                continue
            history = r.token_ids + drafts[j]
            row = SamplingRow(r.params, history, r.num_prompt_tokens, r.generator,
                              frozenset() if r.params.ignore_eos else r.eos_token_ids)
            q = processed_probs(self.engine.sampler, logits[j : j + 1], [row])[0]
            out[j] = draw(q, r.generator)
            probs[j].append(q)
        return out

    @torch.inference_mode()
    def draft_after_remote_prefill(self, req: Request, last_hidden: torch.Tensor) -> None:
        """A decode worker's request whose prompt KV (MTP layer included) came from a prefill worker, with
        the target's hidden state at the last prompt position: draft as if this engine had prefilled it."""
        hidden = last_hidden.to(self.engine.device, self.engine.loaded.dtype).view(1, -1)
        self._draft([(req, req.num_tokens - 2, 0, 1, True)], hidden)

    # -- drafting ---------------------------------------------------------------------------------
    def _draft_by_graph(self, jobs: list[tuple[Request, int, int, int, bool]], hidden: torch.Tensor) -> bool:
        """After a pure verify batch: draft by one replay of the captured chain when every request is greedy
        and wants k drafts; False (nothing done) otherwise."""
        k, q = self.k, self.k + 1
        if self.graphs is None:
            return False
        for r, _, _, _, sampled in jobs:
            if not (sampled and r.params.greedy and self.num_drafts_for(r) == k):
                return False
        seqs = [SeqChunk(r.block_ids, s, q) for r, s, _, _, _ in jobs]
        if not self.graphs.draft.can_run(seqs):
            return False
        # MTP input at position p is the token at p + 1: the accepted drafts and the target's new token.
        ids = [t for r, s, _, n, _ in jobs for t in r.token_ids[s + 1 : s + 1 + n] + [0] * (q - n)]
        rows = torch.tensor([o + j for _, _, o, _, _ in jobs for j in range(q)], device=hidden.device)
        drafts = self.graphs.draft.draft(seqs, ids, hidden[rows], [n - 1 for _, _, _, n, _ in jobs])
        for (r, _, _, _, _), d in zip(jobs, drafts):
            self.drafts[r.request_id] = d
        return True

    def _mtp_pass(self, chunks: list[_Chunk], prev_hidden: torch.Tensor) -> torch.Tensor:
        runner = self.engine.runner
        ids, ctx = runner.inputs.build(chunks, runner.kv_caches)
        runner.backend.prepare(ctx)
        return self.mtp(ids, ctx.positions, prev_hidden, ctx)

    def _draft(self, jobs: list[tuple[Request, int, int, int, bool]], hidden: torch.Tensor) -> None:
        """Run the MTP layer over each job's newly final positions, then chain it for the next drafts.
        Sampled requests never draft, so they skip it."""
        pure, self._pure_verify = self._pure_verify, False  # set by this step's verification only
        jobs = [j for j in jobs if j[3] > 0 and j[0].status is RequestStatus.RUNNING]
        if not jobs:
            return
        if pure and self._draft_by_graph(jobs, hidden):
            return
        chunks = [_Chunk(_View(r.request_id, _Shifted(r.token_ids, 1), s, r.block_ids), n) for r, s, _, n, _ in jobs]
        rows = torch.cat([torch.arange(o, o + n) for _, _, o, n, _ in jobs]).to(hidden.device)
        mtp_hidden = self._mtp_pass(chunks, hidden[rows])
        # Requests that drafts are wanted for: their real last token is the newest (not computed) one.
        want, last_rows, end = [], [], 0
        for r, _, _, n, sampled in jobs:
            end += n
            k = self.num_drafts_for(r) if sampled else 0
            if k:
                want.append((r, k))
                last_rows.append(end - 1)
        if not want:
            return
        h = mtp_hidden[torch.tensor(last_rows, device=hidden.device)]
        drafts: list[list[int]] = [[] for _ in want]
        probs: list[list[torch.Tensor]] = [[] for _ in want]
        for j, t in enumerate(self._pick_drafts(self.mtp.compute_logits(h), [r for r, _ in want], drafts, probs)):
            drafts[j].append(t)
        for step in range(1, max(k for _, k in want)):
            live = [j for j, (_, k) in enumerate(want) if k > step]
            chunks = []
            for j in live:
                r = want[j][0]
                pos = r.num_tokens - 2 + step  # draft `step` (1-based) goes in at position num_tokens - 2 + step
                chunks.append(_Chunk(_View(r.request_id, _Shifted([drafts[j][-1]], -pos), pos, r.block_ids), 1))
            every = len(live) == len(want)
            sel = None if every else torch.tensor(live, device=hidden.device)
            h = self._mtp_pass(chunks, h if every else h[sel])
            tok = self._pick_drafts(self.mtp.compute_logits(h), [want[j][0] for j in live],
                                    [drafts[j] for j in live], [probs[j] for j in live])
            for j, t in zip(live, tok):
                drafts[j].append(t)
            if not every:  # keep h aligned with `want` for the next step's selection
                full = torch.zeros(len(want), h.shape[-1], dtype=h.dtype, device=h.device)
                full[sel] = h
                h = full
        for (r, _), d, q in zip(want, drafts, probs):
            self.drafts[r.request_id] = d
            if q:
                self.draft_probs[r.request_id] = torch.stack(q)
