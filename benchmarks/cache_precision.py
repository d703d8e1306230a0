"""What storing the frozen-layer cache in bf16 instead of fp32 would change: one training batch's loss and adapter
gradients with the cached hidden states rounded to bf16, against fp32 storage, beside what bf16 training itself
changes. Embedded model, adapters on the top K layers with a trained-looking update (B drawn, not zero), batch 16
of real train tweets. Prints JSON. Not a test.

    python benchmarks/cache_precision.py --data ../shared/data/tweeteval/sentiment --top 15
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tweeteval/sentiment")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/cache_precision.json")
    args = parser.parse_args()

    import numpy as np
    import torch
    from machine import describe, machine, save_report

    from doratweet import train
    from doratweet.adapters import AdapterConfig, AdapterNotes
    from doratweet.config import TrainConfig
    from doratweet.data import load_data
    from doratweet.models import load_base_model
    from doratweet.prompts import make_prompt_format

    base = load_base_model("smollm2-135m")
    fmt = make_prompt_format(base.tokenizer)
    tweets = load_data(args.data)["train"].head(64)
    config = TrainConfig(AdapterConfig(dropout=0.0, layers=f"top:{args.top}"), batch_size=16, lr=5e-4, bf16=False)
    torch.manual_seed(0)
    session = train.setup(base.model, fmt, tweets, None, config, Path(tempfile.mkdtemp()), AdapterNotes(), None,
                          progress=False)
    with torch.no_grad():
        for parameter in session.params:
            if parameter.dim() == 2:
                parameter.normal_(0, 0.02)
    frozen, batch = session.frozen, list(range(16))
    fp32_hidden, fp32_prefix = np.asarray(frozen.hidden), frozen.prefix.clone()
    rounded_hidden = torch.from_numpy(fp32_hidden.copy()).to(torch.bfloat16).float().numpy()
    rounded_prefix = fp32_prefix.to(torch.bfloat16).to(fp32_prefix.dtype)

    def loss_and_gradient(hidden, prefix, bf16: bool):
        frozen.hidden, frozen.prefix = hidden, prefix
        for parameter in session.params:
            parameter.grad = None
        ids, targets, mask = train.right_pad([session.data.examples[i] for i in batch], fmt.tokenizer.pad_token_id,
                                             "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = train.frozen_answer_loss(base.model, frozen, batch, targets, mask)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in session.params])

    reference_loss, reference = loss_and_gradient(fp32_hidden, fp32_prefix, False)
    rows = {}
    for name, hidden, prefix, bf16 in (("bf16 cache, fp32 training", rounded_hidden, rounded_prefix, False),
                                       ("fp32 cache, bf16 autocast training", fp32_hidden, fp32_prefix, True)):
        loss, gradient = loss_and_gradient(hidden, prefix, bf16)
        rows[name] = {"loss_relative_difference": abs(loss - reference_loss) / reference_loss,
                      "gradient_relative_difference": float((gradient - reference).norm() / reference.norm())}
    facts = machine()
    report = {"device": describe(facts), "machine": facts, "date": date.today().isoformat(), "top": args.top,
              "fp32_loss": reference_loss, "against fp32 cache and training": rows}
    save_report(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
