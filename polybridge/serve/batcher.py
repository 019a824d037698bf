"""The batcher: a bounded queue of generation jobs and the one worker thread that runs the model.

torch is not re-entrant and a denoising loop takes seconds, so the model runs in one thread of its own and the event
loop only enqueues jobs and awaits their futures. The worker takes the oldest job, then waits until ``max_wait_ms``
after that job arrived (or until ``max_batch`` rows are there) for more jobs that can share its call: the same
steps, guidance and size (:attr:`GenerateJob.key`); languages may differ, each row has its own. Jobs that
cannot share wait for a later call, in order. A job whose client has gone is cancelled and dropped before it runs.

When the queue holds ``max_queue`` jobs, :meth:`Batcher.submit` raises :class:`QueueFull`, whose ``retry_after``
estimates when a place frees up (the server answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from polybridge.errors import PolyBridgeError


@dataclass(frozen=True)
class GenerateJob:
    """What one request asks for: ``n`` images of ``prompt``, image ``i`` seeded with ``seed + i``."""

    prompt: str
    language: str | None = None  # None: the router decides
    negative_prompt: str = ""
    english_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    size: int | None = None  # None: the backbone's size
    n: int = 1
    lora: str | None = None  # the LoRA plugin its rows run (each row of a call may run another)

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with the same key can run in one pipeline call (languages and LoRAs may differ row by row)."""
        return (self.steps, self.guidance, self.size)


@dataclass
class GenerateResult:
    """The PNG bytes of each image, the language label of the prompt, and how the job ran."""

    images: list[bytes]
    language: str
    seeds: list[int]
    batch_rows: int  # rows in the pipeline call this job shared
    batch_jobs: int
    run_seconds: float


class QueueFull(PolyBridgeError):
    """The queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class BatcherStopped(PolyBridgeError):
    """The server is shutting down and takes no more jobs."""


@dataclass
class _Pending:
    job: GenerateJob
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.monotonic)


RunBatch = Callable[[Sequence[GenerateJob]], Sequence[GenerateResult]]


class Batcher:
    """Runs ``run_batch(jobs)`` in one worker thread on batches of compatible queued jobs.

    ``on_batch(rows, jobs, seconds)`` is called after each pipeline call (the server's metrics)."""

    def __init__(self, run_batch: RunBatch, *, max_batch: int = 16, max_wait_ms: float = 50.0, max_queue: int = 256,
                 on_batch: Callable[[int, int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise PolyBridgeError(f"max_batch and max_queue must be at least 1 and max_wait_ms at least 0, got "
                                  f"{max_batch}, {max_queue}, {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._seconds_per_batch = 0.0  # running mean, for Retry-After
        self.running = 0  # jobs in the call now running

    # ------------------------------------------------------------------ the event loop's side

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="polybridge-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Take no more jobs, cancel the queued ones, let the running call finish."""
        with self._cond:
            self._stopped = True
            for pending in self._queue:
                pending.future.cancel()
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by a batch or more."""
        batches = self.depth / self.max_batch + 1
        return max(1, math.ceil(self._seconds_per_batch * batches))

    def submit(self, job: GenerateJob) -> concurrent.futures.Future:
        """Queue ``job``; its future gives a :class:`GenerateResult` or raises what running it raised."""
        with self._cond:
            if self._stopped:
                raise BatcherStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later",
                                self.retry_after())
            pending = _Pending(job, concurrent.futures.Future())
            self._queue.append(pending)
            self._cond.notify_all()
        return pending.future

    # ------------------------------------------------------------------ the worker's side

    def _take(self) -> list[_Pending] | None:
        """The next batch: the oldest job and those that can share its call, once the batch is full or the oldest
        job has waited ``max_wait``; None once stopped."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].future.cancelled():
                    self._queue.popleft()
                if self._stopped:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                picked, rows = [], 0
                for pending in self._queue:
                    if pending.future.cancelled() or pending.job.key != head.job.key:
                        continue
                    if picked and rows + pending.job.n > self.max_batch:
                        break
                    picked.append(pending)
                    rows += pending.job.n
                wait = head.enqueued + self.max_wait - time.monotonic()
                if rows >= self.max_batch or wait <= 0:
                    chosen = set(map(id, picked))
                    self._queue = collections.deque(p for p in self._queue if id(p) not in chosen)
                    return picked
                self._cond.wait(wait)

    def _loop(self) -> None:
        while True:
            picked = self._take()
            if picked is None:
                return
            # a job cancelled (its client gone) before this point is dropped; after it, it runs
            batch = [p for p in picked if p.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.running = len(batch)
            started = time.monotonic()
            try:
                self._run(batch)
            finally:
                seconds = time.monotonic() - started
                self.running = 0
                self._seconds_per_batch = seconds if not self._seconds_per_batch else \
                    0.8 * self._seconds_per_batch + 0.2 * seconds
                if self.on_batch is not None:
                    self.on_batch(sum(p.job.n for p in batch), len(batch), seconds)

    def _run(self, batch: list[_Pending]) -> None:
        """One call for the batch; if it fails, each job alone, so that one bad job fails alone."""
        try:
            results = self.run_batch([p.job for p in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for pending in batch:
                try:
                    pending.future.set_result(self.run_batch([pending.job])[0])
                except BaseException as single:  # noqa: BLE001
                    pending.future.set_exception(single)
            return
        for pending, result in zip(batch, results):
            pending.future.set_result(result)
