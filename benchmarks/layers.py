"""A whole-split training epoch on the CPU: adapters on the top K decoder layers (`--layers top:K`) with the cache of
the frozen layers below them, in fp32 and in bf16, against today's all-layer training and PEFT's DoRA on the same
layers, in one run.

Every variant trains DoRA r=16, alpha=32 on all 7 projections of its layers, dropout 0, batch 16, on the same
tweets in the same batches: doratweet's own training loop (`train.train`) for ours; for PEFT what a PEFT user
writes, `get_peft_model(LoraConfig(use_dora=True, layers_to_transform=...))` and `model(labels=...)` in fp32, which
runs every layer every step. Each variant runs in its own process (fresh model, and its own peak resident memory);
the first steps warm up and are not timed. An epoch of the whole train split (45,615 tweets, 2,851 steps of 16) is
the measured seconds per step times 2,851; the cache is built once per K on the tweets used, and its build time
and size are given per 1,000 tweets and for the whole split (measured rate x 45,615). Prints a table and writes
JSON. Not a test.

    python benchmarks/layers.py                      # CPU: 15 timed steps a variant, K = 15 and 8
    python benchmarks/layers.py --steps 30 --tops 15,8,4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

TRAIN_SPLIT = 45_615
BATCH = 16


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def measure(variant: dict, data: str | None, warmup: int, steps: int) -> dict:
    """One variant, in this (child) process."""
    from doratweet.data import load_data
    from doratweet.models import load_base_model
    from doratweet.prompts import make_prompt_format

    tweets = load_data(data)["train"].head(BATCH * (warmup + steps))
    base = load_base_model("smollm2-135m")
    fmt = make_prompt_format(base.tokenizer)
    if variant["who"] == "peft":
        result = time_peft(base.model, fmt, tweets, variant["top"], warmup, steps)
    else:
        result = time_ours(base.model, fmt, tweets, variant, warmup, steps)
    return {**result, "peak_rss_mb": peak_rss_mb()}


def time_ours(model, fmt, tweets, variant: dict, warmup: int, steps: int) -> dict:
    """Seconds per step of doratweet's training loop (the steps after `warmup`), from its own log; the cache of the
    frozen layers is built first, timed on its own."""
    from doratweet.adapters import AdapterConfig, add_adapters
    from doratweet.config import TrainConfig
    from doratweet.frozen_layers import frozen_layers
    from doratweet.models import cache_root
    from doratweet.train import TrainingData

    layers = "all" if variant["top"] is None else f"top:{variant['top']}"
    config = TrainConfig(AdapterConfig(dropout=0.0, layers=layers), batch_size=BATCH, lr=5e-4, bf16=variant["bf16"],
                         max_steps=warmup + steps, log_every=1)
    result = {}
    if variant["top"] is not None:
        add_adapters(model, config.adapter)
        data = TrainingData.of(fmt, tweets, share_prefix=True)
        folder = cache_root() / "frozen-layers"
        before = set(folder.iterdir()) if folder.is_dir() else set()
        started = time.perf_counter()
        frozen = frozen_layers(model, data.prefix, [ids for ids, _ in data.examples], fmt.tokenizer.pad_token_id,
                               folder, progress=False)
        build = time.perf_counter() - started
        if set(folder.iterdir()) == before:  # made by an earlier variant (the cache is fp32 for either precision)
            return {**time_training(model, fmt, tweets, config, warmup, steps), "cache": {"reused": True}}
        size = frozen.hidden.nbytes + frozen.prefix.numel() * 4
        per_1k = 1000 / len(tweets)
        result["cache"] = {"build_s_per_1k_tweets": round(build * per_1k, 1),
                           "mb_per_1k_tweets": round(size / 2**20 * per_1k, 1),
                           "whole_train_split_build_min": round(build * TRAIN_SPLIT / len(tweets) / 60, 1),
                           "whole_train_split_gb": round(size * TRAIN_SPLIT / len(tweets) / 2**30, 2)}
    return {**result, **time_training(model, fmt, tweets, config, warmup, steps)}


def time_training(model, fmt, tweets, config, warmup: int, steps: int) -> dict:
    from doratweet.train import train as run_training

    out = Path(tempfile.mkdtemp())
    try:
        summary = run_training(model, fmt, tweets, None, config, out, progress=False)  # finds the cache built
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    timed = log[warmup:]
    seconds = (timed[-1]["elapsed_s"] - log[warmup - 1]["elapsed_s"]) / steps
    return {"s_per_step": round(seconds, 3), "precision": summary["precision"],
            "tokens_per_s": round(sum(line["tokens_per_s"] for line in timed) / len(timed), 1)}


def time_peft(model, fmt, tweets, top: int | None, warmup: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from doratweet.adapters import DEFAULT_TARGETS
    from doratweet.train import encode_split, epoch_batches, right_pad

    count = model.config.num_hidden_layers
    layers = {} if top is None else {"layers_to_transform": list(range(count - top, count)), "layers_pattern": "layers"}
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                                             use_dora=True, **layers))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    examples = encode_split(fmt, tweets)
    batches = epoch_batches([len(ids) for ids, _ in examples], BATCH, seed=0, epoch=0)
    model.train()
    for index, batch in enumerate(batches[: warmup + steps]):
        if index == warmup:
            started = time.perf_counter()
        ids, targets, mask = right_pad([examples[i] for i in batch], fmt.tokenizer.pad_token_id, "cpu")
        model(input_ids=ids, attention_mask=mask, labels=targets).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"s_per_step": round((time.perf_counter() - started) / steps, 3), "precision": "fp32"}


def name_of(variant: dict) -> str:
    layers = "all 30 layers" if variant["top"] is None else f"top {variant['top']}"
    if variant["who"] == "peft":
        return f"peft, {layers}, fp32" + (" (layers_to_transform)" if variant["top"] else "")
    cached = ", frozen layers cached" if variant["top"] else ""
    return f"ours, {layers}{cached}, {'bf16' if variant['bf16'] else 'fp32'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="TweetEval data (default: $DORATWEET_DATA, else the Hub)")
    parser.add_argument("--tops", default="15,8", help="K values to measure (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps a variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/layers.json", help="JSON output (default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's variant, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.data, args.warmup, args.steps)))
        return

    from machine import describe, machine, save_report

    tops = [int(k) for k in args.tops.split(",")]
    variants = [{"who": "ours", "top": None, "bf16": False}, {"who": "ours", "top": None, "bf16": True},
                {"who": "peft", "top": None, "bf16": False}]
    for top in tops:
        variants += [{"who": "ours", "top": top, "bf16": False}, {"who": "ours", "top": top, "bf16": True},
                     {"who": "peft", "top": top, "bf16": False}]
    cache_dir = tempfile.mkdtemp()
    env = {**os.environ, "DORATWEET_CACHE": cache_dir}  # a fresh cache: its build is measured, not found
    facts = machine()
    steps_per_epoch = math.ceil(TRAIN_SPLIT / BATCH)
    report = {"device": describe(facts), "machine": facts, "date": date.today().isoformat(), "batch_size": BATCH,
              "timed_steps": args.steps, "whole_split_steps": steps_per_epoch, "variants": {}}
    try:
        for variant in variants:
            command = [sys.executable, __file__, "--one", json.dumps(variant), "--steps", str(args.steps),
                       "--warmup", str(args.warmup)] + (["--data", args.data] if args.data else [])
            child = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if child.returncode != 0:
                sys.exit(f"{name_of(variant)} failed:\n{child.stderr[-3000:]}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["epoch_min"] = round(result["s_per_step"] * steps_per_epoch / 60, 1)
            report["variants"][name_of(variant)] = {**variant, **result}
            print(name_of(variant), result, flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    save_report(args.out, report)
    print_table(report)


def print_table(report: dict) -> None:
    rows = report["variants"]
    today = rows["ours, all 30 layers, fp32"]["s_per_step"]
    print(f"\n{report['device']}, {report['date']}: batch {report['batch_size']}, {report['timed_steps']} timed steps "
          f"a variant; epoch = {report['whole_split_steps']:,} steps (whole train split)\n")
    print("| variant | s/step | tokens/s | epoch min | vs ours all-layer fp32 | vs PEFT, same layers | peak RSS MiB | "
          "cache build min (whole split) | cache GB (whole split) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        peft = next(v["s_per_step"] for v in rows.values() if v["who"] == "peft" and v["top"] == r["top"])
        versus_peft = f"{peft / r['s_per_step']:.2f}x" if r["who"] == "ours" else ""
        cache = r.get("cache", {})
        if cache.get("reused"):
            cache = {"whole_train_split_build_min": "(the fp32 row's)", "whole_train_split_gb": "(the same)"}
        print(f"| {name} | {r['s_per_step']} | {r.get('tokens_per_s', '')} | {r['epoch_min']} | "
              f"{today / r['s_per_step']:.2f}x | {versus_peft} | {r['peak_rss_mb']} | "
              f"{cache.get('whole_train_split_build_min', '')} | {cache.get('whole_train_split_gb', '')} |")


if __name__ == "__main__":
    main()
