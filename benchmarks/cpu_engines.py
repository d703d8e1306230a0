"""Label scoring on the CPU by engine: doratweet's torch path against llama.cpp on the exported GGUF, on one adapter
and the first N test tweets, each engine in its own process (its own peak resident memory), in one run.

For each engine: tweets/s of label scoring (the log-likelihood of each of the three whole answers, never
unparseable), macro-F1, the share of labels equal to torch fp32's, peak RSS, and the time to build the engine's
model from the adapter (merge, and for llama.cpp the GGUF export).

Engines so far: torch fp32 (merged), torch bf16 (merged, fp32 output head: doratweet's default where bf16 is fast),
llama.cpp f16 and q8_0 (llama-cpp-python on `doratweet export --format gguf`). Issue 16 lists more (torch int8,
ONNX Runtime, OpenVINO, CTranslate2): not measured yet.

    python benchmarks/cpu_engines.py --data ../shared/data/tweeteval/sentiment --limit 2000

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

ENGINES = ("torch-fp32", "torch-bf16", "llama.cpp-f16", "llama.cpp-q8_0")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def measure(engine: str, data: str, limit: int, adapter: str | None) -> dict:
    import torch

    from doratweet.adapters import load_adapter
    from doratweet.data import load_split
    from doratweet.evaluate import inference_model, score_labels
    from doratweet.export import export, llama_cpp_label_scores
    from doratweet.models import load_base_model
    from doratweet.predict import adapter_folder
    from doratweet.prompts import make_prompt_format

    folder = adapter_folder(adapter)
    split = load_split(data, "test").head(limit)
    started = time.perf_counter()
    base = load_base_model()
    fmt = make_prompt_format(base.tokenizer)
    if engine.startswith("torch"):
        load_adapter(base.model, folder)
        model = inference_model(base.model, torch.device("cpu"), bf16=engine == "torch-bf16", copy=False)
        built = time.perf_counter() - started
        prompts = fmt.prompt_ids(split.texts)
        started = time.perf_counter()
        scores = score_labels(model, fmt, prompts, batch_size=32)
    else:
        quant = engine.split("-")[1]
        out = Path(tempfile.mkdtemp()) / f"model.{quant}.gguf"
        export(folder, out, "gguf", quant, progress=False)
        built = time.perf_counter() - started
        prompts = fmt.prompt_ids(split.texts)
        started = time.perf_counter()
        scores = llama_cpp_label_scores(out, fmt, prompts)
    seconds = time.perf_counter() - started
    return {"engine": engine, "tweets_per_s": round(len(prompts) / seconds, 1), "build_s": round(built, 1),
            "labels": scores.argmax(1).tolist(), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tweeteval/sentiment")
    parser.add_argument("--limit", type=int, default=2000, help="first N test tweets (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="adapter or run folder (default: the shipped adapter)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--out", default="benchmarks/results/cpu_engines.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.data, args.limit, args.adapter)))
        return

    from machine import describe, machine, save_report

    from doratweet.data import load_split
    from doratweet.evaluate import classification_metrics

    labels = load_split(args.data, "test").head(args.limit).labels
    rows = []
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, "--one", engine, "--data", args.data, "--limit", str(args.limit)]
        child = subprocess.run(command + (["--adapter", args.adapter] if args.adapter else []), capture_output=True,
                               text=True, check=False)
        if child.returncode != 0:
            sys.exit(f"{engine} failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row["macro_f1"] = round(classification_metrics(labels, row["labels"])["macro_f1"], 4)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "labels"}, flush=True)
    reference = next((r["labels"] for r in rows if r["engine"] == "torch-fp32"), None)
    torch_default = next((r["tweets_per_s"] for r in rows if r["engine"] == "torch-bf16"), None)
    for row in rows:
        if reference is not None:
            row["same_labels_as_fp32"] = round(sum(a == b for a, b in zip(row["labels"], reference)) / len(reference), 4)
        del row["labels"]
    facts = machine()
    save_report(args.out, {"device": describe(facts), "machine": facts, "date": date.today().isoformat(),
                           "tweets": args.limit, "rows": rows})
    print(f"\n{describe(facts)}, {date.today()}: first {args.limit:,} test tweets\n")
    print("| engine | tweets/s | vs torch bf16 | macro-F1 | labels = torch fp32 | peak RSS MiB | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        versus = f"{r['tweets_per_s'] / torch_default:.2f}x" if torch_default else ""
        print(f"| {r['engine']} | {r['tweets_per_s']} | {versus} | {r['macro_f1']} | "
              f"{r.get('same_labels_as_fp32', '')} | {r['peak_rss_mb']} | {r['build_s']} |")


if __name__ == "__main__":
    main()
