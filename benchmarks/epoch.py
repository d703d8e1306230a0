"""TweetEval training and test scoring with the embedded model: doratweet's pipeline vs the PEFT pipeline.

Both train DoRA (r=16, alpha=32, all 7 linear projections, dropout 0) on the same tweets, in the same
batches, with the same optimizer and schedule, from the same initial adapter weights, then score the test
tweets. The PEFT pipeline is what a PEFT user writes: `get_peft_model(use_dora=True)`, the full prompt +
answer through `model(labels=...)` (loss on the answer tokens), and scoring each of the three answers as a
full sequence. Ours: `doratweet.train.answer_loss` (shared prompt prefix computed once per batch, vocabulary
projection at answer positions only) and `score_labels` on merged weights (bf16 where the CPU has it).
Prints a table and writes JSON. Not a test.

    python benchmarks/epoch.py --train-limit 800 --test-limit 500     # CPU-sized
    python benchmarks/epoch.py                                        # whole train split and test split (GPU)
    python benchmarks/epoch.py --peft-steps 100   # PEFT's speed from its first 100 steps; ours the whole epoch

With `--peft-steps`, PEFT's tokens/s comes from the first steps of the same epoch (same batches), and its
test scores from that partly trained adapter, so its macro-F1 is not comparable (reported as null).
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import date

import numpy as np
import torch
from machine import describe, machine, save_report

from doratweet.adapters import DEFAULT_TARGETS, add_adapters, adapter_parameters
from doratweet.data import load_data
from doratweet.evaluate import classification_metrics, common_prefix, probabilities_from_scores, score_labels
from doratweet.evaluate import inference_model
from doratweet.hardware import default_device
from doratweet.models import load_base_model
from doratweet.prompts import IGNORE_INDEX, make_prompt_format
from doratweet.train import answer_loss, encode_split, epoch_batches, lr_factor, right_pad


def train_one_epoch(model, params, batches, step_fn, lr: float, device) -> dict:
    optimizer = torch.optim.AdamW(params, lr=lr)
    total, warmup = len(batches), max(1, round(0.03 * len(batches)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    use_bf16 = device.type == "cuda"
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, n = step_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += n
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "steps": len(batches)}


@torch.no_grad()
def peft_scores(model, fmt, prompts, batch_size: int, device) -> np.ndarray:
    """Each label's answer scored as a full sequence (prompt + answer), right-padded, full logits."""
    scores = np.zeros((len(prompts), 3))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [(p + a, [IGNORE_INDEX] * len(p) + a) for p in chunk for a in fmt.answer_ids]
        ids, targets, mask = right_pad(rows, fmt.tokenizer.pad_token_id, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        tgt = targets[:, 1:]
        token_logp = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (tgt != IGNORE_INDEX)
        scores[start : start + len(chunk)] = token_logp.sum(-1).view(len(chunk), 3).double().cpu().numpy()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="TweetEval data (default: $DORATWEET_DATA, else the Hub)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N train tweets (default: all)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test tweets (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 16 on CPU")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--peft-steps", type=int, default=None,
                        help="train PEFT's pipeline on only the first N batches, for its speed (default: the whole epoch)")
    parser.add_argument("--out", default="benchmarks/results/epoch.json", help="JSON output (default: %(default)s)")
    args = parser.parse_args()

    device = default_device()
    batch_size = args.batch_size or (64 if device.type == "cuda" else 16)
    splits = load_data(args.data)
    train_split, test = splits["train"].head(args.train_limit), splits["test"].head(args.test_limit)
    base = load_base_model("smollm2-135m", device=device)
    fmt = make_prompt_format(base.tokenizer)
    examples = encode_split(fmt, train_split)
    batches = epoch_batches([len(ids) for ids, _ in examples], batch_size, seed=0, epoch=0)
    prefix = common_prefix(fmt, [ids for ids, _ in examples])
    pad = fmt.tokenizer.pad_token_id

    torch.manual_seed(0)
    ours = copy.deepcopy(base.model)
    add_adapters(ours, method="dora", rank=16, alpha=32, dropout=0.0, targets=DEFAULT_TARGETS)
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(copy.deepcopy(base.model), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS), use_dora=True))
    with torch.no_grad():  # identical starting adapters
        for name, module in ours.named_modules():
            if hasattr(module, "magnitude"):
                layer = theirs.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(module.lora_A)

    def our_step(batch):
        rows = [(examples[i][0][len(prefix):], examples[i][1][len(prefix):]) for i in batch]
        ids, targets, mask = right_pad(rows, pad, device)
        return answer_loss(ours, ids, targets, mask, prefix), int(mask.sum()) + len(prefix) * len(batch)

    def peft_step(batch):
        ids, targets, mask = right_pad([examples[i] for i in batch], pad, device)
        return theirs(input_ids=ids, attention_mask=mask, labels=targets).loss, int(mask.sum())

    facts = machine()
    report = {"device": describe(facts), "machine": facts, "date": date.today().isoformat(), "train_tweets": len(train_split), "test_tweets": len(test),
              "batch_size": batch_size, "lr": args.lr}
    prompts = fmt.prompt_ids(test.texts)
    for name, model, step, params in (
        ("peft", theirs, peft_step, [p for p in theirs.parameters() if p.requires_grad]),
        ("ours", ours, our_step, adapter_parameters(ours)),
    ):
        partial = name == "peft" and args.peft_steps is not None and args.peft_steps < len(batches)
        training = train_one_epoch(model, params, batches[: args.peft_steps] if partial else batches, step, args.lr,
                                   device)
        model.eval()
        start = time.perf_counter()
        if name == "ours":
            scorer = inference_model(model, device)
            scores = score_labels(scorer, fmt, prompts, batch_size=64)
            precision = str(next(scorer.parameters()).dtype)
        else:
            scores = peft_scores(model, fmt, prompts, batch_size=max(1, 64 // 3), device=device)
            precision = "torch.float32 (unmerged)"
        seconds = time.perf_counter() - start
        metrics = classification_metrics(test.labels, probabilities_from_scores(scores).argmax(axis=1))
        report[name] = {"training": training, "scoring_seconds": round(seconds, 1),
                        "tweets_per_s": round(len(test) / seconds, 1), "scoring_precision": precision,
                        "macro_f1": None if partial else round(metrics["macro_f1"], 4),
                        "macro_recall": None if partial else round(metrics["macro_recall"], 4)}
        print(name, report[name], flush=True)
    report["training_speedup"] = round(report["ours"]["training"]["tokens_per_s"] / report["peft"]["training"]["tokens_per_s"], 2)
    report["scoring_speedup"] = round(report["ours"]["tweets_per_s"] / report["peft"]["tweets_per_s"], 2)
    save_report(args.out, report)
    print(f"\n{report['device']}, {report['date']}: {len(train_split)} train tweets (1 epoch, batch {batch_size}), "
          f"{len(test)} test tweets\n")
    print("| pipeline | train s | train tokens/s | test scoring tweets/s | macro-F1 | macro-recall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("peft", "ours"):
        r = report[name]
        f1, recall = (f"{r[k]:.3f}" if r[k] is not None else "(partial epoch)" for k in ("macro_f1", "macro_recall"))
        print(f"| {name} | {r['training']['seconds']} | {r['training']['tokens_per_s']} | {r['tweets_per_s']} | "
              f"{f1} | {recall} |")
    print(f"| ours / peft | | {report['training_speedup']}x | {report['scoring_speedup']}x | | |")


if __name__ == "__main__":
    main()
