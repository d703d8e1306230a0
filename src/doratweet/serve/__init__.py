"""`doratweet serve`: an HTTP API with dynamic batching, a page to try it and a page with the run's report.

`create_app` (app.py) builds the FastAPI app around a loaded classifier; `DynamicBatcher` (batching.py)
gathers concurrent requests into one forward pass; `run_server` checks the options, binds the port, loads a
run or adapter and runs uvicorn until SIGTERM or Ctrl-C, then drains the queue (see `DrainingServer`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket

import uvicorn

from ..errors import UserError
from .app import create_app
from .batching import DynamicBatcher, QueueFull, ShuttingDown

__all__ = ["create_app", "run_server", "DynamicBatcher", "QueueFull", "ShuttingDown"]

log = logging.getLogger("doratweet")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# A forward pass waiting longer than this for company is a misconfiguration, not batching.
MAX_WAIT_MS_LIMIT = 10_000.0
# docker stop and systemd send SIGKILL 10 s (docker) or 90 s (systemd) after SIGTERM.
MAX_SHUTDOWN_TIMEOUT = 3600.0


def check_options(*, port: int, max_batch: int, max_wait_ms: float, max_texts: int, max_chars: int,
                  queue_size: int, shutdown_timeout: float) -> None:
    """Every numeric option of `serve`, checked before anything is loaded; one line naming the first bad one."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be a TCP port from 1 to 65535")
    for flag, value in (("--max-batch", max_batch), ("--max-texts", max_texts), ("--max-chars", max_chars),
                        ("--queue-size", queue_size)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be 1 or more")
    if not (math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= MAX_WAIT_MS_LIMIT):
        raise UserError(f"--max-wait-ms {max_wait_ms}: must be a number from 0 to {MAX_WAIT_MS_LIMIT:g} "
                        "(milliseconds a forward pass waits for more requests)")
    if not (math.isfinite(shutdown_timeout) and 0 <= shutdown_timeout <= MAX_SHUTDOWN_TIMEOUT):
        raise UserError(f"--shutdown-timeout {shutdown_timeout}: must be a number of seconds from 0 to "
                        f"{MAX_SHUTDOWN_TIMEOUT:g}")


def host_port(host: str, port: int) -> str:
    """`host:port` as a URL writes it: an IPv6 address in brackets (`[::1]:8000`), else `::1:8000` is ambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def served_url(host: str, port: int) -> str:
    return f"http://{host_port(host, port)}"


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, made before the model loads so that a taken port or an unknown host is
    reported at once instead of after a minute of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise UserError(f"--host {host}: not an address this machine can listen on ({error}); "
                        "use 127.0.0.1, 0.0.0.0 or one of its addresses") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart right after a stop
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise UserError(f"--port {port}: cannot listen on {host_port(host, port)} ({error.strerror or error}); "
                        "choose another --port or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def run_server(path: str | None, *, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               bf16: bool | None = None, api_key: str | None = None, shutdown_timeout: float = 5.0,
               max_batch: int = 32, max_wait_ms: float = 10.0, max_texts: int = 256, max_chars: int = 1000,
               queue_size: int = 1024) -> None:
    """Load the adapter at `path` (a run folder or an adapter folder), merged, and serve it until SIGTERM or
    Ctrl-C; then answer or refuse (503) the waiting requests within `shutdown_timeout` seconds and return."""
    limits = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_texts": max_texts, "max_chars": max_chars,
              "queue_size": queue_size}
    check_options(port=port, shutdown_timeout=shutdown_timeout, **limits)
    from ..predict import SentimentClassifier, adapter_folder
    from ..report import load_metrics
    from ..run_folder import ADAPTER_DIR, METRICS_FILE

    adapter = adapter_folder(path)
    run_dir = adapter.parent if adapter.name == ADAPTER_DIR and (adapter.parent / METRICS_FILE).is_file() else None
    sock = listen(host, port)
    try:
        if host not in LOOPBACK_HOSTS and not api_key:
            log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                        "(set --api-key or DORATWEET_API_KEY)", host)
        if run_dir is not None:
            try:
                load_metrics(run_dir)
            except UserError as problem:
                log.warning("%s; /report and /v1/model show no metrics", problem)
        classifier = SentimentClassifier.load(path, model=model, bf16=bf16)
        app = create_app(classifier, run_dir=run_dir, adapter_dir=adapter, api_key=api_key, **limits)
        log.info("serving %s on %s (API docs at /docs)", adapter, served_url(host, port))
        serve_until_stopped(app, sock, shutdown_timeout)
    finally:
        sock.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (on SIGTERM or Ctrl-C) stops accepting connections and waits for the
    open ones. Meanwhile the batcher drains: it refuses new requests, stops waiting for company, answers what is
    queued, and after `drain_timeout` seconds answers the rest 503, so the process exits within the deadline
    even when the model is slow; uvicorn cancels whatever is still open a second later."""

    def __init__(self, config: uvicorn.Config, batcher: DynamicBatcher, drain_timeout: float):
        super().__init__(config)
        self.batcher = batcher
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        draining = asyncio.ensure_future(self.batcher.drain(self.drain_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            await draining
        stats = self.batcher.stats
        log.info("stopped: %d requests answered, %d refused while shutting down", stats.requests,
                 stats.refused_at_shutdown)


def serve_until_stopped(app, sock: socket.socket, shutdown_timeout: float) -> None:
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout + 1)
    DrainingServer(config, app.state.batcher, shutdown_timeout).run(sockets=[sock])
