"""Training speed of adapters on the top K decoder layers (`--layers top:K`), with and without the cache of the
frozen layers below them, against today's all-layer training and PEFT's DoRA on the same layers, in one process.

Every variant trains DoRA r=16, alpha=32 on all 7 projections of its layers, dropout 0, batch 16, on the same
tweets in the same batches (doratweet's own training loop, `train.train`, for ours; for PEFT what a PEFT user
writes: `get_peft_model(LoraConfig(use_dora=True, layers_to_transform=...))` and `model(labels=...)`, which runs
every layer every step). The first steps are warm-up and not timed. The cache is built once per K on the tweets
used; its build time and size are reported per tweet and for the whole train split (measured rate x 45,615).
Prints a table and writes JSON. Not a test.

    python benchmarks/layers.py                      # CPU: 20 timed steps a variant, K = 15 and 8
    python benchmarks/layers.py --steps 50 --tops 15,8,4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from machine import describe, machine, save_report

from doratweet.adapters import DEFAULT_TARGETS, AdapterConfig
from doratweet.config import TrainConfig
from doratweet.data import load_data
from doratweet.models import load_base_model
from doratweet.prompts import make_prompt_format
from doratweet.train import encode_split, epoch_batches, right_pad

TRAIN_SPLIT = 45_615


def time_ours(base, fmt, tweets, train: TrainConfig, warmup: int, steps: int) -> dict:
    """Seconds per step of doratweet's training loop (the steps after `warmup`), from its own log."""
    from doratweet.train import train as run_training

    model = load_base_model("smollm2-135m").model  # a fresh copy: each variant starts from the same weights
    out = Path(tempfile.mkdtemp())
    try:
        started = time.perf_counter()
        run_training(model, fmt, tweets, None, replace(train, max_steps=warmup + steps, log_every=1), out,
                     progress=False)
        total = time.perf_counter() - started
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    timed = log[warmup:]
    seconds = timed[-1]["elapsed_s"] - log[warmup - 1]["elapsed_s"]
    tokens = sum(line["tokens_per_s"] for line in timed) / len(timed)
    return {"s_per_step": round(seconds / steps, 3), "tokens_per_s": round(tokens, 1),
            "wall_s_including_setup": round(total, 1)}


