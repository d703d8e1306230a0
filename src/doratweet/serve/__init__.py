"""`doratweet serve`: an HTTP API with dynamic batching, a page to try it and a page with the run's report.

`create_app` (app.py) builds the FastAPI app around a loaded classifier; `DynamicBatcher` (batching.py)
gathers concurrent requests into one forward pass; `run_server` loads a run or adapter and runs uvicorn.
"""

from __future__ import annotations

import logging

from .app import create_app
from .batching import DynamicBatcher, QueueFull

__all__ = ["create_app", "run_server", "DynamicBatcher", "QueueFull"]

log = logging.getLogger("doratweet")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def run_server(path: str, *, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               bf16: bool | None = None, api_key: str | None = None, **limits) -> None:
    """Load the adapter at `path` (a run folder or an adapter folder), merged, and serve it until Ctrl-C."""
    import uvicorn

    from ..predict import SentimentClassifier, adapter_folder
    from ..report import ADAPTER_DIR

    adapter = adapter_folder(path)
    run_dir = adapter.parent if adapter.name == ADAPTER_DIR and (adapter.parent / "metrics.json").is_file() else None
    if host not in LOOPBACK_HOSTS and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or DORATWEET_API_KEY)", host)
    classifier = SentimentClassifier.load(path, model=model, bf16=bf16)
    app = create_app(classifier, run_dir=run_dir, adapter_dir=adapter, api_key=api_key, **limits)
    log.info("serving %s on http://%s:%d (API docs at /docs)", adapter, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
