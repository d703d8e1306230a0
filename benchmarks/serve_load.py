"""Load test of `doratweet serve`: throughput and latency at 1, 8 and 64 clients, batching on and off.

    python benchmarks/serve_load.py RUN_OR_ADAPTER_DIR [--clients 1,8,64] [--seconds 5] [--max-batch 32]

The server runs in this process (uvicorn in a thread) on a free loopback port; the clients are asyncio
tasks with httpx, each sending one single-tweet request after another for a fixed time, so the test is
bounded and stops by itself. "Batching off" is the same server with `--max-batch 1`. Every cell checks that
each request sent got a 200 with one result, and that the model classified exactly the texts sent (nothing
lost, nothing doubled). Prints a markdown table and writes JSON to benchmarks/results/serve_load.json.
Not a test: it measures, it never gates CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
from machine import describe, machine
import socket
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import uvicorn

from doratweet.predict import SentimentClassifier, adapter_folder
from doratweet.serve import create_app

TWEETS = ["I love this phone, best purchase ever", "worst service I have ever had", "The meeting is at 5pm",
          "so happy with the new update :)", "this traffic is terrible and I am late", "New episode airs Friday"]


class CountingClassifier:
    def __init__(self, inner):
        self.inner, self.base_model_id, self.texts = inner, inner.base_model_id, 0

    def predict_proba(self, texts):
        self.texts += len(texts)
        return self.inner.predict_proba(texts)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


async def load(url: str, clients: int, seconds: float) -> dict:
    latencies, errors, sent = [], 0, 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int, http: httpx.AsyncClient):
        nonlocal errors, sent
        i = index
        while time.perf_counter() < stop_at:
            sent += 1
            started = time.perf_counter()
            try:
                response = await http.post("/v1/classify", json={"texts": [TWEETS[i % len(TWEETS)]]})
                ok = response.status_code == 200 and len(response.json()["results"]) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else None  # noqa: E731
    return {"clients": clients, "requests": sent, "ok": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(pick(0.50), 1) if latencies else None, "p99_ms": round(pick(0.99), 1) if latencies else None,
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="run folder or adapter folder to serve")
    parser.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    parser.add_argument("--clients", default="1,8,64", help="concurrent client counts (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each cell (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32, help="--max-batch with batching on (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="--max-wait-ms (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json", help="JSON file (default: %(default)s)")
    args = parser.parse_args(argv)

    adapter = adapter_folder(args.path)
    classifier = SentimentClassifier.load(args.path, model=args.model)
    classifier.predict_proba(TWEETS)  # warm-up outside the measurement
    rows = []
    for batching, max_batch in (("on", args.max_batch), ("off", 1)):
        for clients in (int(c) for c in args.clients.split(",")):
            counting = CountingClassifier(classifier)
            app = create_app(counting, adapter_dir=adapter, max_batch=max_batch, max_wait_ms=args.max_wait_ms,
                             max_texts=256, queue_size=4096)
            server, thread, url = start_server(app)
            cell = asyncio.run(load(url, clients, args.seconds))
            server.should_exit = True
            thread.join(10)
            stats = app.state.batcher.stats
            cell.update(batching=batching, max_batch=max_batch, forward_passes=stats.forward_passes,
                        mean_batch=round(stats.texts / max(stats.forward_passes, 1), 2),
                        texts_classified=counting.texts,
                        nothing_lost=cell["errors"] == 0 and cell["ok"] == cell["requests"] == counting.texts)
            rows.append(cell)
            print(f"batching {batching:3} clients {clients:3}: {cell['throughput_rps']} req/s, "
                  f"p50 {cell['p50_ms']} ms, p99 {cell['p99_ms']} ms, errors {cell['errors']}", file=sys.stderr)

    header = "| batching | clients | requests | errors | nothing lost | req/s | p50 ms | p99 ms | mean batch |"
    print(header + "\n|" + "---|" * 9)
    for r in rows:
        print(f"| {r['batching']} (max-batch {r['max_batch']}) | {r['clients']} | {r['requests']} | {r['errors']} | "
              f"{'yes' if r['nothing_lost'] else 'NO'} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['mean_batch']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "command": " ".join(sys.argv), "adapter": str(adapter),
                               "base_model_id": classifier.base_model_id, "platform": platform.platform(),
                               "machine": machine(), "seconds_per_cell": args.seconds,
                               "max_wait_ms": args.max_wait_ms, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0 if all(r["nothing_lost"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
