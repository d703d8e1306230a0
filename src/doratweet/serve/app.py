"""The HTTP API and the two pages, as a FastAPI app built around one loaded `SentimentClassifier`.

Routes:
- `POST /v1/classify` `{"texts": [...]}` -> `{"results": [{"label", "probabilities"}, ...]}`, in order;
- `GET /v1/model`: the base model and adapter by name (never a path), the run's metrics and plot names;
- `GET /health`: liveness, never behind the API key (load balancers cannot send one);
- `GET /` (classify page), `GET /report` (metrics and plots page), `GET /report/plots/NAME.png`;
- `GET /docs`, `GET /openapi.json`: FastAPI's generated API documentation.

With an API key, every route that touches the model or the run's files (`/v1/*`, `/report/plots/*`) needs
`Authorization: Bearer KEY` or `X-API-Key: KEY`. The two pages themselves are static HTML with no data in
them (a browser cannot send a header when following a link); their JavaScript sends the key typed into them.

Every error is `{"detail": "one line"}` with a status the OpenAPI schema declares for that route, and the
schema states the app's real limits (`maxItems`, `maxLength`) and, with a key, its two security schemes:
tests/test_serve_fuzz.py fuzzes the app against its own schema.
"""

from __future__ import annotations

import hmac
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi import Path as UrlPath  # pathlib's Path is the one this module means by Path
from fastapi.responses import FileResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from .. import LABELS, __version__
from ..errors import UserError
from ..report import (
    STAGES,
    file_inside,
    hub_id,
    load_metrics,
    public_data_spec,
    public_name,
    result,
)
from ..run_folder import ADAPTER_DIR, CARD_FILE, METRICS_FILE, PLOTS_DIR, is_png
from ..texts import text_problem
from .batching import DynamicBatcher, QueueFull, ShuttingDown

STATIC_DIR = Path(__file__).parent / "static"
PLOT_NAME = re.compile(r"[A-Za-z0-9_-]+\.png")  # no separators, no dots but the suffix: no way out of plots/
RETRY_AFTER_SECONDS = 1
UTF8_BOM = b"\xef\xbb\xbf"
# The two ways to send the key; the schema declares them (on the routes they guard) only when there is a key.
BEARER_SCHEME = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY`")
HEADER_SCHEME = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: KEY`")
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


class ErrorMessage(BaseModel):
    detail: str = Field(description="what was wrong and what to send instead, in one line")


