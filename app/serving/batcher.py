"""Dynamic batching of concurrent forwards (Triton-style): one forward for several requests.

Request threads call `MicroBatcher.__call__` with their preprocessed batch (usually one image);
one batcher thread takes everything queued (up to `max_batch` images), waits at most
`max_wait_s` for more while the batch is not full, runs `forward` once on the concatenation and
hands each caller its rows through a `Future`. A lone request therefore waits for nobody when
`max_wait_s` is 0: it is batched only with requests that arrived while the previous forward ran.

When it pays: where one forward of B images costs much less than B forwards (a GPU, a wide
CPU). On this project's 2-core CPU with ONNX Runtime it does not: a covidnet batch of 8 took
longer than 8 single forwards (docs/BENCHMARKS.md), and two request threads already run two
single forwards at once. So it is off by default (`CXR_PREDICT_BATCH_MAX=1`).

The thread starts on the first submission and ends after `idle_exit_s` without work, so a
replaced model leaves no thread behind. `stats()` counts batches and images (batches > 1 show
that batching happens).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BatcherStats", "MicroBatcher"]


@dataclass(frozen=True)
class BatcherStats:
    batches: int
    images: int
    largest_batch: int
    multi_request_batches: int


class MicroBatcher:
    """Collects concurrent `forward` calls into one (see the module docstring). Thread-safe."""

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 8,
        max_wait_s: float = 0.0,
        idle_exit_s: float = 5.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.idle_exit_s = idle_exit_s
        self._queue: queue.Queue[tuple[np.ndarray, Future[np.ndarray]]] = queue.Queue()
        self._lock = threading.Lock()
        self._running = False
        self._batches = 0
        self._images = 0
        self._largest = 0
        self._multi = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """`forward(batch)`, possibly computed together with other callers' inputs."""
        return self.submit(batch).result()

    def submit(self, batch: np.ndarray) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        self._queue.put((np.asarray(batch), future))
        with self._lock:
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name="cxr-batcher", daemon=True).start()
        return future

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(self._batches, self._images, self._largest, self._multi)

    def _take(self) -> list[tuple[np.ndarray, Future[np.ndarray]]] | None:
        """The next batch of requests, or None when idle for `idle_exit_s` (thread ends)."""
        try:
            first = self._queue.get(timeout=self.idle_exit_s)
        except queue.Empty:
            with self._lock:
                if self._queue.empty():
                    self._running = False
                    return None
            first = self._queue.get()
        items = [first]
        size = len(first[0])
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            items.append(item)
            size += len(item[0])
        return items

    def _loop(self) -> None:
        while (items := self._take()) is not None:
            inputs = [x for x, _ in items]
            try:
                out = self.forward(inputs[0] if len(inputs) == 1 else np.concatenate(inputs))
            except BaseException as exc:  # every waiting caller gets the error
                for _, future in items:
                    future.set_exception(exc)
                continue
            with self._lock:
                self._batches += 1
                self._images += len(out)
                self._largest = max(self._largest, len(out))
                self._multi += len(items) > 1
            start = 0
            for x, future in items:
                future.set_result(out[start : start + len(x)])
                start += len(x)
