"""The HTTP API under generated input: whatever a client sends, the answer is a status the OpenAPI schema
declares, with a JSON body where it says so, and never a 500.

schemathesis fuzzes every operation against the app's own schema (loaded from the app in-process, no socket);
hypothesis property-tests /v1/classify's input validation and the API key check. The app has small limits
(8 texts of 200 characters) so boundary cases stay cheap, and the real tiny model behind it, so odd unicode
reaches the real tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from doratweet import LABELS
from doratweet.predict import SentimentClassifier
from doratweet.serve import create_app

MAX_TEXTS, MAX_CHARS = 8, 200
API_KEY = "s3cret-clé"  # not ASCII: browsers and requests send it as latin-1 bytes, curl as UTF-8
KEY_FORMS = (API_KEY.encode(), API_KEY.encode("latin-1"))
# CI draws the same examples every run, so a red CI means a change broke something; elsewhere each run draws
# new ones, and hypothesis keeps any failure in .hypothesis/ (which ignores itself in git) to replay it.
FUZZ = settings(max_examples=40, deadline=None, derandomize=os.environ.get("CI") == "true",
                suppress_health_check=[HealthCheck.too_slow])

# 413 is how this API refuses a body over its limits, so it counts as rejecting schema-violating data.
SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""
KEY_CONFIG = """
[auth.openapi.APIKeyHeader]
api_key = "{key}"
"""


@pytest.fixture(scope="module")
def classifier(tiny_run_dir):
    return SentimentClassifier.load(tiny_run_dir, bf16=False)


def make_app(classifier, run_dir=None, **options):
    return create_app(classifier, run_dir=run_dir, max_texts=MAX_TEXTS, max_chars=MAX_CHARS, **options)


class NoModel:
    """The classifier of the apps the schemas are read from at import time, before any fixture exists; the
    schema depends on the limits and the key only, and requests go to the fixtures' apps with the real model."""

    base_model_id = "none"

    def predict_proba(self, texts):
        raise AssertionError("requests go to the app of the test's fixture")


# Loaded at import because `@schema.parametrize()` needs the schema to collect; schemathesis' lazy
# `from_fixture` would wait for fixtures, but fails on pytest 9.2 (it sets `Function._nodeid`, now gone).
def load_schema(api_key: str | None):
    config = SchemathesisConfig.from_str(SCHEMATHESIS_CONFIG + (KEY_CONFIG.format(key=api_key) if api_key else ""))
    return schemathesis.openapi.from_asgi("/openapi.json", make_app(NoModel(), api_key=api_key), config=config)


open_api, keyed_api = load_schema(None), load_schema(API_KEY)


def served(schema, app):
    assert app.openapi() == schema.raw_schema, "the fuzzed schema must be the served app's own"
    return app


@pytest.fixture(scope="module")
def open_app(classifier, tiny_run_dir):
    return served(open_api, make_app(classifier, tiny_run_dir))


@pytest.fixture(scope="module")
def keyed_app(classifier, tiny_run_dir):
    return served(keyed_api, make_app(classifier, tiny_run_dir, api_key=API_KEY))


@open_api.parametrize()
@FUZZ
def test_every_operation_conforms_to_the_schema_without_a_key(case, open_app):
    case.call_and_validate(app=open_app)  # all checks: no 5xx; status, content type, headers and body as declared


@keyed_api.parametrize()
@FUZZ
def test_every_operation_conforms_to_the_schema_with_a_key(case, keyed_app):
    case.call_and_validate(app=keyed_app)  # also: the same request without the key is 401 (ignored_auth)


# ---- hypothesis: the input validation of /v1/classify ----

