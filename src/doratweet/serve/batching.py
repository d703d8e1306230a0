"""Dynamic batching: requests that arrive close together share one forward pass.

A forward pass over 32 tweets costs little more than over one (the model is small; the cost is in the
per-call overhead and in matrix shapes too thin to use the hardware), so under load it pays to wait a few
milliseconds and gather. Requests wait in a bounded queue; one asyncio task takes the first waiting request,
then keeps taking more until the batch holds `max_batch` texts or `max_wait_ms` have passed, and runs
`predict_proba` in a single worker thread, so the event loop keeps accepting requests meanwhile and only one
forward pass runs at a time (a second would only compete for the same cores).

`drain` is the way out: new requests are refused (`ShuttingDown`, HTTP 503), the gathering wait ends, what is
queued is answered, and whatever is still unanswered at the deadline is refused too.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    """More requests are waiting than the queue holds; the client should retry later (HTTP 503)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more requests, or could not answer this one before its deadline
    (HTTP 503: another instance, or this one restarted, can answer it)."""


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
    refused_at_shutdown: int = 0


class DynamicBatcher:
    """`await batcher.classify(texts)` -> one probability dict per text, computed together with other requests."""

    def __init__(self, predict_proba: Callable[[list[str]], list[dict]], *, max_batch: int = 32,
                 max_wait_ms: float = 10.0, queue_size: int = 1024):
        for name, value, lowest in (("max_batch", max_batch, 1), ("max_wait_ms", max_wait_ms, 0),
                                    ("queue_size", queue_size, 1)):
            if not (math.isfinite(value) and value >= lowest):  # inf would hold every request forever
                raise ValueError(f"{name} must be a finite number >= {lowest}, got {value}")
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
        self._pending: set[asyncio.Future] = set()  # the answers owed, for `drain`
        self._closing: asyncio.Event | None = None
        self._closing_wait: asyncio.Task | None = None

    def _start(self) -> None:
        # Created on first use inside the running event loop, because asyncio queues and tasks belong to one
        # loop; a new loop (a test client per asyncio.run, a restarted server) gets its own.
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._getter = None
        self._closing = asyncio.Event()
        self._closing_wait = self._loop.create_task(self._closing.wait())
        if self._thread is None:  # first use, or the first after `close` (a server whose lifespan restarts)
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="doratweet-forward")
        self._task = self._loop.create_task(self._run())

    async def classify(self, texts: list[str]) -> list[dict]:
        if not texts:
            return []
        if self._task is None or self._loop is not asyncio.get_running_loop():
            self._start()
        if self._closing.is_set():
            raise ShuttingDown
        request = _Request(list(texts), asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFull from None
        self._pending.add(request.done)
        request.done.add_done_callback(self._pending.discard)
        return await request.done

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, answer the waiting ones without waiting for company, and after `timeout`
        seconds refuse (ShuttingDown) those still unanswered: a slow forward pass cannot hold the exit."""
        if self._task is None or self._loop is not asyncio.get_running_loop():
            return  # never started on this loop: nothing is waiting
        self._closing.set()
        owed = set(self._pending)
        if owed:
            await asyncio.wait(owed, timeout=timeout)
        for answer in owed:
            if not answer.done():
                answer.set_exception(ShuttingDown())
                self.stats.refused_at_shutdown += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for waiter in (self._getter, self._closing_wait):
            if waiter is not None:
                waiter.cancel()
        self._getter = self._closing_wait = None
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
        """The next waiting request, or None after `timeout` seconds (at once while draining: what is queued
        goes without waiting for company). The pending `get` is kept, never cancelled, between calls:
        cancelling a `get` that has just taken a request would lose that request."""
        if timeout is not None and self._closing.is_set():
            timeout = 0
        if self._getter is None:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if timeout is not None and timeout <= 0:
                    return None
                self._getter = asyncio.get_running_loop().create_task(self._queue.get())
        if timeout is None:
            await asyncio.wait({self._getter})
        else:
            await asyncio.wait({self._getter, self._closing_wait}, timeout=max(timeout, 0),
                               return_when=asyncio.FIRST_COMPLETED)
        if not self._getter.done():
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
