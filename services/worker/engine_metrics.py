"""Engine statistics → Prometheus, refreshed after every engine step (on the engine thread)."""

from __future__ import annotations

import time

from glmserve.engine.engine import LLMEngine
from glmserve.metrics import ServiceMetrics

_GAUGES = ("num_requests_running", "num_requests_waiting", "num_queued_tokens", "kv_cache_usage_perc")
_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions")


class EngineMetrics:
    """Counters are fed by differences of the engine's running totals."""

    def __init__(self, metrics: ServiceMetrics, min_interval: float = 0.05):
        self.metrics = metrics
        self._last_totals = {name: 0 for name in _COUNTERS}
        self._min_interval = min_interval
        self._last = 0.0
        for name in _GAUGES:
            metrics.get(name).set(0)
        for name in _COUNTERS + ("prompt_tokens", "generation_tokens"):
            metrics.get(name).inc(0)

    def on_step(self, engine: LLMEngine, outputs) -> None:
        self.metrics.get("generation_tokens").inc(sum(len(o.new_token_ids) for o in outputs))
        samples = engine.scheduler.queue_time_samples
        if samples:
            hist = self.metrics.get("request_queue_time_seconds")
            for s in samples:
                hist.observe(s)
            samples.clear()
        for seconds in engine.structured.drain_compile_times():
            self.metrics.get("grammar_compile_seconds").observe(seconds)
        now = time.monotonic()
        if now - self._last < self._min_interval and engine.has_unfinished():
            return
        self._last = now
        self.refresh(engine)

    def refresh(self, engine: LLMEngine) -> None:
        stats = engine.stats()
        for name in _GAUGES:
            self.metrics.get(name).set(stats[name])
        for name in _COUNTERS:
            delta = stats[name] - self._last_totals[name]
            if delta > 0:
                self.metrics.get(name).inc(delta)
            self._last_totals[name] = stats[name]
        if engine.speculator is not None:
            self._refresh_spec(engine.speculator.stats)

    def _refresh_spec(self, spec) -> None:
        totals = {("spec_decode_num_drafts", ""): spec.num_drafts,
                  ("spec_decode_num_draft_tokens", ""): spec.num_draft_tokens,
                  ("spec_decode_num_accepted_tokens", ""): spec.num_accepted_tokens}
        for pos, n in enumerate(spec.accepted_per_position):
            totals[("spec_decode_num_accepted_tokens_per_pos", str(pos))] = n
        for (name, pos), total in totals.items():
            delta = total - self._last_totals.get((name, pos), 0)
            # inc(0) too: a counter shows up (at 0) once speculation runs, even before anything is accepted
            self.metrics.get(name, **({"position": pos} if pos else {})).inc(max(delta, 0))
            self._last_totals[(name, pos)] = total