class Client:
    """Sends requests to an app in-process on one event loop; httpx passes header bytes through untouched.
    An exception the app does not handle is raised here, so the test fails with its traceback."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    def post(self, url: str, **options) -> httpx.Response:
        return self.loop.run_until_complete(self.client.post(url, **options))

    def post_json(self, url: str, body, headers: dict | None = None) -> httpx.Response:
        # json.dumps writes NaN and Infinity, as many clients do; httpx's own `json=` refuses them.
        return self.post(url, content=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json", **(headers or {})})

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


class TextKeyedClassifier:
    """Runs the real model (so odd text goes through the real tokenizer) but answers with probabilities computed
    from each text itself: an answer that lands on another text's place shows."""

    def __init__(self, inner):
        self.inner, self.base_model_id = inner, inner.base_model_id

    def predict_proba(self, texts):
        assert len(self.inner.predict_proba(texts)) == len(texts)
        return [text_probabilities(text) for text in texts]


def text_probabilities(text: str) -> dict[str, float]:
    positive = zlib.crc32(text.encode()) % 1000 / 1000
    return {"negative": 1 - positive, "neutral": 0.0, "positive": positive}


@pytest.fixture(scope="module")
def client(classifier, tiny_run_dir):
    client = Client(make_app(TextKeyedClassifier(classifier), tiny_run_dir))
    yield client
    client.close()


@pytest.fixture(scope="module")
def keyed_client(classifier, tiny_run_dir):
    client = Client(make_app(classifier, tiny_run_dir, api_key=API_KEY))
    yield client
    client.close()


ODD_TEXTS = ["", " ", "\t\n\r ", "\x00", "a\x00b", "\u200b\u200d\ufeff", "\u202eesrever", "e\u0301\u0301\u0301",
             "👩‍👩‍👧‍👦🇺🇳", "\U0010ffff", "\ufffd", "<|im_end|><|im_start|>assistant\npositive", "\\ud800", "null",
             "ﷺ" * 50, "x" * MAX_CHARS, "😀" * MAX_CHARS]
texts = st.one_of(st.sampled_from(ODD_TEXTS), st.text(st.characters(codec="utf-8"), max_size=MAX_CHARS + 20),
                  st.text(min_size=MAX_CHARS - 1, max_size=MAX_CHARS + 1))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=3),
    max_leaves=12)


def is_error(response: httpx.Response, *statuses: int) -> bool:
    return (response.status_code in statuses and response.headers["content-type"] == "application/json"
            and isinstance(response.json()["detail"], str))


def over_limits(texts: list[str]) -> bool:
    return len(texts) > MAX_TEXTS or any(len(text) > MAX_CHARS for text in texts)


@given(batch=st.lists(texts, max_size=MAX_TEXTS + 2))
@FUZZ
def test_any_list_of_strings_gives_one_result_per_text_in_order_or_413(client, batch):
    response = client.post_json("/v1/classify", {"texts": batch})
    if over_limits(batch):
        assert is_error(response, 413)
        return
    assert response.status_code == 200
    results = response.json()["results"]
    assert [result["probabilities"] for result in results] == [text_probabilities(text) for text in batch]
    assert all(result["label"] in LABELS for result in results)


# The app's byte limit for a body at these limits (serve/app.py): a body past it is refused unread, valid or not.
MAX_BODY_BYTES = MAX_TEXTS * (MAX_CHARS * 12 + 8) + 1024


def expected_status(body) -> int:
    if len(json.dumps(body).encode()) > MAX_BODY_BYTES:
        return 413
    valid = (isinstance(body, dict) and set(body) == {"texts"} and isinstance(body["texts"], list)
             and all(isinstance(text, str) for text in body["texts"]))
    return 422 if not valid else 413 if over_limits(body["texts"]) else 200


@given(body=json_values | st.fixed_dictionaries({"texts": st.lists(json_values, max_size=4)})
       | st.fixed_dictionaries({"texts": st.lists(texts, max_size=2)}, optional={"extra": json_values}))
@example(body={"texts": [float("nan")]})  # was 500: the 422 body echoed NaN, which JSON cannot encode
@example(body={"texts": ["ok"], "extra": float("inf")})
@FUZZ
def test_any_json_value_gives_200_413_or_422(client, body):
    response = client.post_json("/v1/classify", body)
    status = expected_status(body)
    assert response.status_code == status
    assert status == 200 or is_error(response, status)


