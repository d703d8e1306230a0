"""One training step (forward, backward, AdamW) of PEFT LoRA, PEFT DoRA, our LoRA and our DoRA, side by side.

Random-weight LLaMA-shaped models, adapters on all 7 linear projections, r=16, alpha=32, dropout 0, the same
batch and loss (full-vocabulary cross-entropy on every token, as PEFT users train) for all four, in one
process. Prints a table and writes JSON. Not a test.

    python benchmarks/dora_step.py            # GPU: three shapes, batch 64 x 96, bf16 base weights
    python benchmarks/dora_step.py --small    # CPU: SmolLM2 shape, batch 16 x 64, fp32
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from datetime import date

import torch
from machine import describe, machine, save_report

from doratweet.adapters import DEFAULT_TARGETS, add_adapters, adapter_parameters

SHAPES = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "~300M": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False),
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
METHODS = ("peft-lora", "peft-dora", "ours-lora", "ours-dora")


def build(shape: str, method: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=512)).to(device=device, dtype=dtype)
    if method.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                            use_dora=method == "peft-dora")
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        add_adapters(model, method=method.split("-")[1], rank=16, alpha=32, dropout=0.0)
        params = adapter_parameters(model)
    return model.train(), params


def time_steps(model, params, batch, device, use_bf16: bool, warmup: int, steps: int) -> dict:
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"ms": round(ms, 1), "tokens_per_s": round(batch.numel() / ms * 1000, 1),
            "peak_mib": round(peak) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized run (default: off)")
    parser.add_argument("--shapes", default=None, help="comma-separated shapes (default: all, or SmolLM2 with --small)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 64, 16 with --small)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 96, 64 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20, 5 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5, 2 with --small)")
    parser.add_argument("--out", default="benchmarks/results/dora_step.json", help="JSON output (default: %(default)s)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    shapes = args.shapes.split(",") if args.shapes else (["SmolLM2-135M"] if small else list(SHAPES))
    batch_size, seq = args.batch or (16 if small else 64), args.seq or (64 if small else 96)
    steps, warmup = args.steps or (5 if small else 20), args.warmup or (2 if small else 5)
    # GPU: bf16 base weights + autocast, as in ANCHORS.md; CPU: fp32 like the CPU anchor.
    dtype, use_bf16 = (torch.bfloat16, True) if device.type == "cuda" else (torch.float32, False)

    rows = []
    for shape in shapes:
        batch = torch.randint(0, SHAPES[shape]["vocab_size"], (batch_size, seq), device=device,
                              generator=torch.Generator(device=device).manual_seed(0))
        results = {}
        for method in METHODS:
            model, params = build(shape, method, device, dtype)
            results[method] = time_steps(model, params, batch, device, use_bf16, warmup, steps)
            print(f"{shape:>15} {method:>10}: {results[method]}", flush=True)
            del model, params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append({
            "shape": shape, "batch": f"{batch_size}x{seq}", **{m: results[m] for m in METHODS},
            "ours_dora_over_ours_lora": round(results["ours-dora"]["ms"] / results["ours-lora"]["ms"], 3),
            "peft_dora_over_ours_dora": round(results["peft-dora"]["ms"] / results["ours-dora"]["ms"], 3),
            "peft_dora_over_peft_lora": round(results["peft-dora"]["ms"] / results["peft-lora"]["ms"], 3),
        })

    facts = machine()
    device_name = describe(facts)
    report = {"device": device_name, "machine": facts, "date": date.today().isoformat(), "torch": torch.__version__,
              "precision": "bf16 weights + autocast" if use_bf16 else "fp32", "steps": steps, "rows": rows}
    save_report(args.out, report)
    print(f"\n{device_name}, {report['precision']}, median of {steps} steps\n")
    print("| shape | batch | PEFT LoRA ms | PEFT DoRA ms | ours LoRA ms | ours DoRA ms | ours DoRA/LoRA | PEFT DoRA/ours DoRA | ours DoRA tok/s | peak MiB (PEFT LoRA / PEFT DoRA / ours DoRA) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peaks = " / ".join(str(r[m]["peak_mib"]) for m in ("peft-lora", "peft-dora", "ours-dora"))
        print(f"| {r['shape']} | {r['batch']} | {r['peft-lora']['ms']} | {r['peft-dora']['ms']} | {r['ours-lora']['ms']} | "
              f"{r['ours-dora']['ms']} | {r['ours_dora_over_ours_lora']:.2f}x | {r['peft_dora_over_ours_dora']:.2f}x | "
              f"{r['ours-dora']['tokens_per_s']} | {peaks} |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
