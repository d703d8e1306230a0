"""Training-step time of our DoRA on the embedded model in three precisions, to decide whether CPU training
should use bf16: fp32 (the CPU default), bf16 autocast over fp32 weights (the CUDA default), and bf16 autocast
over frozen base weights stored in bf16 (adapters stay fp32).

Each precision runs in its own process (fresh model, same seed, same batches of real train tweets), since bf16
kernels and caches would otherwise colour the next measurement. Prints a table and writes JSON. Not a test.

    python benchmarks/train_precision.py --data ../shared/data/tweeteval/sentiment --steps 8
    python benchmarks/train_precision.py --profile fp32 --steps 5   # torch.profiler's top ops for steps 3-5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from machine import describe, machine

PRECISIONS = ("fp32", "bf16 autocast", "bf16 weights + autocast")


def measure(precision: str, data: str, steps: int, batch_size: int, profiler=None) -> dict:
    from doratweet.adapters import DEFAULT_TARGETS, add_adapters, adapter_parameters
    from doratweet.data import load_split
    from doratweet.evaluate import common_prefix
    from doratweet.models import load_base_model
    from doratweet.prompts import make_prompt_format
    from doratweet.train import answer_loss, encode_split, epoch_batches, right_pad

    base = load_base_model("smollm2-135m")
    fmt = make_prompt_format(base.tokenizer)
    examples = encode_split(fmt, load_split(data, "train").head(batch_size * steps))
    batches = epoch_batches([len(ids) for ids, _ in examples], batch_size, seed=0, epoch=0)
    prefix = common_prefix(fmt, [ids for ids, _ in examples])
    model = base.model
    torch.manual_seed(0)
    add_adapters(model, method="dora", rank=16, alpha=32, dropout=0.0, targets=DEFAULT_TARGETS)
    if precision == "bf16 weights + autocast":
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=5e-4)
    model.train()
    seconds, losses = [], []
    for step, batch in enumerate(batches):
        if profiler is not None and step == 2:  # the first two steps warm up kernels and allocator
            profiler.start()
        rows = [(examples[i][0][len(prefix):], examples[i][1][len(prefix):]) for i in batch]
        ids, targets, mask = right_pad(rows, fmt.tokenizer.pad_token_id, "cpu")
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            loss = answer_loss(model, ids, targets, mask, prefix)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    if profiler is not None:
        profiler.stop()
    timed = seconds[2:] or seconds  # the first two steps warm up kernels and allocator
    return {"precision": precision, "s_per_step": round(sum(timed) / len(timed), 3), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/tweeteval/sentiment")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--one", choices=PRECISIONS, help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--profile", choices=PRECISIONS, help="profile one precision instead of timing all three")
    parser.add_argument("--out", default="benchmarks/results/train_precision.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.data, args.steps, args.batch_size)))
        return
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        print(measure(args.profile, args.data, args.steps, args.batch_size, profiler))
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    rows = []
    for precision in PRECISIONS:
        child = subprocess.run([sys.executable, __file__, "--one", precision, "--data", args.data, "--steps",
                                str(args.steps), "--batch-size", str(args.batch_size)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    fp32 = rows[0]["s_per_step"]
    facts = machine()
    print(f"embedded SmolLM2-135M, DoRA r=16 on all 7 linears, batch {args.batch_size}, mean of steps 3-{args.steps}; "
          f"{describe(facts)}\n")
    print("| precision | s/step | vs fp32 | losses |\n| --- | --- | --- | --- |")
    for row in rows:
        row["vs_fp32"] = round(row["s_per_step"] / fp32, 2)
        print(f"| {row['precision']} | {row['s_per_step']} | {row['vs_fp32']}x | {row['losses']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date.today().isoformat(), "machine": facts, "threads": torch.get_num_threads(),
                               "batch_size": args.batch_size, "steps": args.steps, "rows": rows}, indent=2) + "\n")
    print(f"\nJSON in {out}")


if __name__ == "__main__":
    main()
