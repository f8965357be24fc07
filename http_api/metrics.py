"""The front's Prometheus metrics, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spool.batches import RequestCounts
from spool.protocol import Usage

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlx_ring_http_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("mlx_ring_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("mlx_ring_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("mlx_ring_time_to_first_token_seconds", "From request queued to first text",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mlx_ring_inter_token_latency_seconds", "Between successive text events",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("mlx_ring_queue_depth", "Requests waiting in the spool", registry=r)
        self.active = Gauge("mlx_ring_active_sequences", "Sequences rank 0 is generating", registry=r)
        self.prompt_cache_hits = Counter("mlx_ring_prompt_cache_hits", "Requests that reused cached prompt KV",
                                         registry=r)
        self.prompt_cache_misses = Counter("mlx_ring_prompt_cache_misses", "Requests that reused no cached KV",
                                           registry=r)
        self.prompt_cache_reused = Counter("mlx_ring_prompt_cache_reused_tokens",
                                           "Prompt tokens taken from the prompt cache", registry=r)
        self.prompt_cache_tokens = Gauge("mlx_ring_prompt_cache_tokens", "Tokens held in rank 0's prompt cache",
                                         registry=r)
        self.batch_lines = Gauge("mlx_ring_batch_lines", "Lines of each running batch: total, completed, failed",
                                 ["batch", "state"], registry=r)
        self.accepted_predictions = Counter("mlx_ring_accepted_prediction_tokens",
                                            "Completion tokens that were accepted speculative proposals", registry=r)
        self.acceptance_rate = Gauge("mlx_ring_speculation_acceptance_rate",
                                     "Speculative proposals the ring accepted, of those it verified, since start",
                                     registry=r)
        self.tokens_per_pass = Gauge("mlx_ring_speculation_tokens_per_pass",
                                     "Tokens kept per speculative verification pass, since start", registry=r)

    def batch_progress(self, counts: dict[str, RequestCounts]) -> None:
        """The running batches' line counts, by batch id (one that ended leaves the metric)."""
        self.batch_lines.clear()
        for batch_id, batch_counts in counts.items():
            for state, count in batch_counts.model_dump().items():
                self.batch_lines.labels(batch_id, state).set(count)

    def finished(self, usage: Usage) -> None:
        """Count a finished request's tokens and its use of the prompt cache."""
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        cached = usage.prompt_tokens_details.cached_tokens
        (self.prompt_cache_hits if cached else self.prompt_cache_misses).inc()
        self.prompt_cache_reused.inc(cached)
        self.accepted_predictions.inc(usage.completion_tokens_details.accepted_prediction_tokens)

    def speculation(self, record: dict | None) -> None:
        """Rank 0's speculation figures (its heartbeat's `speculation`; None when off or unknown)."""
        record = record or {}
        self.acceptance_rate.set(record.get("acceptance_rate") or 0)
        self.tokens_per_pass.set(record.get("tokens_per_pass") or 0)
