"""Label scoring on the CPU by engine: doratweet's torch path against other inference engines, on one adapter and the
first N test tweets, each engine in its own process (its own peak resident memory), in one run.

For each engine: tweets/s of label scoring (the log-likelihood of each of the three whole answers, never
unparseable), macro-F1, the share of labels equal to torch fp32's, peak RSS, and the time to build the engine's
model from the adapter (merge, and for llama.cpp the GGUF export).

Engines: torch fp32 (merged), torch bf16 (merged, fp32 output head: doratweet's default where bf16 is fast), torch
int8 (`quantize_dynamic` of the body's linears, x86 backend), llama.cpp f16 and q8_0 (llama-cpp-python on
`doratweet export --format gguf`), OpenVINO (f32, bf16, and int8 weights by NNCF with bf16 or dynamically quantised
activations), ONNX Runtime (f32, and int8 by its dynamic quantisation) and CTranslate2 (float32, int8). OpenVINO and ONNX Runtime run the
transformer body as a graph converted from the merged fp32 model, with the shared prompt prefix's keys and values in
it as constants; they get exactly the inputs doratweet's own body gets (`evaluate.scoring_batches`) and doratweet's
fp32 head reads their output (`evaluate.answer_log_likelihoods`), so only the body's arithmetic differs.

    python benchmarks/cpu_engines.py --data ../shared/data/tweeteval/sentiment --limit 2000

OpenVINO, NNCF, ONNX Runtime, onnx, onnxscript and CTranslate2 are not doratweet requirements: put them on
PYTHONPATH (`pip install --target DIR openvino nncf onnxruntime onnx onnxscript ctranslate2`).

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

ENGINES = ("torch-fp32", "torch-bf16", "torch-int8", "llama.cpp-f16", "llama.cpp-q8_0", "openvino-f32", "openvino-bf16",
           "openvino-int8w-bf16", "openvino-int8w-dq", "onnxruntime-f32", "onnxruntime-int8", "ctranslate2-float32",
           "ctranslate2-int8")


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
    if engine.startswith("ctranslate2"):
        load_adapter(base.model, folder)
        model = inference_model(base.model, torch.device("cpu"), bf16=False, copy=False)
        prompts = fmt.prompt_ids(split.texts)
        score = ctranslate2_scorer(model, base.tokenizer, fmt, prompts, engine.split("-", 1)[1])
        built = time.perf_counter() - started
        started = time.perf_counter()
        scores = score()
    elif engine.startswith(("openvino", "onnxruntime")):
        load_adapter(base.model, folder)
        model = inference_model(base.model, torch.device("cpu"), bf16=False, copy=False)
        prompts = fmt.prompt_ids(split.texts)
        kind, variant = engine.split("-", 1)
        scorer = openvino_scorer if kind == "openvino" else onnxruntime_scorer
        score = scorer(BodyAfterPrefix(model, fmt, prompts), variant)
        built = time.perf_counter() - started
        started = time.perf_counter()
        scores = score()
    elif engine.startswith("torch"):
        load_adapter(base.model, folder)
        model = inference_model(base.model, torch.device("cpu"), bf16=engine == "torch-bf16", copy=False)
        if engine == "torch-int8":  # the body's linears with int8 weights, activations quantised per call (x86)
            torch.backends.quantized.engine = "x86"
            torch.ao.quantization.quantize_dynamic(model.get_decoder(), {torch.nn.Linear}, dtype=torch.qint8,
                                                   inplace=True)
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


class BodyAfterPrefix:
    """The merged model's transformer body as a function of (ids, mask, positions) -> hidden states, with the
    prompts' shared prefix's keys/values in it as constants: what an engine other than torch is converted from."""

    def __init__(self, model, fmt, prompts: list[list[int]]):
        import torch

        from doratweet.evaluate import AnswerBranches, common_prefix, scoring_batches, split_model

        self.fmt, self.prompts = fmt, prompts
        decoder, self.head = split_model(model)
        prefix = common_prefix(fmt, prompts)
        with torch.no_grad():
            prefix_cache = decoder(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        self.module = _Body(decoder, prefix_cache).eval()
        self.branches = AnswerBranches.of(fmt.answer_ids, "cpu")
        self.prefix_len = len(prefix)
        self.rests = [p[len(prefix):] for p in prompts]
        self.example = next(scoring_batches(fmt, self.rests[:4], len(prefix), self.branches, 4, torch.float32, "cpu"))

    def scores(self, run_body, batch_size: int = 32):
        """Label scores of the prompts, the body run by `run_body(ids, mask, positions) -> hidden` (numpy)."""
        import numpy as np
        import torch

        from doratweet.evaluate import answer_log_likelihoods, scoring_batches

        scores = np.zeros((len(self.prompts), len(self.fmt.answer_ids)), dtype=np.float64)
        for batch in scoring_batches(self.fmt, self.rests, self.prefix_len, self.branches, batch_size, torch.float32,
                                     "cpu"):
            hidden = run_body(batch.input_ids.numpy(), batch.attention_mask.numpy(), batch.position_ids.numpy())
            with torch.no_grad():
                scores[batch.rows] = answer_log_likelihoods(self.head, torch.from_numpy(np.array(hidden)), batch,
                                                            self.branches).double().numpy()
        return scores


def _Body(decoder, prefix_cache):
    import torch
    from transformers import DynamicCache

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder
            for i, layer in enumerate(prefix_cache.layers):
                self.register_buffer(f"keys{i}", layer.keys.clone())
                self.register_buffer(f"values{i}", layer.values.clone())

        def forward(self, input_ids, attention_mask, position_ids):
            cache = DynamicCache(config=self.decoder.config)
            for i, layer in enumerate(cache.layers):  # filled directly: an empty layer would start with a 0-d cat
                keys, values = getattr(self, f"keys{i}"), getattr(self, f"values{i}")
                layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
                layer.keys = keys.expand(input_ids.shape[0], -1, -1, -1)
                layer.values = values.expand(input_ids.shape[0], -1, -1, -1)
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=cache, use_cache=True).last_hidden_state

    return Body()


def openvino_scorer(body: BodyAfterPrefix, variant: str):
    """OpenVINO's CPU plugin on the body: f32, bf16 (AMX / AVX-512 BF16), or int8 weights (NNCF, asymmetric, per
    channel) with bf16 activations or activations quantised per row at run time."""
    import openvino as ov
    import torch

    example = body.example
    with torch.no_grad():
        graph = ov.convert_model(body.module, example_input=(example.input_ids, example.attention_mask,
                                                             example.position_ids),
                                 input=[ov.PartialShape([-1, -1]), ov.PartialShape([-1, 1, -1, -1]),
                                        ov.PartialShape([-1, -1])])
    settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": "f32" if variant == "f32" else "bf16"}
    if variant.startswith("int8w"):
        import nncf

        graph = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
        settings["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0 if variant == "int8w-bf16" else 2**32 - 1
    request = ov.Core().compile_model(graph, "CPU", settings).create_infer_request()
    return lambda: body.scores(lambda ids, mask, positions: request.infer([ids, mask, positions])[0])


def onnxruntime_scorer(body: BodyAfterPrefix, variant: str):
    """ONNX Runtime's CPU provider on the body exported by torch.onnx (dynamo): f32, or int8 by its dynamic
    quantisation (int8 weights per channel, activations quantised per tensor at run time)."""
    import tempfile

    import onnxruntime as ort
    import torch

    folder = Path(tempfile.mkdtemp())
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2)
    example = body.example
    torch.onnx.export(body.module, (example.input_ids, example.attention_mask, example.position_ids),
                      folder / "body.onnx", input_names=["input_ids", "attention_mask", "position_ids"],
                      output_names=["hidden"], dynamo=True, external_data=True,
                      dynamic_shapes=({0: batch, 1: seq}, {0: batch, 2: seq, 3: seq + body.prefix_len},
                                      {0: batch, 1: seq}))
    path = folder / "body.onnx"
    if variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(path, folder / "body.int8.onnx", weight_type=QuantType.QInt8, per_channel=True)
        path = folder / "body.int8.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: body.scores(lambda ids, mask, positions: session.run(
        None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})[0])


def ctranslate2_scorer(model, tokenizer, fmt, prompts: list[list[int]], compute_type: str):
    """CTranslate2 on the merged model (converted from a transformers folder; this build offers float32 and int8 on
    CPUs, no bf16). Its `score_batch` gives each token's log-probability after the tokens before it, but takes whole
    sequences: every tweet is scored as three sequences, prompt + answer, with no shared prefix and no branches."""
    import tempfile

    import ctranslate2
    import numpy as np
    import torch
    from ctranslate2.converters import TransformersConverter

    folder = Path(tempfile.mkdtemp())
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    TransformersConverter(str(folder / "hf")).convert(str(folder / "ct2"), quantization=compute_type)
    generator = ctranslate2.Generator(str(folder / "ct2"), device="cpu", compute_type=compute_type,
                                      intra_threads=torch.get_num_threads())
    answers = fmt.answer_ids

    def score():
        sequences = [tokenizer.convert_ids_to_tokens(prompt + answer) for prompt in prompts for answer in answers]
        results = generator.score_batch(sequences, max_batch_size=32 * len(answers))
        return np.array([sum(result.log_probs[-len(answers[i % len(answers)]):]) for i, result in enumerate(results)],
                        dtype=np.float64).reshape(len(prompts), len(answers))

    return score


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