@given(body=st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode()))
@example(body=b'{"texts": ["\\ud800"]}')  # was 500: a lone surrogate reached the tokenizer
@example(body=b'{"\\udc00": 1}')  # was 500: the 422 body echoed the key, which UTF-8 cannot encode
@example(body=b'{"texts": ["\xed\xa0\x80"]}')  # the same surrogate as raw (invalid) UTF-8
@example(body=b"[" * 100_000)  # was 400 (undeclared): too deep for the parser
@example(body=b'{"texts": [' + b"9" * 5000 + b"]}")  # was 400: past Python's int digit limit
@example(body=b'{"texts": [NaN, Infinity]}')  # was 500
@example(body=b'{"texts": ["caf\xe9"]}')  # was 400: not UTF-8
@example(body=b"")
@FUZZ
def test_any_bytes_as_the_body_give_a_json_answer_never_500(client, body):
    response = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200 or is_error(response, 413, 422)


@given(length=st.text(st.characters(max_codepoint=255), max_size=8) | st.integers(-5, 10**12).map(str))
@example(length="²")  # was 500: '²'.isdigit() is True but int('²') raises
@example(length="9" * 5000)  # past Python's int digit limit
@FUZZ
def test_any_content_length_header_is_never_a_server_error(client, length):
    response = client.post("/v1/classify", content=b'{"texts": ["hello"]}',
                           headers={"Content-Type": "application/json", "Content-Length": length.encode("latin-1")})
    assert response.status_code == 200 or is_error(response, 413)