def time_peft(base, fmt, tweets, layers: list[int] | None, batch_size: int, warmup: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    model = load_base_model("smollm2-135m").model  # a fresh copy: each variant starts from the same weights
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS), use_dora=True,
                        **({"layers_to_transform": layers, "layers_pattern": "layers"} if layers else {}))
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    examples = encode_split(fmt, tweets)
    batches = epoch_batches([len(ids) for ids, _ in examples], batch_size, seed=0, epoch=0)
    model.train()
    for index, batch in enumerate(batches[: warmup + steps]):
        if index == warmup:
            started = time.perf_counter()
        ids, targets, mask = right_pad([examples[i] for i in batch], fmt.tokenizer.pad_token_id, "cpu")
        model(input_ids=ids, attention_mask=mask, labels=targets).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"s_per_step": round((time.perf_counter() - started) / steps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="TweetEval data (default: $DORATWEET_DATA, else the Hub)")
    parser.add_argument("--tops", default="15,8", help="K values to measure (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps a variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/layers.json", help="JSON output (default: %(default)s)")
    args = parser.parse_args()

    batch_size = 16
    tweets = load_data(args.data)["train"].head(batch_size * (args.warmup + args.steps))
    base = load_base_model("smollm2-135m")
    fmt = make_prompt_format(base.tokenizer)
    quick = TrainConfig(AdapterConfig(dropout=0.0), batch_size=batch_size, lr=5e-4)
    cache_dir = tempfile.mkdtemp()
    os.environ["DORATWEET_CACHE"] = cache_dir  # a fresh cache: its build is measured, not found
    facts = machine()
    report = {"device": describe(facts), "machine": facts, "date": date.today().isoformat(), "tweets": len(tweets),
              "batch_size": batch_size, "timed_steps": args.steps, "variants": {}}
    variants = [("ours, all 30 layers", lambda: time_ours(base, fmt, tweets, quick, args.warmup, args.steps)),
                ("peft, all 30 layers", lambda: time_peft(base, fmt, tweets, None, batch_size, args.warmup, args.steps))]
    layer_count = base.model.config.num_hidden_layers
    for top in (int(k) for k in args.tops.split(",")):
        adapter = replace(quick.adapter, layers=f"top:{top}")
        variants += [
            (f"ours, top {top}, frozen layers run each step",
             lambda a=adapter: time_ours(base, fmt, tweets, replace(quick, adapter=a, cache_frozen=False),
                                         args.warmup, args.steps)),
            (f"ours, top {top}, frozen layers cached",
             lambda a=adapter: cached_variant(base, fmt, tweets, replace(quick, adapter=a), args, cache_dir)),
            (f"peft, top {top} (layers_to_transform)",
             lambda t=top: time_peft(base, fmt, tweets, list(range(layer_count - t, layer_count)), batch_size,
                                     args.warmup, args.steps)),
        ]
    for name, measure in variants:
        report["variants"][name] = measure()
        print(name, report["variants"][name], flush=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    ours_all = report["variants"]["ours, all 30 layers"]["s_per_step"]
    peft_all = report["variants"]["peft, all 30 layers"]["s_per_step"]
    save_report(args.out, report)
    print(f"\n{report['device']}, {report['date']}: batch {batch_size}, {args.steps} timed steps a variant\n")
    print("| variant | s/step | vs ours, all layers | vs PEFT, same layers | cache build s/1k tweets | cache MB/1k tweets |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in report["variants"].items():
        same = peft_all if "all 30" in name else next(
            (v["s_per_step"] for n, v in report["variants"].items() if n.startswith("peft") and
             n.split(",")[1].split("(")[0].strip() == name.split(",")[1].strip()), None)
        versus_peft = f"{same / r['s_per_step']:.2f}x" if same and not name.startswith("peft") else ""
        build = r.get("cache", {})
        print(f"| {name} | {r['s_per_step']} | {ours_all / r['s_per_step']:.2f}x | {versus_peft} | "
              f"{build.get('build_s_per_1k_tweets', '')} | {build.get('mb_per_1k_tweets', '')} |")


def cached_variant(base, fmt, tweets, train: TrainConfig, args, cache_dir: str) -> dict:
    """The cache's build (timed alone, on these tweets), then training on it."""
    from doratweet.adapters import add_adapters
    from doratweet.frozen_layers import frozen_layers
    from doratweet.train import TrainingData

    model = load_base_model("smollm2-135m").model  # a fresh copy: each variant starts from the same weights
    add_adapters(model, train.adapter)
    data = TrainingData.of(fmt, tweets, share_prefix=True)
    started = time.perf_counter()
    frozen = frozen_layers(model, data.prefix, [ids for ids, _ in data.examples], fmt.tokenizer.pad_token_id,
                           Path(cache_dir) / "frozen-layers", progress=False)
    build = time.perf_counter() - started
    size = frozen.hidden.nbytes + frozen.prefix.numel() * 4
    timing = time_ours(base, fmt, tweets, train, args.warmup, args.steps)  # finds the cache just built
    per_1k = 1000 / len(tweets)
    timing["cache"] = {"build_s_per_1k_tweets": round(build * per_1k, 1),
                       "mb_per_1k_tweets": round(size / 2**20 * per_1k, 1),
                       "whole_train_split_build_min": round(build * TRAIN_SPLIT / len(tweets) / 60, 1),
                       "whole_train_split_gb": round(size * TRAIN_SPLIT / len(tweets) / 2**30, 2)}
    return timing


if __name__ == "__main__":
    main()
