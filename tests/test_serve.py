"""The HTTP API on the tiny trained run: answers, dynamic batching, limits, errors and the API key."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

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


class BlockedClassifier(CountingClassifier):
    """Holds every forward pass until `release` is set (`entered` tells one has begun): a worker kept busy."""

    def __init__(self, inner):
        super().__init__(inner)
        self.release, self.entered = threading.Event(), threading.Event()

    def predict_proba(self, texts):
        self.entered.set()
        assert self.release.wait(10), "the test never released the worker"
        return super().predict_proba(texts)


def request(app, method: str, url: str, **options) -> httpx.Response:
    async def send():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, url, **options)

    return asyncio.run(send())


def test_classify_returns_a_label_and_three_probabilities_per_text_in_order(classifier, run_dir):
    """fp32 (the `classifier` fixture): the same text in another batch (other padding, other shapes) differs by
    float32 rounding, ~1e-6 on a probability on any CPU; another text's answer differs by far more than 1e-4."""
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
    blocked = BlockedClassifier(classifier)
    release, entered = blocked.release, blocked.entered
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
    assert info["base_model"] == Path(classifier.base_model_id).name  # trained on a local folder: its name
    assert info["base_model_id"] is None  # a local folder is no Hub id
    assert info["adapter"] == "run/adapter" and info["run"] == "run" and info["model_card"] is True
    rows = info["metrics"]["test"]
    assert {(r["stage"], r["mode"]) for r in rows} == {(s, m) for s in ("before", "after") for m in ("score", "generate")}
    assert all(r["n"] == 6 and 0 <= r["macro_f1"] <= 1 for r in rows)
    assert "confusion_after.png" in info["plots"] and "training_curves.png" in info["plots"]


def test_model_info_without_a_run_folder_has_no_metrics(classifier, run_dir):
    info = request(create_app(classifier, adapter_dir=run_dir / "adapter"), "GET", "/v1/model").json()
    assert info["metrics"] is None and info["plots"] == [] and info["run"] is None


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


# ---- the options of `doratweet serve`: all checked before anything loads ----

@pytest.fixture
def no_model_load(monkeypatch):
    """Makes loading a model fail the test: an option error must come before it."""
    def refuse(*args, **kwargs):
        pytest.fail("serve loaded the model before checking its options")

    monkeypatch.setattr("doratweet.predict.SentimentClassifier.load", refuse)


