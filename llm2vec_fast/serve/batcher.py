"""Token-budget dynamic batching: one asyncio loop merges the texts of concurrent requests into
batches of at most ``max_batch_tokens`` real tokens and feeds them, one at a time, to a single
model worker thread.

* Requests are served first come, first served; a request larger than the budget is split over
  several batches, and its embeddings are put back together in input order.
* While the worker runs a batch, new requests queue up, so the next batch is as large as the load
  allows: no waiting when idle.
* Regrouping: after a batch, the clients just answered are given a moment (``regroup_s``, and at
  most a quarter of that batch's time) to send their next request before the next batch starts, so
  concurrent clients stay in one batch. Without it, a steady load splits into cohorts that take
  turns (32 clients settled into two alternating batches of 16), and small CPU batches run the
  GEMMs well below their speed (packed batches of 16 texts took 1.2x the time of 32 per text).
  The wait ends as soon as as many requests are queued as were just answered, so a single client
  never waits.
* The queue is bounded (``max_queue_tokens``): :meth:`Batcher.submit` raises :class:`QueueFull`
  rather than let memory grow.
* A request whose client went away is taken out of the queue (:meth:`Batcher.cancel`); texts of it
  already in the running batch are computed and dropped.
* An exception in the model fails the requests of that batch only; the loop goes on.

The worker calls the encoder's own ``embed_items`` (``EncodeMixin``): a bidirectional ``LLM2Vec``
runs the batch as one padding-free packed forward, on CUDA and on CPU (``create_app`` sets its
``packed`` and its ``max_tokens_per_batch`` to the budget), so the arrival order of the texts costs
no padding; ONNX Runtime and causal models run length-sorted padded batches of ``batch_size`` texts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..prompting import EncodingInput
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60
DEFAULT_REGROUP_MS = 50.0  # longest regrouping wait by default (the server option --regroup-ms)
REGROUP_FRACTION = 0.25  # regrouping waits at most this share of the last batch's time


class QueueFull(Exception):
    """The queue holds too many tokens to take this request now; retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class BatcherStopped(Exception):
    """The batcher is shut down and takes no new work."""


@dataclass(eq=False)
class Job:
    """One client request in the queue: its tokenised texts and where their embeddings go."""

    items: list[EncodingInput]
    future: asyncio.Future
    out: torch.Tensor
    taken: int = 0  # texts already put into a batch
    finished: int = 0  # texts embedded
    queued_tokens: int = field(default=0)

    @property
    def active(self) -> bool:
        return not self.future.done()


def _tokens(items: Sequence[EncodingInput]) -> int:
    return sum(len(x.input_ids) for x in items)


