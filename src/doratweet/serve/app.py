"""The HTTP API and the two pages, as a FastAPI app built around one loaded `SentimentClassifier`.

Routes:
- `POST /v1/classify` `{"texts": [...]}` -> `{"results": [{"label", "probabilities"}, ...]}`, in order;
- `GET /v1/model`: base model, adapter, the run's metrics and plot names;
- `GET /health`: liveness, never behind the API key (load balancers cannot send one);
- `GET /` (classify page), `GET /report` (metrics and plots page), `GET /report/plots/NAME.png`;
- `GET /docs`, `GET /openapi.json`: FastAPI's generated API documentation.

With an API key, every route that touches the model or the run's files (`/v1/*`, `/report/plots/*`) needs
`Authorization: Bearer KEY` or `X-API-Key: KEY`. The two pages themselves are static HTML with no data in
them (a browser cannot send a header when following a link); their JavaScript sends the key typed into them.
"""

from __future__ import annotations

import hmac
import re
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from .. import LABELS, __version__
from ..report import ADAPTER_DIR, METRICS_FILE, PLOTS_DIR, README_FILE, STAGES, result
from .batching import DynamicBatcher, QueueFull

STATIC_DIR = Path(__file__).parent / "static"
PLOT_NAME = re.compile(r"[A-Za-z0-9_-]+\.png")  # no separators, no dots but the suffix: no way out of plots/
RETRY_AFTER_SECONDS = 1
METRIC_NAMES = ("macro_f1", "macro_recall", "accuracy", "macro_f1_4class", "unparsed", "n")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="tweets to label; an empty list gives an empty result",
                                   examples=[["I love this phone", "worst service ever"]])


class Prediction(BaseModel):
    label: str = Field(description="the most probable of negative, neutral, positive")
    probabilities: dict[str, float] = Field(description="softmax over the three labels' answer likelihoods")


class ClassifyResponse(BaseModel):
    results: list[Prediction]


def create_app(
    classifier,
    *,
    run_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 10.0,
    max_texts: int = 256,
    max_chars: int = 1000,
    queue_size: int = 1024,
    api_key: str | None = None,
) -> FastAPI:
    """A FastAPI app serving `classifier` (anything with `predict_proba(texts)` and `base_model_id`).

    `run_dir` is the run folder the adapter came from, for `/v1/model` and `/report`; None when serving a
    bare adapter folder. Limits: at most `max_texts` texts of at most `max_chars` characters per request
    (HTTP 413 beyond), at most `queue_size` requests waiting for the model (HTTP 503 beyond).
    """
    batcher = DynamicBatcher(classifier.predict_proba, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             queue_size=queue_size)
    run_dir = Path(run_dir) if run_dir else None
    adapter_dir = Path(adapter_dir) if adapter_dir else (run_dir / ADAPTER_DIR if run_dir else None)
    # A generous bound on a valid body (every text at its longest, 4 bytes per character, JSON escaping),
    # checked before the body is parsed so a huge upload is refused without being read into memory.
    max_body_bytes = max_texts * (max_chars * 12 + 8) + 1024

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="doratweet", version=__version__, lifespan=lifespan,
                  description="Tweet sentiment (negative / neutral / positive) with a DoRA-tuned chat model.")
    app.state.batcher = batcher
    app.state.limits = {"max_texts": max_texts, "max_chars": max_chars, "max_batch": max_batch,
                        "max_wait_ms": max_wait_ms, "queue_size": queue_size}

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        bearer = request.headers.get("authorization", "")
        given = bearer[7:].strip() if bearer[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def refuse_oversized_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            return JSONResponse({"detail": f"request body over {max_body_bytes} bytes; send at most {max_texts} "
                                 f"texts of at most {max_chars} characters"}, status_code=413)
        return await call_next(request)

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=[Depends(require_key)],
              responses={401: {"description": "API key missing or wrong"},
                         413: {"description": "too many texts, or a text too long"},
                         422: {"description": "malformed JSON, or not {\"texts\": [string, ...]}"},
                         503: {"description": "queue full; retry after the Retry-After header's seconds"}})
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        """Label each text; results come in the order of `texts`."""
        if len(body.texts) > max_texts:
            raise HTTPException(413, f"{len(body.texts)} texts; send at most {max_texts} per request")
        for index, text in enumerate(body.texts):
            if len(text) > max_chars:
                raise HTTPException(413, f"texts[{index}] has {len(text)} characters; the limit is {max_chars}")
        try:
            probabilities = await batcher.classify(body.texts)
        except QueueFull:
            raise HTTPException(503, "server busy: too many requests waiting; retry shortly",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return ClassifyResponse(results=[Prediction(label=max(p, key=p.get), probabilities=p) for p in probabilities])

    @app.get("/v1/model", dependencies=[Depends(require_key)])
    async def model_info() -> dict:
        """The base model, the adapter, the serving limits and, for a run folder, its test metrics."""
        return {"base_model_id": classifier.base_model_id, "adapter": str(adapter_dir) if adapter_dir else None,
                "run_dir": str(run_dir) if run_dir else None, "labels": list(LABELS), "limits": app.state.limits,
                "model_card": bool(run_dir and (run_dir / README_FILE).is_file()),
                **run_summary(run_dir), "plots": plot_names(run_dir)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/report/plots/{name}", dependencies=[Depends(require_key)])
    async def plot(name: str) -> FileResponse:
        # Only names listed in plots/ are served: the name is matched, never joined into a path unchecked.
        if not PLOT_NAME.fullmatch(name) or name not in plot_names(run_dir):
            raise HTTPException(404, f"no plot {name!r}")
        return FileResponse(run_dir / PLOTS_DIR / name, media_type="image/png")

    @app.get("/", include_in_schema=False)
    async def classify_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/report", include_in_schema=False)
    async def report_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "report.html")

    @app.get("/ui/config", include_in_schema=False)
    async def page_config() -> dict:
        """What the pages need before they have a key: whether to show the key field."""
        return {"api_key_required": api_key is not None, "max_texts": max_texts, "max_chars": max_chars}

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def plot_names(run_dir: Path | None) -> list[str]:
    folder = run_dir / PLOTS_DIR if run_dir else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and PLOT_NAME.fullmatch(p.name))


def run_summary(run_dir: Path | None) -> dict:
    """The test-split metrics of metrics.json, before and after training, per mode; empty without a run.
    A missing or broken metrics.json leaves the page without a table instead of failing the server."""
    import json

    path = run_dir / METRICS_FILE if run_dir else None
    if path is None or not path.is_file():
        return {"metrics": None}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"metrics": None}
    rows = []
    for stage in STAGES:
        for mode in ("score", "generate"):
            block = result(metrics, stage, mode)
            if block:
                rows.append({"stage": stage, "mode": mode, **{k: block.get(k) for k in METRIC_NAMES},
                             "per_class_f1": {k: v.get("f1") for k, v in (block.get("per_class") or {}).items()},
                             "confusion": block.get("confusion"), "confusion_columns": block.get("confusion_columns")})
    training = metrics.get("training") or {}
    return {"metrics": {"test": rows, "data": metrics.get("data"), "preset": metrics.get("preset"),
                        "training": {k: training.get(k) for k in ("method", "rank", "alpha", "targets", "steps",
                                                                  "lr", "seconds", "device") if k in training}}}
