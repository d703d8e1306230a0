"""The HTTP API on the tiny trained run: answers, dynamic batching, limits, errors and the API key."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from doratweet import LABELS
from doratweet.predict import SentimentClassifier
from doratweet.serve import create_app

TWEETS = ["I love this phone", "worst service ever", "the meeting is at 5pm", "so happy today"]


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir):
    return tiny_run_dir


@pytest.fixture(scope="module")
def classifier(run_dir):
    return SentimentClassifier.load(run_dir, bf16=False)


class CountingClassifier:
    """Passes through to the real classifier and records the texts of every forward pass."""

    def __init__(self, inner):
        self.inner = inner
        self.base_model_id = inner.base_model_id
        self.calls: list[list[str]] = []

    def predict_proba(self, texts):
        self.calls.append(list(texts))
        return self.inner.predict_proba(texts)


def request(app, method: str, url: str, **options) -> httpx.Response:
    async def send():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, url, **options)

    return asyncio.run(send())


def test_classify_returns_a_label_and_three_probabilities_per_text_in_order(classifier, run_dir):
    app = create_app(classifier, run_dir=run_dir)
    response = request(app, "POST", "/v1/classify", json={"texts": TWEETS})
    assert response.status_code == 200
    results = response.json()["results"]
    expected = classifier.predict_proba(TWEETS)
    assert len(results) == len(TWEETS)
    for result, probabilities in zip(results, expected):
        assert set(result["probabilities"]) == set(LABELS)
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-5
        assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
        assert all(abs(result["probabilities"][k] - probabilities[k]) < 1e-4 for k in LABELS)


def test_an_empty_list_gives_an_empty_result_without_a_forward_pass(classifier):
    counting = CountingClassifier(classifier)
    response = request(create_app(counting), "POST", "/v1/classify", json={"texts": []})
    assert response.status_code == 200 and response.json() == {"results": []}
    assert counting.calls == []


def test_concurrent_requests_share_forward_passes(classifier):
    counting = CountingClassifier(classifier)
    app = create_app(counting, max_batch=32, max_wait_ms=200)
    texts = [f"tweet {i}: {TWEETS[i % 4]}" for i in range(12)]

    async def fire():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(*(client.post("/v1/classify", json={"texts": [t]}) for t in texts))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 12
    assert len(counting.calls) < len(texts)  # 12 requests, fewer forward passes
    assert sorted(t for call in counting.calls for t in call) == sorted(texts)  # each text classified once
    expected = classifier.predict_proba(texts)
    for response, probabilities in zip(responses, expected):  # each answer is its own text's, despite batching
        got = response.json()["results"][0]["probabilities"]
        assert all(abs(got[k] - probabilities[k]) < 1e-4 for k in LABELS)


def test_max_batch_caps_the_texts_in_one_forward_pass(classifier):
    counting = CountingClassifier(classifier)
    app = create_app(counting, max_batch=3, max_wait_ms=100)

    async def fire():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(*(client.post("/v1/classify", json={"texts": [t]}) for t in TWEETS * 2))

    assert all(r.status_code == 200 for r in asyncio.run(fire()))
    assert max(len(call) for call in counting.calls) <= 3 and sum(map(len, counting.calls)) == 8


@pytest.mark.parametrize("body", [b'{"texts": ["unclosed', b"not json at all", b""])
def test_malformed_json_is_422(classifier, body):
    response = request(create_app(classifier), "POST", "/v1/classify", content=body,
                       headers={"Content-Type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize("payload", [{"texts": "one string"}, {"texts": [1, 2]}, {"texts": [None]},
                                     {"text": ["wrong key"]}, ["a list"], {"texts": ["ok"], "extra": 1}])
def test_wrong_types_are_422(classifier, payload):
    assert request(create_app(classifier), "POST", "/v1/classify", json=payload).status_code == 422


def test_too_many_texts_is_413(classifier):
    response = request(create_app(classifier, max_texts=3), "POST", "/v1/classify", json={"texts": ["a"] * 4})
    assert response.status_code == 413 and "at most 3" in response.json()["detail"]


def test_a_text_too_long_is_413_naming_it(classifier):
    response = request(create_app(classifier, max_chars=10), "POST", "/v1/classify",
                       json={"texts": ["short", "x" * 11]})
    assert response.status_code == 413 and "texts[1]" in response.json()["detail"]


def test_a_huge_body_is_413_before_it_is_parsed(classifier):
    body = b'{"texts": ["' + b"x" * 200_000 + b'"]}'
    response = request(create_app(classifier, max_texts=2, max_chars=100), "POST", "/v1/classify", content=body,
                       headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_a_full_queue_is_503_with_retry_after(classifier):
    release, entered = threading.Event(), threading.Event()

    class BlockedClassifier(CountingClassifier):
        def predict_proba(self, texts):
            entered.set()
            assert release.wait(10), "the test never released the worker"
            return super().predict_proba(texts)

    blocked = BlockedClassifier(classifier)
    app = create_app(blocked, max_batch=1, max_wait_ms=0, queue_size=1)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            post = lambda text: client.post("/v1/classify", json={"texts": [text]})  # noqa: E731
            running = asyncio.create_task(post("in the forward pass"))
            await asyncio.to_thread(entered.wait, 10)
            queued = asyncio.create_task(post("waiting in the queue"))
            while app.state.batcher._queue.qsize() < 1:
                await asyncio.sleep(0.005)
            refused = await post("one too many")
            release.set()
            return refused, await running, await queued

    try:
        refused, running, queued = asyncio.run(scenario())
    finally:
        release.set()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert running.status_code == 200 and queued.status_code == 200  # nothing accepted was dropped
    assert [t for call in blocked.calls for t in call] == ["in the forward pass", "waiting in the queue"]


def test_the_api_key_guards_every_data_route_but_not_health(classifier, run_dir):
    app = create_app(classifier, run_dir=run_dir, api_key="s3cret")
    body = {"json": {"texts": ["hello"]}}
    assert request(app, "POST", "/v1/classify", **body).status_code == 401
    assert request(app, "POST", "/v1/classify", headers={"Authorization": "Bearer wrong"}, **body).status_code == 401
    assert request(app, "POST", "/v1/classify", headers={"Authorization": "Bearer s3cret"}, **body).status_code == 200
    assert request(app, "POST", "/v1/classify", headers={"X-API-Key": "s3cret"}, **body).status_code == 200
    assert request(app, "GET", "/v1/model").status_code == 401
    assert request(app, "GET", "/report/plots/confusion_after.png").status_code == 401
    assert request(app, "GET", "/health").json() == {"status": "ok"}
    assert request(app, "GET", "/ui/config").json()["api_key_required"] is True


def test_model_info_has_the_base_model_adapter_and_run_metrics(classifier, run_dir):
    info = request(create_app(classifier, run_dir=run_dir), "GET", "/v1/model").json()
    assert info["base_model_id"] == classifier.base_model_id
    assert info["adapter"] == str(run_dir / "adapter") and info["model_card"] is True
    rows = info["metrics"]["test"]
    assert {(r["stage"], r["mode"]) for r in rows} == {(s, m) for s in ("before", "after") for m in ("score", "generate")}
    assert all(r["n"] == 6 and 0 <= r["macro_f1"] <= 1 for r in rows)
    assert "confusion_after.png" in info["plots"] and "training_curves.png" in info["plots"]


def test_model_info_without_a_run_folder_has_no_metrics(classifier, run_dir):
    info = request(create_app(classifier, adapter_dir=run_dir / "adapter"), "GET", "/v1/model").json()
    assert info["metrics"] is None and info["plots"] == [] and info["run_dir"] is None


def test_plots_are_served_and_nothing_outside_plots(classifier, run_dir):
    app = create_app(classifier, run_dir=run_dir)
    png = request(app, "GET", "/report/plots/confusion_after.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (run_dir / "plots" / "confusion_after.png").read_bytes()
    for sneaky in ("..%2Fmetrics.json", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "missing.png", "README.md"):
        assert request(app, "GET", f"/report/plots/{sneaky}").status_code == 404, sneaky


def test_the_pages_and_the_openapi_schema_are_served(classifier, run_dir):
    app = create_app(classifier, run_dir=run_dir)
    assert "<textarea" in request(app, "GET", "/").text
    assert "Run report" in request(app, "GET", "/report").text
    assert request(app, "GET", "/static/classify.js").status_code == 200
    schema = request(app, "GET", "/openapi.json").json()
    assert {"/v1/classify", "/v1/model", "/health"} <= set(schema["paths"])


def test_a_lone_request_is_not_held_much_longer_than_max_wait(classifier):
    app = create_app(classifier, max_wait_ms=10)
    request(app, "POST", "/v1/classify", json={"texts": ["warm up"]})
    started = time.perf_counter()
    assert request(app, "POST", "/v1/classify", json={"texts": ["hello"]}).status_code == 200
    assert time.perf_counter() - started < 2.0