class Batcher:
    """Dynamic batching in front of one model worker.

    Args:
        embed: ``items -> float32 [N, hidden]`` CPU tensor in input order (runs in the worker thread),
            normally ``encoder.embed_items``.
        hidden_size: embedding width.
        max_batch_tokens: real tokens per model batch (a single text longer than this still runs,
            alone).
        max_queue_tokens: tokens waiting in the queue at most; :meth:`submit` beyond it raises
            :class:`QueueFull`.
        metrics: where batch sizes, queue depth and throughput are recorded.
        regroup_s: longest wait, after a batch, for the clients just answered to come back (0: none).
    """

    def __init__(
        self,
        embed: Callable[[list[EncodingInput]], torch.Tensor],
        hidden_size: int,
        max_batch_tokens: int,
        max_queue_tokens: int,
        metrics: ServerMetrics | None = None,
        regroup_s: float = DEFAULT_REGROUP_MS / 1000,
    ):
        if max_batch_tokens < 1 or max_queue_tokens < 1:
            raise ValueError("max_batch_tokens and max_queue_tokens must be positive")
        if not regroup_s >= 0:
            raise ValueError(f"regroup_s must be >= 0, got {regroup_s!r}")
        self.regroup_s = float(regroup_s)
        self._embed = embed
        self.hidden_size = int(hidden_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue_tokens = int(max_queue_tokens)
        self.metrics = metrics or ServerMetrics()
        self._queue: deque[Job] = deque()
        self.queued_tokens = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._stopped = False
        self._running: list[Job] = []  # jobs with texts in the batch the worker is running

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm2vec-model")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="llm2vec-batcher")

    async def stop(self) -> None:
        """Fail what is still queued, stop the loop and the worker (after its current batch)."""
        self._stopped = True
        for job in list(self._queue) + self._running:
            self._fail(job, BatcherStopped("the server is shutting down"))
        self._set_queue_gauges()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    # ------------------------------------------------------------------ clients
    def submit(self, items: list[EncodingInput]) -> Job:
        """Queue ``items``; ``await job.future`` gives their ``[N, hidden]`` embeddings in order."""
        if self._stopped or self._task is None:
            raise BatcherStopped("the server is shutting down")
        if not items:
            raise ValueError("nothing to embed")
        tokens = _tokens(items)
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFull(
                f"the queue is full ({self.queued_tokens} of {self.max_queue_tokens} tokens waiting); retry later",
                self.retry_after(),
            )
        job = Job(list(items), asyncio.get_running_loop().create_future(), torch.empty(len(items), self.hidden_size))
        job.queued_tokens = tokens
        self._queue.append(job)
        self.queued_tokens += tokens
        self._set_queue_gauges()
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job's texts that are not yet in a batch."""
        if job.active:
            job.future.cancel()
        self._dequeue(job)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the recent throughput (1..60)."""
        rate = self.metrics.throughput()
        if rate <= 0:
            return 1
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.queued_tokens / rate))))

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ loop
    def _dequeue(self, job: Job) -> None:
        try:
            self._queue.remove(job)
        except ValueError:
            return
        self.queued_tokens -= job.queued_tokens
        job.queued_tokens = 0
        self._set_queue_gauges()

    def _set_queue_gauges(self) -> None:
        self.metrics.queue_requests.set(len(self._queue))
        self.metrics.queue_tokens.set(self.queued_tokens)

    def _next_batch(self) -> list[tuple[Job, int, int]]:
        """Take texts from the head of the queue up to the token budget: ``(job, start, stop)`` slices."""
        parts: list[tuple[Job, int, int]] = []
        used = 0
        while self._queue:
            job = self._queue[0]
            start = stop = job.taken
            while stop < len(job.items):
                n = len(job.items[stop].input_ids)
                if used and used + n > self.max_batch_tokens:
                    break
                used += n
                stop += 1
            if stop > start:
                parts.append((job, start, stop))
                taken_tokens = _tokens(job.items[start:stop])
                job.taken = stop
                job.queued_tokens -= taken_tokens
                self.queued_tokens -= taken_tokens
            if job.taken < len(job.items):
                break  # budget spent inside this job
            self._queue.popleft()
        self._set_queue_gauges()
        return parts

    async def _regroup(self, answered: int, last_batch_s: float) -> None:
        """Wait (bounded) until the ``answered`` clients of the last batch have queued their next
        request on top of what is already queued, or the queue fills a batch."""
        limit = min(self.regroup_s, REGROUP_FRACTION * last_batch_s)
        if answered < 2 or limit <= 0:
            return
        target = len(self._queue) + answered
        deadline = time.perf_counter() + limit
        while len(self._queue) < target and self.queued_tokens < self.max_batch_tokens:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        answered, last_batch_s = 0, 0.0
        while True:
            await self._regroup(answered, last_batch_s)
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            parts = self._next_batch()
            if not parts:
                continue
            items = [x for job, a, b in parts for x in job.items[a:b]]
            started = time.perf_counter()
            self._running = [job for job, _, _ in parts]
            try:
                emb = await loop.run_in_executor(self._worker, self._embed, items)
                if tuple(emb.shape) != (len(items), self.hidden_size):
                    raise RuntimeError(f"the model returned shape {tuple(emb.shape)} for {len(items)} texts")
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the model failed: only this batch's requests fail
                logger.exception("model error in a batch of %d texts from %d requests", len(items), len(parts))
                self.metrics.batch_failures.inc()
                for job, _, _ in parts:
                    self._fail(job, err)
                answered = 0
                continue
            finally:
                self._running = []
            last_batch_s = time.perf_counter() - started
            self.metrics.observe_batch(len(items), _tokens(items), len({id(p[0]) for p in parts}), last_batch_s)
            answered, offset = 0, 0
            for job, a, b in parts:
                n = b - a
                if job.active:
                    job.out[a:b] = emb[offset : offset + n]
                    job.finished += n
                    if job.finished == len(job.items):
                        job.future.set_result(job.out)
                        answered += 1
                offset += n

    def _fail(self, job: Job, err: BaseException) -> None:
        self._dequeue(job)
        if job.active:
            job.future.set_exception(err)
