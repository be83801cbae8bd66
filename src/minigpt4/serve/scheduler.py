"""Dynamic batching: one worker thread owns the model and runs queued requests in batches.

The model is not thread-safe and one forward over B rows costs far less than B forwards, so every
request becomes a `Job` in a bounded queue. The worker takes the oldest job, waits at most
`max_wait_s` (counted from that job's arrival) for compatible jobs — the same generation
settings, since one `generate` call shares them, except `max_new_tokens` and stop strings, which
each row has its own of — and runs up to `max_batch_size` rows at once.
Streamed jobs are batched the same way (with each other and with plain jobs): every batch runs through
the batched streamer, which hands every row its text as it is generated and each job its answer at the
step its last row ends, so a short answer does not wait for the batch's longest one. A full
queue refuses new jobs (`QueueFull`), which the API answers 429 with Retry-After. A cancelled job
(client gone) leaves the queue at once; in a running batch, streamed or not, its rows stop at the
next token while the others go on. If a batch fails, its jobs are rerun one by one (those that have
not been answered or streamed text yet), so one bad request cannot fail the others.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from minigpt4.chat.generation import GenerationSettings

log = logging.getLogger(__name__)

# stream_fn(prompts, images, settings per row, on_delta(row, text), cancelled events per row,
# on_row_done(row, completion)) -> per row a completion, or None for a row whose event was set; hands each row
# its text as it is generated and its completion at the step it ends (`minigpt4.chat.generation.stream_batch`).
StreamFn = Callable[
    [list[str], list[list[Any]], list[GenerationSettings], Callable[[int, str], None], list[threading.Event],
     Callable[[int, Any], None]],
    list[Any],
]


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class SchedulerClosed(Exception):
    """The server is shutting down (or its worker died) and takes no more work."""


@dataclass(eq=False)
class Job:
    """One request: `n` rows of the same prompt and images.

    The worker reports through the callbacks, from its own thread: `on_done(result, error)` once (`settle`)
    (result: a list of n completions; for a stream its one completion; None with `SchedulerClosed`
    when the client left), and for streams `on_delta(text)` per piece of text.
    """

    prompt: str
    images: list[Any]
    settings: GenerationSettings
    on_done: Callable[[Any, BaseException | None], None]
    n: int = 1
    on_delta: Callable[[str], None] | None = None
    alone: bool = False  # run in a batch of its own (seeded sampling must not depend on neighbours)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    settled: bool = field(default=False, init=False)

    def settle(self, result: Any, error: BaseException | None) -> None:
        """Call `on_done` unless it was called already (a job answered early stays answered if its batch fails)."""
        if not self.settled:
            self.settled = True
            self.on_done(result, error)

    @property
    def stream(self) -> bool:
        return self.on_delta is not None

    def batchable_with(self, other: Job) -> bool:
        return not (self.alone or other.alone) and self.settings.shared() == other.settings.shared()


class BatchScheduler:
    """Runs jobs on one worker thread, batching compatible ones; see the module docstring."""

    def __init__(
        self,
        stream_fn: StreamFn,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        max_queue: int = 64,
    ):
        self._stream = stream_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0  # rows in the model right now
        self._seconds_per_batch = 1.0  # running average, for Retry-After
        self._thread = threading.Thread(target=self._work, name="minigpt4-batcher", daemon=True)
        self.batches_run = 0
        self.rows_run = 0
        self.cancelled = 0  # jobs dropped from the queue or streams stopped because the client left

    # ---------------------------------------------------------------- client side

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new work, fail what is queued, and wait for the running batch to finish."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.settle(None, SchedulerClosed("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def healthy(self) -> bool:
        """Open, and the worker is alive (or not started yet: jobs may queue before `start`)."""
        return not self._closed and (self._thread.ident is None or self._thread.is_alive())

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._queue), "running": self._running, "max_queue": self.max_queue,
                    "batches": self.batches_run, "rows": self.rows_run, "cancelled": self.cancelled}

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull / SchedulerClosed at once."""
        if job.n > self.max_batch_size:
            raise ValueError(f"a job of {job.n} rows cannot fit max_batch_size={self.max_batch_size}")
        with self._cond:
            if not self.healthy:
                raise SchedulerClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                batches_ahead = math.ceil(len(self._queue) / self.max_batch_size)
                raise QueueFull(max(1, math.ceil(batches_ahead * self._seconds_per_batch)))
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it still waits; in a running batch its rows stop at the next token."""
        job.cancelled.set()
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # already running or done
            self.cancelled += 1
        job.settle(None, SchedulerClosed("cancelled"))

    # ---------------------------------------------------------------- worker side

    def _next_batch(self) -> list[Job] | None:
        """Block until there is work; return the oldest job plus compatible ones (None: closed)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._queue.popleft()
            batch, rows = [first], first.n
            deadline = first.enqueued + self.max_wait_s
            while not first.alone:
                for job in list(self._queue):
                    if rows + job.n <= self.max_batch_size and job.batchable_with(first):
                        self._queue.remove(job)
                        batch.append(job)
                        rows += job.n
                remaining = deadline - time.monotonic()
                if rows >= self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._running = rows
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            start = time.monotonic()
            try:
                self._run_batch(batch)
            except Exception as err:  # the worker must outlive any request
                log.exception("batch of %d jobs failed", len(batch))
                for job in batch:
                    job.settle(None, err)
            finally:
                elapsed = time.monotonic() - start
                with self._cond:
                    self._running = 0
                    self.batches_run += 1
                    self.rows_run += sum(job.n for job in batch)
                    self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed

    def _generate_rows(self, jobs: list[Job], streamed: set[Job]) -> list[Any]:
        """One model call for `jobs`; each job is settled as soon as its last row ends, and jobs that were
        handed text are added to `streamed`."""
        owners = [job for job in jobs for _ in range(job.n)]  # the job of each row
        first_row = {}
        for row, job in enumerate(owners):
            first_row.setdefault(job, row)
        answers: dict[Job, list[Any]] = {job: [] for job in jobs}

        def on_delta(row: int, text: str) -> None:
            job = owners[row]
            if job.on_delta is not None:  # plain jobs get their answer when their rows end
                streamed.add(job)
                job.on_delta(text)

        def on_row_done(row: int, completion: Any) -> None:
            job = owners[row]
            answers[job].append((row - first_row[job], completion))
            if len(answers[job]) == job.n and not job.cancelled.is_set():
                rows = [completion for _, completion in sorted(answers[job], key=lambda pair: pair[0])]
                job.settle(rows[0] if job.stream else rows, None)

        completions = self._stream([job.prompt for job in owners], [job.images for job in owners],
                                   [job.settings for job in owners], on_delta, [job.cancelled for job in owners],
                                   on_row_done)
        if len(completions) != len(owners):
            raise RuntimeError(f"generate returned {len(completions)} completions for {len(owners)} prompts")
        return completions

    def _run_batch(self, batch: list[Job]) -> None:
        streamed: set[Job] = set()
        try:
            completions = self._generate_rows(batch, streamed)
        except Exception as err:
            if len(batch) == 1:
                raise
            log.exception("a batch of %d jobs failed; running them one by one", len(batch))
            for job in batch:
                if job.settled:  # answered before the failure
                    continue
                if job in streamed:  # its client already has part of an answer: a rerun would repeat it
                    job.settle(None, err)
                    continue
                try:
                    self._deliver([job], self._generate_rows([job], streamed))
                except Exception as job_err:
                    job.settle(None, job_err)
            return
        self._deliver(batch, completions)

    def _deliver(self, batch: list[Job], completions: list[Any]) -> None:
        """Settle the jobs not answered during the call: cut short (client gone), or never ended early."""
        start = 0
        for job in batch:
            rows = completions[start:start + job.n]
            start += job.n
            if job.settled:
                continue
            if any(row is None for row in rows):  # cut short: the client left mid-answer
                with self._cond:
                    self.cancelled += 1
                job.settle(None, SchedulerClosed("cancelled"))
            else:
                job.settle(rows[0] if job.stream else rows, None)
