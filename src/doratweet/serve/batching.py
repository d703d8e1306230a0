"""Dynamic batching: requests that arrive close together share one forward pass.

A forward pass over 32 tweets costs little more than over one (the model is small; the cost is in the
per-call overhead and in matrix shapes too thin to use the hardware), so under load it pays to wait a few
milliseconds and gather. Requests wait in a bounded queue; one asyncio task takes the first waiting request,
then keeps taking more until the batch holds `max_batch` texts or `max_wait_ms` have passed, and runs
`predict_proba` in a single worker thread, so the event loop keeps accepting requests meanwhile and only one
forward pass runs at a time (a second would only compete for the same cores).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    """More requests are waiting than the queue holds; the client should retry later (HTTP 503)."""


@dataclass
class _Request:
    texts: list[str]
    done: asyncio.Future = field(repr=False)


@dataclass
class BatcherStats:
    forward_passes: int = 0
    texts: int = 0
    requests: int = 0
    largest_batch: int = 0


class DynamicBatcher:
    """`await batcher.classify(texts)` -> one probability dict per text, computed together with other requests."""

    def __init__(self, predict_proba: Callable[[list[str]], list[dict]], *, max_batch: int = 32,
                 max_wait_ms: float = 10.0, queue_size: int = 1024):
        assert max_batch >= 1 and max_wait_ms >= 0 and queue_size >= 1
        self.predict_proba = predict_proba
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Request] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._getter: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None

    def _start(self) -> None:
        # Created on first use inside the running event loop, because asyncio queues and tasks belong to one
        # loop; a new loop (a test client per asyncio.run, a restarted server) gets its own.
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._getter = None
        if self._thread is None:  # first use, or the first after `close` (a server whose lifespan restarts)
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="doratweet-forward")
        self._task = self._loop.create_task(self._run())

    async def classify(self, texts: list[str]) -> list[dict]:
        if not texts:
            return []
        if self._task is None or self._loop is not asyncio.get_running_loop():
            self._start()
        request = _Request(list(texts), asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFull from None
        return await request.done

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carried: _Request | None = None  # a request that did not fit the previous batch goes first in the next
        while True:
            batch = [carried or await self._next_request(timeout=None)]
            carried = None
            size = len(batch[0].texts)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                request = await self._next_request(timeout=deadline - time.monotonic())
                if request is None:
                    break
                if size + len(request.texts) > self.max_batch:
                    carried = request  # requests are never split: its texts are answered from one pass
                    break
                batch.append(request)
                size += len(request.texts)
            await self._forward(loop, batch)

    async def _next_request(self, timeout: float | None) -> _Request | None:
        """The next waiting request, or None after `timeout` seconds. The pending `get` is kept, never
        cancelled, between calls: cancelling a `get` that has just taken a request would lose that request."""
        if self._getter is None:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if timeout is not None and timeout <= 0:
                    return None
                self._getter = asyncio.get_running_loop().create_task(self._queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=None if timeout is None else max(timeout, 0))
        if not done:
            return None
        request, self._getter = self._getter.result(), None
        return request

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        texts = [text for request in batch for text in request.texts]
        try:
            probabilities = await loop.run_in_executor(self._thread, self.predict_proba, texts)
        except Exception as error:  # the model failed: every request in the batch gets the error, the loop goes on
            for request in batch:
                if not request.done.done():
                    request.done.set_exception(error)
            return
        self.stats.forward_passes += 1
        self.stats.texts += len(texts)
        self.stats.requests += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
        start = 0
        for request in batch:
            if not request.done.done():  # the client may have gone away
                request.done.set_result(probabilities[start:start + len(request.texts)])
            start += len(request.texts)