@pytest.mark.parametrize("options, named", [
    (["--max-wait-ms", "inf"], "--max-wait-ms"),
    (["--max-wait-ms", "nan"], "--max-wait-ms"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--max-wait-ms", "1e9"], "--max-wait-ms"),
    (["--port", "99999"], "--port"),
    (["--port", "-1"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-texts", "0"], "--max-texts"),
    (["--max-chars", "0"], "--max-chars"),
    (["--queue-size", "0"], "--queue-size"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
    (["--shutdown-timeout", "inf"], "--shutdown-timeout"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--host", "no such host.invalid"], "--host"),
])
def test_a_bad_serve_option_is_one_line_naming_it_before_the_model_loads(no_model_load, capsys, options, named):
    from doratweet.cli import main

    assert main(["serve", *options]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"doratweet: error: {named}")


def test_a_port_in_use_is_one_line_before_the_model_loads(no_model_load, capsys):
    import socket

    from doratweet.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("doratweet: error: --port")


def test_an_ipv6_host_is_shown_in_brackets_as_in_a_url(no_model_load, capsys):
    import socket

    from doratweet.cli import main

    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--host", "::1", "--port", str(port)]) == 2
    assert f"cannot listen on [::1]:{port} " in capsys.readouterr().err


def test_the_address_served_is_a_url_that_brackets_an_ipv6_host():
    from doratweet.serve import served_url

    assert served_url("::1", 8000) == "http://[::1]:8000"
    assert served_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"


@pytest.mark.parametrize("url", ["/health", "/", "/report", "/ui/config", "/v1/model",
                                 "/report/plots/confusion_after.png"])
def test_head_is_answered_like_get_without_a_body(classifier, run_dir, url):
    app = create_app(classifier, run_dir=run_dir)
    got, head = request(app, "GET", url), request(app, "HEAD", url)
    assert head.status_code == got.status_code == 200
    assert head.headers["content-type"] == got.headers["content-type"] and head.content == b""


# ---- shutting down: SIGTERM (kill, docker stop, systemd) and Ctrl-C ----

def test_draining_refuses_new_requests_and_by_the_deadline_the_unanswered_ones_with_503(classifier):
    stuck = BlockedClassifier(classifier)
    release, entered = stuck.release, stuck.entered
    app = create_app(stuck, max_batch=1, max_wait_ms=0)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            post = lambda text: client.post("/v1/classify", json={"texts": [text]})  # noqa: E731
            running = asyncio.create_task(post("in the forward pass"))
            await asyncio.to_thread(entered.wait, 10)
            queued = asyncio.create_task(post("waiting in the queue"))
            while app.state.batcher._queue.qsize() < 1:
                await asyncio.sleep(0.005)
            started = time.monotonic()
            draining = asyncio.create_task(app.state.batcher.drain(0.3))
            await asyncio.sleep(0)
            late = await post("sent after the shutdown began")
            await draining
            return [await running, await queued, late], time.monotonic() - started

    try:
        responses, seconds = asyncio.run(scenario())
    finally:
        release.set()
    assert [r.status_code for r in responses] == [503, 503, 503]
    assert all(r.headers["Retry-After"] == "1" and "shutting down" in r.json()["detail"] for r in responses)
    assert seconds < 5  # the stuck forward pass did not hold the shutdown past its deadline (0.3 s)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_sigterm_answers_the_waiting_request_stops_listening_and_exits(run_dir):
    import signal
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A forward pass waits up to 10 s for company: the request below is still waiting when SIGTERM comes.
    server = subprocess.Popen([sys.executable, "-m", "doratweet", "--quiet", "serve", "--run", str(run_dir),
                               "--port", str(port), "--precision", "fp32", "--max-wait-ms", "10000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "the server never came up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        answer = {}
        waiting = threading.Thread(target=lambda: answer.update(
            response=httpx.post(f"{url}/v1/classify", json={"texts": ["so happy today"]}, timeout=30)))
        waiting.start()
        time.sleep(1.0)
        assert "response" not in answer  # still gathering company
        sent = time.monotonic()
        server.send_signal(signal.SIGTERM)
        waiting.join(30)
        answered = time.monotonic() - sent
        assert answer["response"].status_code == 200 and len(answer["response"].json()["results"]) == 1
        assert answered < 8  # drained at once, not after the 10 s gathering wait
        assert server.wait(timeout=15) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ---- what the server reads from the run folder ----

@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the run's card, metrics and plots that a test may change."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir / "plots", copy / "plots")
    for name in ("README.md", "metrics.json"):
        shutil.copy(run_dir / name, copy / name)
    return copy


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "passwd"
    path.write_text('{"root": "x:0:0"}')
    return path


def test_a_plot_linking_out_of_the_run_folder_is_neither_listed_nor_served(classifier, run_copy, secret):
    (run_copy / "plots" / "leak.png").symlink_to(secret)
    app = create_app(classifier, run_dir=run_copy)
    assert request(app, "GET", "/report/plots/leak.png").status_code == 404
    assert "leak.png" not in request(app, "GET", "/v1/model").json()["plots"]


def test_a_plot_linking_inside_the_run_folder_is_served(classifier, run_copy):
    (run_copy / "plots" / "latest.png").symlink_to(run_copy / "plots" / "confusion_after.png")
    response = request(create_app(classifier, run_dir=run_copy), "GET", "/report/plots/latest.png")
    assert response.status_code == 200 and response.content == (run_copy / "plots" / "confusion_after.png").read_bytes()


@pytest.mark.parametrize("target", ["../adapter/.env", "../adapter/adapter_config.json", "../metrics.json",
                                    ".hidden.png"])
def test_a_plot_linking_to_a_run_file_that_is_not_a_plot_is_neither_listed_nor_served(classifier, run_copy, target):
    (run_copy / "adapter").mkdir()
    (run_copy / "adapter" / ".env").write_text("HF_TOKEN=hf_secret")
    (run_copy / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "/home/me/model"}')
    shutil.copy(run_copy / "plots" / "confusion_after.png", run_copy / "plots" / ".hidden.png")
    (run_copy / "plots" / "inner.png").symlink_to(target)
    app = create_app(classifier, run_dir=run_copy)
    assert request(app, "GET", "/report/plots/inner.png").status_code == 404
    assert "inner.png" not in request(app, "GET", "/v1/model").json()["plots"]


def test_a_plot_that_is_a_folder_is_not_listed(classifier, run_copy):
    (run_copy / "plots" / "folder.png").mkdir()
    app = create_app(classifier, run_dir=run_copy)
    assert "folder.png" not in request(app, "GET", "/v1/model").json()["plots"]
    assert request(app, "GET", "/report/plots/folder.png").status_code == 404


def test_metrics_and_card_linking_out_of_the_run_folder_are_not_read(classifier, run_copy, secret):
    for name in ("metrics.json", "README.md"):
        (run_copy / name).unlink()
        (run_copy / name).symlink_to(secret)
    info = request(create_app(classifier, run_dir=run_copy), "GET", "/v1/model").json()
    assert info["metrics"] is None and info["model_card"] is False


def test_no_page_or_api_answer_shows_a_path_of_the_server(classifier, run_dir):
    app = create_app(classifier, run_dir=run_dir)
    answers = "".join(request(app, "GET", url).text for url in ("/v1/model", "/", "/report", "/ui/config"))
    for path in (str(run_dir), str(Path(classifier.base_model_id)), "/tmp/"):
        assert path not in answers


class HubModelClassifier(CountingClassifier):
    def __init__(self, inner):
        super().__init__(inner)
        self.base_model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_model_info_names_a_hub_model_by_its_id(classifier):
    info = request(create_app(HubModelClassifier(classifier)), "GET", "/v1/model").json()
    assert info["base_model"] == info["base_model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_run_records_its_model_source_as_a_name_not_a_path(run_dir):
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model_source"] == Path(metrics["base_model_id"]).name
