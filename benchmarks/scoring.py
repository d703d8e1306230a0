"""Where the time of score-mode evaluation goes, and how far it is from what this machine's matmuls allow.

Scores the first `--limit` test tweets with `doratweet.evaluate.score_labels` on the embedded model (merged,
bf16 where the CPU has it, fp32 output head: what `doratweet evaluate` runs) and reports:

- tweets/s (median of `--repeats`), and the split of that time between the transformer body and the
  vocabulary projection (forward hooks, so the measured code is the shipped code);
- the body's effective rate: its linear-layer FLOPs (2 x tokens fed x linear weights) over its time;
- the matmul bound: the same FLOPs at the rate `torch.nn.functional.linear` reaches alone on the body's
  weight shapes with as many rows as an average batch feeds, i.e. the tweets/s if attention, norms,
  activations and the head cost nothing;
- variants (`--variants`): eager attention instead of SDPA; two scoring streams in two Python threads with
  one torch thread each; `torch.compile` of the body (`--compile`, slow to compile). Variants are reported
  with the largest score difference to the default, since bf16 results depend on batch layout and kernels.

Prints a table and writes JSON. Not a test.

    python benchmarks/scoring.py --data ../shared/data/tweeteval/sentiment --limit 1024 --variants
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import numpy as np
import torch
from machine import describe, machine, save_report

from doratweet.data import load_split
from doratweet.evaluate import score_labels, split_model
from doratweet.evaluate import inference_model
from doratweet.hardware import default_device
from doratweet.models import load_base_model
from doratweet.prompts import make_prompt_format


class StageClock:
    """Seconds spent inside a module's forward and the tokens it was fed, via hooks."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self.tokens, self._start = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._enter, with_kwargs=True)
        module.register_forward_hook(self._leave)

    def _enter(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        self.tokens += ids.numel() if ids is not None else 0
        self._start = time.perf_counter()

    def _leave(self, module, args, output):
        self.seconds += time.perf_counter() - self._start

    def reset(self):
        self.seconds, self.tokens = 0.0, 0


def linear_shapes(decoder) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in decoder.modules() if isinstance(m, torch.nn.Linear)]


def matmul_rate(shapes: list[tuple[int, int]], rows: int, dtype, repeats: int = 20) -> float:
    """FLOP/s of F.linear alone over the body's weight shapes (each distinct shape weighted by its count)."""
    total_flops, total_seconds = 0.0, 0.0
    for (fan_in, fan_out), count in {s: shapes.count(s) for s in shapes}.items():
        x, w = torch.randn(rows, fan_in, dtype=dtype), torch.randn(fan_out, fan_in, dtype=dtype)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, w)
        total_seconds += (time.perf_counter() - start) / repeats * count
        total_flops += 2 * rows * fan_in * fan_out * count
    return total_flops / total_seconds


def timed_scores(score, n: int, repeats: int) -> tuple[float, np.ndarray]:
    rates, scores = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        scores = score()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/tweeteval/sentiment")
    parser.add_argument("--limit", type=int, default=1024, help="first N test tweets (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", action="store_true", help="also time eager attention and two streams")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the body (minutes)")
    parser.add_argument("--out", default="benchmarks/results/scoring.json")
    args = parser.parse_args()

    device = default_device()
    base = load_base_model("smollm2-135m", device=device)
    model = inference_model(base.model, device, copy=False)
    fmt = make_prompt_format(base.tokenizer)
    prompts = fmt.prompt_ids(load_split(args.data, "test").head(args.limit).texts)
    n = len(prompts)
    decoder, head = split_model(model)
    dtype = next(decoder.parameters()).dtype

    def score(m=model):
        return score_labels(m, fmt, prompts, args.batch_size)

    score_labels(model, fmt, prompts[:64], args.batch_size)  # warm-up
    body, projection = StageClock(decoder), StageClock(head)
    tweets_per_s, reference = timed_scores(score, n, args.repeats)
    calls = args.repeats
    body_seconds, head_seconds = body.seconds / calls, projection.seconds / calls
    tokens = body.tokens // calls
    shapes = linear_shapes(decoder)
    flops = 2 * tokens * sum(i * o for i, o in shapes)
    batches = -(-n // args.batch_size)
    rate = matmul_rate(shapes, rows=tokens // batches, dtype=dtype)
    total_seconds = n / tweets_per_s
    report = {
        "date": date.today().isoformat(), "device": str(device), "machine": machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "tweets": n, "batch_size": args.batch_size, "dtype": str(dtype),
        "tweets_per_s": round(tweets_per_s, 1), "tokens_fed_per_tweet": round(tokens / n, 1),
        "seconds": {"total": round(total_seconds, 2), "body": round(body_seconds, 2), "head": round(head_seconds, 2),
                    "outside": round(total_seconds - body_seconds - head_seconds, 2)},
        "body_gflops_per_s": round(flops / body_seconds / 1e9), "linear_alone_gflops_per_s": round(rate / 1e9),
        "matmul_bound_tweets_per_s": round(n / (flops / rate), 1), "variants": {},
    }

    def variant(name, run):
        rate_, scores = timed_scores(run, n, args.repeats)
        report["variants"][name] = {"tweets_per_s": round(rate_, 1),
                                    "max_score_difference": float(np.abs(scores - reference).max()),
                                    "labels_equal": float((scores.argmax(1) == reference.argmax(1)).mean())}

    if args.variants:
        model.set_attn_implementation("eager")
        variant("eager attention", score)
        model.set_attn_implementation("sdpa")
        threads = torch.get_num_threads()

        def two_streams():
            torch.set_num_threads(1)
            try:
                halves = [prompts[0::2], prompts[1::2]]
                with ThreadPoolExecutor(2) as pool:
                    parts = list(pool.map(lambda p: score_labels(model, fmt, p, args.batch_size), halves))
            finally:
                torch.set_num_threads(threads)
            merged = np.zeros((n, parts[0].shape[1]))
            merged[0::2], merged[1::2] = parts
            return merged

        variant("two 1-thread streams", two_streams)
    if args.compile:
        start = time.perf_counter()
        compiled = torch.compile(decoder, dynamic=True)
        model.get_decoder = lambda: compiled  # score_labels finds the body through get_decoder
        score_labels(model, fmt, prompts[:64], args.batch_size)
        report["compile_seconds"] = round(time.perf_counter() - start, 1)
        variant("torch.compile (inductor, dynamic)", score)

    print(f"{n} test tweets, batch {args.batch_size}, {dtype}, {device}; {describe(report['machine'])}")
    print("| what | value |\n| --- | --- |")
    for key in ("tweets_per_s", "tokens_fed_per_tweet", "body_gflops_per_s", "linear_alone_gflops_per_s",
                "matmul_bound_tweets_per_s"):
        print(f"| {key} | {report[key]} |")
    for key, value in report["seconds"].items():
        print(f"| seconds {key} | {value} |")
    for name, v in report["variants"].items():
        print(f"| {name} | {v['tweets_per_s']} tweets/s, max score difference {v['max_score_difference']:.3g}, "
              f"labels equal {v['labels_equal']:.3f} |")
    save_report(args.out, report)
    print(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
