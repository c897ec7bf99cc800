"""Speculative-decoding acceptance over a benchmark run: the servers' spec_decode counters, scraped from
their Prometheus /metrics before and after the run, differenced. vLLM's meanings: mean acceptance length =
1 + accepted / drafts (tokens per verify step), acceptance rate = accepted / draft tokens, acceptance at
draft position i = tokens accepted there / drafts."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from typing import Sequence

from prometheus_client.parser import text_string_to_metric_families

# Our names first; vLLM's (and ours under --metrics-compat vllm) when a server exports only those.
_PREFIXES = ("glmserve:", "vllm:")
_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
_PER_POS = "spec_decode_num_accepted_tokens_per_pos"


@dataclass
class SpecDecodeCounts:
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: dict[int, float] = field(default_factory=dict)

    def __sub__(self, before: SpecDecodeCounts) -> SpecDecodeCounts:
        positions = sorted(set(self.accepted_per_pos) | set(before.accepted_per_pos))
        return SpecDecodeCounts(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens,
                                self.accepted - before.accepted,
                                {p: self.accepted_per_pos.get(p, 0.0) - before.accepted_per_pos.get(p, 0.0)
                                 for p in positions})

    def summary(self) -> dict | None:
        """The run's acceptance figures, or None when nothing was drafted."""
        if self.drafts <= 0:
            return None
        return {"num_drafts": int(self.drafts), "num_draft_tokens": int(self.draft_tokens),
                "num_accepted_tokens": int(self.accepted),
                "mean_acceptance_length": 1.0 + self.accepted / self.drafts,
                "acceptance_rate": self.accepted / self.draft_tokens if self.draft_tokens else 0.0,
                "per_position_acceptance_rate": [self.accepted_per_pos[p] / self.drafts
                                                 for p in sorted(self.accepted_per_pos)]}


def parse_counts(text: str) -> SpecDecodeCounts | None:
    """The spec_decode counters of one /metrics page (None when it has none)."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total"):
                samples.setdefault(s.name.removesuffix("_total"), {})[tuple(sorted(s.labels.items()))] = s.value
    for prefix in _PREFIXES:
        if prefix + _COUNTERS[0] not in samples:
            continue
        total = [sum(samples.get(prefix + name, {}).values()) for name in _COUNTERS]
        per_pos: dict[int, float] = {}
        for labels, value in samples.get(prefix + _PER_POS, {}).items():
            pos = dict(labels).get("position")
            if pos is not None and pos.isdigit():
                per_pos[int(pos)] = per_pos.get(int(pos), 0.0) + value
        return SpecDecodeCounts(*total, per_pos)
    return None


def scrape(urls: Sequence[str], timeout_s: float = 10.0) -> tuple[SpecDecodeCounts | None, list[str]]:
    """Summed counters over every URL that has them (one per decode worker under `glmserve up`), and one
    error line per URL that could not be read."""
    total, errors, found = SpecDecodeCounts(), [], False
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                counts = parse_counts(r.read().decode("utf-8", "replace"))
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        if counts is None:
            continue
        found = True
        total.drafts += counts.drafts
        total.draft_tokens += counts.draft_tokens
        total.accepted += counts.accepted
        for p, v in counts.accepted_per_pos.items():
            total.accepted_per_pos[p] = total.accepted_per_pos.get(p, 0.0) + v
    return (total if found else None), errors


def format_section(summary: dict, width: int) -> list[str]:
    def row(label: str, value) -> str:
        shown = f"{value:<10.2f}" if isinstance(value, float) else f"{value:<10}"
        return f"{label + ':':<40} {shown}".rstrip()

    per_pos = ", ".join(f"{100 * r:.1f}" for r in summary["per_position_acceptance_rate"])
    return [f"{'Speculative Decoding':-^{width}}",
            row("Mean acceptance length", summary["mean_acceptance_length"]),
            row("Acceptance rate (%)", 100 * summary["acceptance_rate"]),
            row("Drafts", summary["num_drafts"]),
            row("Draft tokens", summary["num_draft_tokens"]),
            row("Accepted tokens", summary["num_accepted_tokens"]),
            f"{'Per-position acceptance (%):':<40} {per_pos}".rstrip()]
