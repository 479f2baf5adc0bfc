"""`GET /metrics` of `loopedlm serve`: a Prometheus collector that reads the scheduler's
counters and the server's HTTP status counts at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loopedlm.infer.scheduler import Scheduler


class ServerMetrics:
    """Prometheus collector over `scheduler` and `http_counts` (HTTP status -> requests)."""

    def __init__(self, scheduler: Scheduler, http_counts: dict[int, int]):
        self.scheduler, self.http_counts = scheduler, http_counts

    def collect(self) -> Iterator[Any]:
        sched, http = self.scheduler, self.http_counts
        requests = CounterMetricFamily("loopedlm_requests", "HTTP completion requests by status",
                                       labels=["status"])
        for status, count in sorted(http.items()):
            requests.add_metric([str(status)], count)
        yield requests
        sequences = CounterMetricFamily("loopedlm_sequences_finished",
                                        "finished sequences by finish reason", labels=["reason"])
        for reason, count in sorted(sched.finished.items()):
            sequences.add_metric([reason], count)
        yield sequences
        for key, name, doc in (
                ("prompt_tokens", "loopedlm_prompt_tokens", "prompt tokens prefilled"),
                ("tokens", "loopedlm_generated_tokens", "tokens generated"),
                ("loops", "loopedlm_loops_spent", "loops spent on generated tokens (a token "
                                                  "at N loops counts N)"),
                ("steps", "loopedlm_decode_steps", "batched decode steps")):
            yield CounterMetricFamily(name, doc, value=sched.stats[key])
        yield GaugeMetricFamily("loopedlm_queue_length", "sequences waiting for a slot",
                                value=sched.queue_length)
        yield GaugeMetricFamily("loopedlm_batch_size", "sequences in the running batch",
                                value=sched.batch_size)


__all__ = ["ServerMetrics"]
