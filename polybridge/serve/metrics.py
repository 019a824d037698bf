"""What ``GET /metrics`` reports: requests by outcome and language, batch sizes, queue depth, latency."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

LATENCY_WINDOW = 2048  # the latest requests whose latency the percentiles cover


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values``, nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-int(q * 100) * len(ordered) // 100))
    return ordered[min(rank, len(ordered)) - 1]


class Metrics:
    """Counters shared by the event loop and the worker thread (under a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()  # by outcome: ok, rejected, invalid, ...
        self.languages: collections.Counter[str] = collections.Counter()
        self.routes = 0
        self.images = 0
        self.batches = 0
        self.batch_rows: collections.Counter[int] = collections.Counter()
        self.batch_jobs: collections.Counter[int] = collections.Counter()
        self.model_seconds = 0.0
        self._latency: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    def request(self, outcome: str, language: str | None = None, latency: float | None = None, images: int = 0) -> None:
        with self._lock:
            self.requests[outcome] += 1
            if language is not None:
                self.languages[language] += 1
            if latency is not None:
                self._latency.append(latency)
            self.images += images

    def route(self) -> None:
        with self._lock:
            self.routes += 1

    def batch(self, rows: int, jobs: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_rows[rows] += 1
            self.batch_jobs[jobs] += 1
            self.model_seconds += seconds

    def snapshot(self, queue_depth: int, running: int, max_queue: int, max_batch: int) -> dict[str, Any]:
        with self._lock:
            latency = list(self._latency)
            rows = sum(k * v for k, v in self.batch_rows.items())
            jobs = sum(k * v for k, v in self.batch_jobs.items())
            return {
                "uptime_seconds": round(time.time() - self.started, 1),
                "requests": {"total": sum(self.requests.values()), **dict(sorted(self.requests.items()))},
                "requests_by_language": dict(sorted(self.languages.items())),
                "routes": self.routes,
                "images": self.images,
                "queue": {"depth": queue_depth, "running": running, "max": max_queue},
                "batches": {"count": self.batches, "max_rows": max_batch,
                            "mean_rows": round(rows / self.batches, 3) if self.batches else None,
                            "mean_requests": round(jobs / self.batches, 3) if self.batches else None,
                            "rows_histogram": {str(k): v for k, v in sorted(self.batch_rows.items())},
                            "model_seconds": round(self.model_seconds, 3)},
                "latency_seconds": {"window": len(latency),
                                    "mean": round(sum(latency) / len(latency), 4) if latency else None,
                                    **{name: None if (v := percentile(latency, q)) is None else round(v, 4)
                                       for name, q in (("p50", 0.50), ("p95", 0.95), ("max", 1.0))}},
            }
