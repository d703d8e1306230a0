"""Where a CPU training step's time goes, and what bf16 and torch.compile do to it: doratweet's own step
(`train.setup` + `train.train_step`) on the embedded model, adapters on the top K layers over the frozen-layer
cache (or all layers), batch 16 of real train tweets, each variant in its own process.

Variants:
  fp32                 the step in fp32
  bf16-autocast        autocast alone: every frozen weight cast to bf16 on every call
  bf16-held-sdpa       frozen weights held in bf16 (train.HalfWeights), attention by PyTorch's SDPA
  bf16                 what `--train-precision bf16` does on a CPU: weights held in bf16, eager attention
  bf16-compile         the same, each decoder layer through torch.compile(dynamic=True)

    python benchmarks/train_step_variants.py --data ../shared/data/tweeteval/sentiment --top 15
    python benchmarks/train_step_variants.py --data ... --top 15 --profile bf16-held-sdpa   # torch.profiler's top ops

Prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

VARIANTS = ("fp32", "bf16-autocast", "bf16-held-sdpa", "bf16", "bf16-compile")


def measure(variant: str, data: str, top: int, steps: int, warmup: int, profile: bool) -> dict:
    import torch

    from doratweet import train
    from doratweet.adapters import AdapterConfig, AdapterNotes
    from doratweet.config import TrainConfig
    from doratweet.data import load_data
    from doratweet.models import load_base_model
    from doratweet.prompts import make_prompt_format

    base = load_base_model("smollm2-135m")
    fmt = make_prompt_format(base.tokenizer)
    tweets = load_data(data)["train"].head(16 * (warmup + steps))
    config = TrainConfig(AdapterConfig(dropout=0.0, layers="all" if top == 30 else f"top:{top}"), batch_size=16,
                         lr=5e-4, bf16=variant != "fp32")
    session = train.setup(base.model, fmt, tweets, None, config, Path(tempfile.mkdtemp()), AdapterNotes(), None,
                          progress=False)
    if variant == "bf16-autocast":
        session.half_weights = None
    if session.half_weights is not None:
        session.half_weights.use(True)
        if variant == "bf16-held-sdpa":
            base.model.set_attn_implementation(session.half_weights.attention)
    if variant == "bf16-compile":
        decoder = session.frozen.top if session.frozen is not None else base.model.get_decoder()
        for index, layer in enumerate(decoder.layers):
            decoder.layers[index] = torch.compile(layer, dynamic=True)
    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as start_profile

        profiler = start_profile(activities=[ProfilerActivity.CPU])
    source = train.micro_batches_from(session, 0)
    base.model.train()
    seconds = []
    for step in range(warmup + steps):
        if profiler is not None and step == warmup:
            profiler.start()
        started = time.perf_counter()
        train.train_step(session, source)
        seconds.append(time.perf_counter() - started)
    result = {"variant": variant, "top": top, "s_per_step": round(sum(seconds[warmup:]) / steps, 3),
              "warmup_s": [round(s, 2) for s in seconds[:warmup]]}
    if profiler is not None:
        profiler.stop()
        result["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tweeteval/sentiment")
    parser.add_argument("--top", type=int, default=15, help="adapters on the top K layers, 30 for all (default: 15)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", choices=VARIANTS, help="profile one variant instead of timing them all")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process's job
    parser.add_argument("--out", default="benchmarks/results/train_step_variants.json")
    args = parser.parse_args()
    if args.one or args.profile:
        result = measure(args.one or args.profile, args.data, args.top, args.steps, args.warmup, bool(args.profile))
        print(result.pop("profile", ""))
        print(json.dumps(result))
        return

    from machine import describe, machine, save_report

    rows = []
    for variant in args.variants.split(","):
        child = subprocess.run([sys.executable, __file__, "--one", variant, "--data", args.data, "--top",
                                str(args.top), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            sys.exit(f"{variant} failed:\n{child.stderr[-3000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    fp32 = next(r["s_per_step"] for r in rows if r["variant"] == "fp32")
    facts = machine()
    save_report(args.out, {"device": describe(facts), "machine": facts, "date": date.today().isoformat(),
                           "top": args.top, "batch_size": 16, "steps": args.steps, "rows": rows})
    print(f"\n{describe(facts)}, {date.today()}: top {args.top} layers, batch 16, mean of {args.steps} steps after "
          f"{args.warmup}\n")
    print("| variant | s/step | fp32 / variant | warm-up steps s |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['s_per_step']} | {fp32 / row['s_per_step']:.2f}x | {row['warmup_s']} |")


if __name__ == "__main__":
    main()