def error_response(description: str, **headers: str) -> dict:
    """An OpenAPI response entry for an error: its JSON body and the headers it always carries."""
    return {"model": ErrorMessage, "description": description,
            "headers": {name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()}}


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
    adapter_name = (f"{adapter_dir.resolve().parent.name}/{adapter_dir.name}" if adapter_dir and adapter_dir.name == ADAPTER_DIR
                    else adapter_dir.resolve().name if adapter_dir else None)
    # A generous bound on a valid body (every text at its longest, 4 bytes per character, JSON escaping),
    # checked before the body is parsed so a huge upload is refused without being read into memory.
    max_body_bytes = max_texts * (max_chars * 12 + 8) + 1024
    # The request schema carries this app's limits, so a client (or a fuzzer) knows which bodies are valid.
    classify_schema = ClassifyRequest.model_json_schema()
    classify_schema["properties"]["texts"]["maxItems"] = max_texts
    classify_schema["properties"]["texts"]["items"]["maxLength"] = max_chars

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="doratweet", version=__version__, lifespan=lifespan,
                  description="Tweet sentiment (negative / neutral / positive) with a DoRA-tuned chat model.")
    app.state.batcher = batcher
    app.state.limits = {"max_texts": max_texts, "max_chars": max_chars, "max_batch": max_batch,
                        "max_wait_ms": max_wait_ms, "queue_size": queue_size}

    # Header values arrive decoded as latin-1; encoded back they are the bytes the client sent. A non-ASCII key
    # comes as its latin-1 bytes from browsers and `requests`, as its UTF-8 bytes from curl: both are the key.
    key_forms = {api_key.encode(), *latin1_bytes(api_key)} if api_key else set()

    def require_key(bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)],
                    header_key: Annotated[str | None, Security(HEADER_SCHEME)]) -> None:
        sent = (bearer.credentials if bearer else header_key or "").encode("latin-1")
        if not any(hmac.compare_digest(sent, form) for form in key_forms):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_key)] if api_key else []  # an empty key is no key, as run_server's warning says
    unauthorized = ({401: error_response("API key missing or wrong", **{"WWW-Authenticate": "always `Bearer`"})}
                    if guarded else {})

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=guarded,
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": classify_schema}}}},
              responses={**unauthorized,
                         413: error_response(f"more than {max_texts} texts, a text over {max_chars} characters, "
                                             "or a body larger than any valid request"),
                         422: error_response("not JSON, or not {\"texts\": [string, ...]}"),
                         503: error_response("queue full, or the server is shutting down; retry after the "
                                             "Retry-After header's seconds",
                                             **{"Retry-After": "seconds to wait before retrying"})})
    async def classify(request: Request) -> ClassifyResponse:
        """Label each text; results come in the order of `texts`."""
        texts = await read_texts(request, max_body_bytes, max_texts, max_chars)
        try:
            probabilities = await batcher.classify(texts)
        except QueueFull:
            raise HTTPException(503, "server busy: too many requests waiting; retry shortly",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ShuttingDown:
            raise HTTPException(503, "server shutting down; retry shortly (another instance, or this one "
                                "restarted, will answer)", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return ClassifyResponse(results=[Prediction(label=max(p, key=p.get), probabilities=p) for p in probabilities])

    @app.get("/v1/model", dependencies=guarded, responses=unauthorized)
    async def model_info() -> dict:
        """The base model, the adapter, the serving limits and, for a run folder, its test metrics."""
        # Names, never this machine's paths: the page and any client see which model answers, not where it lies.
        return {"base_model": public_name(classifier.base_model_id), "base_model_id": hub_id(classifier.base_model_id),
                "adapter": adapter_name, "run": run_dir.name if run_dir else None, "labels": list(LABELS),
                "limits": app.state.limits,
                "model_card": served_file(run_dir, CARD_FILE) is not None,
                **run_summary(run_dir), "plots": plot_names(run_dir)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/report/plots/{name}", dependencies=guarded, response_class=FileResponse,
             responses={200: {"description": "the plot", "content": {"image/png": {"schema": {"type": "string",
                                                                                         "format": "binary"}}}},
                        **unauthorized, 404: error_response("no plot of that name in the run's plots/")})
    async def plot(name: Annotated[str, UrlPath(description="a name in /v1/model's `plots`",
                                                examples=["confusion_after.png"])]) -> FileResponse:
        # Only names listed in plots/ are served: the name is matched, never joined into a path unchecked.
        real = served_plot(run_dir, name) if name in plot_names(run_dir) else None
        if real is None:
            raise HTTPException(404, f"no plot {name!r}")
        return FileResponse(real, media_type="image/png")

    @app.get("/", include_in_schema=False)
    async def classify_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/report", include_in_schema=False)
    async def report_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "report.html")

    @app.get("/ui/config", include_in_schema=False)
    async def page_config() -> dict:
        """What the pages need before they have a key: whether to show the key field."""
        return {"api_key_required": bool(api_key), "max_texts": max_texts, "max_chars": max_chars}

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(HeadAsGet)
    return app


class HeadAsGet:
    """Answers HEAD on every GET route as GET without the body (RFC 9110 9.3.2): load balancers and uptime
    checkers probe with HEAD, and FastAPI's routes answer only the methods they name."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_without_body(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)


def latin1_bytes(text: str) -> list[bytes]:
    try:
        return [text.encode("latin-1")]
    except UnicodeEncodeError:  # no client can send it as latin-1 either
        return []


async def read_texts(request: Request, max_bytes: int, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a /v1/classify body, else HTTP 413 (too much) or 422 (anything not {"texts": [string, ...]}).

    The body is read in chunks and refused once past `max_bytes`: a chunked upload has no Content-Length to
    check first. Pydantic's own JSON parser rejects what `json.loads` lets through to fail later: lone
    surrogates (`"\\ud800"`, which no tokenizer can encode), NaN and Infinity, nesting past its recursion limit.
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        # As FastAPI does: a form or text/plain post (which browsers send cross-site without asking) is refused.
        raise HTTPException(422, f"Content-Type {media_type or 'missing'}: send the body as application/json")
    too_large = HTTPException(413, f"request body over {max_bytes} bytes; send at most {max_texts} texts of at "
                                   f"most {max_chars} characters")
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:  # not a number ('²' passes str.isdigit, not int()): the count of bytes read still holds
        declared = 0
    if declared > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        texts = ClassifyRequest.model_validate_json(bytes(body).removeprefix(UTF8_BOM)).texts
    except ValidationError as error:
        raise HTTPException(422, validation_message(error)) from None
    if len(texts) > max_texts:
        raise HTTPException(413, f"{len(texts)} texts; send at most {max_texts} per request")
    for index, text in enumerate(texts):
        if len(text) > max_chars:
            raise HTTPException(413, f"texts[{index}] has {len(text)} characters; the limit is {max_chars}")
        if problem := text_problem(text):  # the rule of every path; only its length limit can fail here
            raise HTTPException(413, f"texts[{index}]: {problem}")
    return texts


def validation_message(error: ValidationError) -> str:
    """Pydantic's first complaint as one line naming the place, e.g. `texts[1]: Input should be a valid string`.
    The input itself is left out: echoing it back could be megabytes, or not even encodable."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    first = problems[0]
    place = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{place + ': ' if place else ''}{first['msg']}{more}; send {{\"texts\": [string, ...]}}"


def served_file(run_dir: Path | None, relative: str) -> Path | None:
    """The real path of a run-folder file the server may read: a regular file inside the run folder, links
    included only while they stay inside it; else None, as if the file were absent."""
    if run_dir is None:
        return None
    try:
        return file_inside(run_dir, relative)
    except UserError:
        return None


def plot_names(run_dir: Path | None) -> list[str]:
    folder = run_dir / PLOTS_DIR if run_dir else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if PLOT_NAME.fullmatch(p.name) and served_plot(run_dir, p.name))


def served_plot(run_dir: Path, name: str) -> Path | None:
    """The real path of plots/`name` when it is a PNG whose resolved path is itself a plot's: a link to another
    file of the run (a hidden `.env`, the adapter's config) is not served, as if absent."""
    real = served_file(run_dir, f"{PLOTS_DIR}/{name}")
    if real is None:
        return None
    relative = real.relative_to(run_dir.resolve())
    if relative.parent != Path(PLOTS_DIR) or not PLOT_NAME.fullmatch(relative.name):
        return None
    return real if is_png(real) else None


def run_summary(run_dir: Path | None) -> dict:
    """The test-split metrics of metrics.json, before and after training, per mode; empty without a run.
    A missing or malformed metrics.json (as `report.load_metrics` checks it) leaves the page without a table
    instead of failing the server; `run_server` logs why once, at start."""
    if served_file(run_dir, METRICS_FILE) is None:
        return {"metrics": None}
    try:
        metrics = load_metrics(run_dir)
    except UserError:
        return {"metrics": None}
    rows = []
    for stage in STAGES:
        for mode in ("score", "generate"):
            block = result(metrics, stage, mode)
            if block:
                rows.append({"stage": stage, "mode": mode, **{k: block.get(k) for k in METRIC_NAMES},
                             "per_class_f1": {k: v["f1"] for k, v in block.get("per_class", {}).items()},
                             "confusion": block.get("confusion"), "confusion_columns": block.get("confusion_columns")})
    training = metrics.get("training", {})
    data = metrics.get("data", {}) | ({"spec": public_data_spec(metrics["data"]["spec"])}
                                     if "spec" in metrics.get("data", {}) else {})
    return {"metrics": {"test": rows, "data": data or None, "preset": metrics.get("preset"),
                        "training": {k: training[k] for k in ("method", "rank", "alpha", "targets", "steps", "lr",
                                                              "seconds", "device") if k in training}}}
