"""Can int8 lift the CPU's scoring bound? The body's seven linear shapes (SmolLM2-135M: hidden 576, kv 192, MLP
1,536), at an average scoring batch's row count, timed in bf16 (what scoring uses now), fp32, torch's dynamic int8
(`torch.ao.quantization.quantize_dynamic`, the x86 quantized engine) and a raw int8 x int8 -> int32 matmul
(`torch._int_mm`, the floor of any int8 engine built on torch), in one process, each shape in turn.

    python benchmarks/int8_linears.py [--rows 1126] [--repeats 30]

Prints GFLOP/s per variant and writes benchmarks/results/int8_linears.json with the CPU recorded. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from datetime import date
from pathlib import Path

import torch

from machine import describe, machine

SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}  # (in, out)


def rate(run, flops: float, repeats: int) -> float:
    for _ in range(3):
        run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return flops * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1126, help="rows of the activations (tokens in a batch)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8_linears.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")  # torch.ao.quantization's deprecation notices
    totals = {"fp32": 0.0, "bf16": 0.0, "dynamic int8": 0.0, "int8 x int8 (_int_mm)": 0.0}
    flops_total = 0.0
    per_shape = {}
    with torch.inference_mode():
        for name, (n_in, n_out) in SHAPES.items():
            x = torch.randn(args.rows, n_in)
            linear = torch.nn.Linear(n_in, n_out, bias=False)
            flops = 2.0 * args.rows * n_in * n_out
            x16, w16 = x.bfloat16(), linear.weight.detach().bfloat16()
            dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                             dtype=torch.qint8)
            x8 = torch.randint(-127, 127, (args.rows, n_in), dtype=torch.int8)
            w8 = torch.randint(-127, 127, (n_in, n_out), dtype=torch.int8)
            rates = {
                "fp32": rate(lambda: torch.nn.functional.linear(x, linear.weight), flops, args.repeats),
                "bf16": rate(lambda: torch.nn.functional.linear(x16, w16), flops, args.repeats),
                "dynamic int8": rate(lambda: dynamic(x), flops, args.repeats),
                "int8 x int8 (_int_mm)": rate(lambda: torch._int_mm(x8, w8), flops, args.repeats),
            }
            per_shape[name] = {k: round(v, 1) for k, v in rates.items()}
            for k, v in rates.items():
                totals[k] += flops / v  # seconds-weighted: the body's mix of shapes
            flops_total += flops
    overall = {k: round(flops_total / seconds, 1) for k, seconds in totals.items()}
    result = {"date": date.today().isoformat(), "machine": machine(), "torch": torch.__version__,
              "quantized_engine": torch.backends.quantized.engine, "threads": torch.get_num_threads(),
              "rows": args.rows, "gflops_per_s": overall, "per_shape": per_shape}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{describe(result['machine'])}: GFLOP/s over the body's seven shapes, {args.rows} rows")
    print("| variant | GFLOP/s | vs bf16 |\n| --- | --- | --- |")
    for k, v in overall.items():
        print(f"| {k} | {v} | {v / overall['bf16']:.2f}x |")


if __name__ == "__main__":
    main()