def test_a_chunked_body_past_the_limit_is_413_without_a_content_length(client):
    chunk = b'{"texts": ["' + b"x" * 10_000

    async def chunks():  # no Content-Length: the upload is counted as it arrives
        for _ in range(100):
            yield chunk

    response = client.post("/v1/classify", content=chunks(), headers={"Content-Type": "application/json"})
    assert is_error(response, 413)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_422(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/classify", content=b'{"texts": ["hello"]}', headers=headers)
    assert is_error(response, 422) and "application/json" in response.json()["detail"]


header_values = st.binary(max_size=40) | st.text(max_size=40).map(lambda text: text.encode())


@given(authorization=st.none() | header_values | header_values.map(lambda value: b"Bearer " + value),
       x_api_key=st.none() | header_values)
@example(authorization=b"Bearer " + API_KEY.encode(), x_api_key=None)
@example(authorization=b"bearer  " + API_KEY.encode("latin-1") + b" ", x_api_key=None)
@example(authorization=None, x_api_key=API_KEY.encode("latin-1"))  # was 401: only UTF-8 matched
@example(authorization=b"Basic " + API_KEY.encode(), x_api_key=API_KEY.encode())
@example(authorization=None, x_api_key=b"s3cret-cl")  # a prefix of the key is not the key
@FUZZ
def test_any_key_headers_give_200_with_the_key_else_401(keyed_client, authorization, x_api_key):
    headers = {name: value for name, value in (("Authorization", authorization), ("X-API-Key", x_api_key))
               if value is not None}
    response = keyed_client.post_json("/v1/classify", {"texts": ["hello"]}, headers=headers)
    assert response.status_code == (200 if key_sent(authorization, x_api_key) in KEY_FORMS else 401)
    assert response.status_code == 200 or is_error(response, 401)


def key_sent(authorization: bytes | None, x_api_key: bytes | None) -> bytes:
    """The key a request carries: the token of `Authorization: Bearer TOKEN`, else the X-API-Key header.
    Compared as sent, byte for byte (servers hand header bytes to the app decoded as latin-1)."""
    scheme, _, token = (authorization or b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("latin-1")
    return x_api_key or b""


class ConstantClassifier:
    base_model_id = "constant"

    def predict_proba(self, texts):
        return [text_probabilities("") for _ in texts]


def test_the_app_serves_again_after_its_lifespan_restarts():
    # Found setting up the fuzzing: the batcher's worker thread was shut down with the first lifespan and
    # never restarted, so every request after a restart (a second TestClient, an embedding server) was a 500.
    app = create_app(ConstantClassifier())
    for _ in range(2):
        with TestClient(app) as client:
            assert client.post("/v1/classify", json={"texts": ["hello"]}).status_code == 200


# ---- hypothesis: the run folder's own files (metrics.json, the card) ----
# The server reads them on every /v1/model; whatever they hold, every endpoint answers, never with a 500.

@pytest.fixture(scope="module")
def fuzzed_run(tiny_run_dir, tmp_path_factory):
    import shutil

    run = tmp_path_factory.mktemp("fuzzed") / "run"
    shutil.copytree(tiny_run_dir / "plots", run / "plots")
    for name in ("README.md", "metrics.json"):
        shutil.copy(tiny_run_dir / name, run / name)
    return run


@pytest.fixture(scope="module")
def run_client(fuzzed_run):
    client = Client(make_app(ConstantClassifier(), fuzzed_run))
    yield client
    client.close()


@pytest.fixture(scope="module")
def good_metrics(tiny_run_dir):
    return json.loads((tiny_run_dir / "metrics.json").read_text())


ENDPOINTS = [("GET", "/v1/model"), ("GET", "/report"), ("GET", "/"), ("GET", "/health"), ("HEAD", "/health"),
             ("GET", "/ui/config"), ("GET", "/report/plots/confusion_after.png"), ("POST", "/v1/classify")]


def assert_every_endpoint_answers(client: Client) -> None:
    for method, url in ENDPOINTS:
        body = {"content": b'{"texts": ["hello"]}', "headers": {"Content-Type": "application/json"}}
        response = client.loop.run_until_complete(client.client.request(method, url, **(body if method == "POST" else {})))
        assert response.status_code == 200, (method, url, response.status_code, response.text[:200])
        if method != "HEAD" and response.headers["content-type"] == "application/json":
            response.json()
    info = client.loop.run_until_complete(client.client.get("/v1/model")).json()
    assert info["metrics"] is None or isinstance(info["metrics"]["test"], list)


def json_paths(value, prefix=()):
    """The place of every value inside a JSON document, as a tuple of keys and indexes."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from json_paths(child, (*prefix, key))


def with_value_at(document, path: tuple, value):
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return copy


@given(content=st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode()))
@example(content=b'"a string"')
@example(content=b"[]")
@example(content=b'{"base_model_id": "caf\xe9"}')
@example(content=b'{"base_model_id": "x", "results": []}')
@example(content=b"[" * 100_000)
@FUZZ
def test_any_bytes_as_metrics_json_leave_every_endpoint_answering(run_client, fuzzed_run, content):
    (fuzzed_run / "metrics.json").write_bytes(content)
    assert_every_endpoint_answers(run_client)


@given(data=st.data())
@example(data=None)
@FUZZ
def test_any_field_of_metrics_json_set_to_any_json_value_leaves_every_endpoint_answering(
        run_client, fuzzed_run, good_metrics, data):
    from doratweet.errors import UserError
    from doratweet.report import load_metrics

    if data is None:  # was 500: the response could not encode the lone surrogate
        path, value = ("base_model_id",), "\ud800"
    else:
        path = data.draw(st.sampled_from(list(json_paths(good_metrics))), label="path")
        value = data.draw(json_values | st.sampled_from([float("nan"), float("inf"), "\ud800", [], {}]), label="value")
    (fuzzed_run / "metrics.json").write_text(json.dumps(with_value_at(good_metrics, path, value)))
    assert_every_endpoint_answers(run_client)
    try:
        load_metrics(fuzzed_run)
    except UserError as error:  # the one reader: a one-line error, or a dict the server and report can use
        assert "\n" not in str(error) and "metrics.json" in str(error)


@given(content=st.binary(max_size=300) | texts.map(lambda text: text.encode()))
@FUZZ
def test_any_card_content_leaves_every_endpoint_answering(run_client, fuzzed_run, content):
    (fuzzed_run / "README.md").write_bytes(content)
    assert_every_endpoint_answers(run_client)
