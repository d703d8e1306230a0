"""`doratweet run`: evaluate the base model, fine-tune with DoRA, evaluate again, write the run folder.

The run folder (names in run_folder.py): adapter/ (PEFT format), metrics.json, predictions/test_{before,after}.txt
(one label id per line, TweetEval's format), train_log.jsonl, plots/, README.md (the model card).

Under torchrun every process trains (DDP); rank 0 alone evaluates before and after and writes the run folder,
while the others wait for it in training's first collective, and leave once training is done.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

from . import LABELS, distributed
from .adapters import AdapterNotes, load_adapter
from .checkpoints import checkpoint_folders
from .config import Round, RunConfig
from .data import Split, resolve_data_spec
from .errors import UserError
from .evaluate import Predictions, inference_model, predict, timed_predictions
from .hardware import environment
from .preparation import check_out_and_load_data, load_model_for_training
from .run_folder import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    METRICS_FILE,
    PREDICTION_FILES,
    PREDICTIONS_DIR,
    SUMMARY_FILE,
    round_folder,
    start_out_dir,
    write_json,
    write_label_ids,
)
from .train import load_trained_adapter, train

log = logging.getLogger("doratweet")


@distributed.process_group()  # under torchrun: this process's part of the job (see the module's docstring)
def run_pipeline(config: RunConfig) -> dict:
    from .report import public_name, write_report

    started = time.perf_counter()
    main = distributed.is_main_process()
    data = check_out_and_load_data(config, needed=("train", "test"), writes_card=True)
    rounds = slice_rounds(data.train, config.rounds)
    if config.train.fsdp and len(rounds) > 1:
        raise UserError(f"--fsdp: the {config.preset} preset trains in {len(rounds)} rounds, which FSDP does not "
                        "support; drop --fsdp (torchrun then uses DDP) or choose another --preset")
    test = data.splits["test"].head(config.test_limit)
    generate_test = test.head(config.generate_limit)
    subset_note = describe_subsets(data.splits, data.train, rounds, test, generate_test, config.train_skip)
    if subset_note:
        log.info("preset %s: %s", config.preset, subset_note)

    prepared = load_model_for_training(config)
    model, fmt = prepared.base.model, prepared.fmt
    examples = data.splits["train"].head(5)
    if main:
        start_out_dir(config.out, config.overwrite)
        log.info("before fine-tuning (test split):")
        before_scored, before, examples_before = evaluate_both_modes(model, fmt, test, generate_test, config,
                                                                     examples)
    if config.init_adapter:  # after the "before" evaluation, which stays the base model's
        load_adapter(model, config.init_adapter, dropout=config.train.adapter.dropout)
    log.info("fine-tuning: %s", config.train)
    summary = train_in_rounds(model, fmt, rounds, data.splits.get("validation"), config, prepared.notes,
                              prepared.base.base_model_id)
    if not main:
        return {"training": summary}

    log.info("after fine-tuning (test split):")
    after_scored, after, examples_after = evaluate_both_modes(model, fmt, test, generate_test, config, examples)
    predictions = config.out / PREDICTIONS_DIR
    for name, scored in zip(PREDICTION_FILES, (before_scored, after_scored)):
        write_label_ids(predictions / name, scored.labels)
    metrics = {
        "base_model_id": prepared.base.base_model_id,
        "model_source": public_name(config.model),  # the --model given, as a name: no path into the user's cache
        "data": {"spec": resolve_data_spec(config.data.spec),
                 "sizes": {name: len(s) for name, s in data.splits.items()}},
        "preset": config.preset,
        "subset_note": subset_note,
        "system_prompt": config.system_prompt,
        "training": summary,
        "results": {"before": {"test": before}, "after": {"test": after}},
        "examples": [
            {"text": t, "label": LABELS[y], "before": LABELS[b], "after": LABELS[a]}
            for t, y, b, a in zip(examples.texts, examples.labels, examples_before, examples_after)
        ],
        "environment": {**environment(distributed.process_device()), "evaluation_precision": before["score"]["precision"]},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(config.out / METRICS_FILE, metrics)
    write_report(config.out)
    log.info("done in %.0f s: %s", metrics["total_seconds"], config.out)
    return metrics


def model_device(model):
    return next(model.parameters()).device


@dataclass(frozen=True)
class SlicedRound:
    round: Round
    first: int  # index of its first train tweet (after --train-skip)
    tweets: Split


def slice_rounds(train_split: Split, rounds: tuple[Round, ...]) -> list[SlicedRound]:
    """Each round with its tweets: consecutive slices of `train_split`. Rounds left without tweets (a
    --train-limit below the preset's sizes) are dropped."""
    sliced, offset = [], 0
    for round_ in rounds:
        if offset >= len(train_split):
            break
        tweets = train_split.skip(offset).head(round_.tweets)
        sliced.append(SlicedRound(round_, offset, tweets))
        offset += len(tweets)
    return sliced


def evaluate_both_modes(model, fmt, test: Split, generate_test: Split, config: RunConfig, examples: Split
                        ) -> tuple[Predictions, dict, list[int]]:
    """Both modes on the test tweets, and the score-mode labels of the card's example tweets."""
    evaluated = inference_model(model, model_device(model), config.eval_bf16)
    scored, score_metrics = timed_predictions(evaluated, fmt, test, "score", config.eval_batch_size, config.progress)
    results = {"score": score_metrics}
    if len(generate_test):
        _, results["generate"] = timed_predictions(evaluated, fmt, generate_test, "generate", config.eval_batch_size,
                                                   config.progress)
    example_labels = predict(evaluated, fmt, examples.texts, "score").labels
    del evaluated
    for mode, m in results.items():
        log.info("  %-8s n=%d macro-F1 %.3f macro-recall %.3f accuracy %.3f unparsed %d (%.1f tweets/s)",
                 mode, m["n"], m["macro_f1"], m["macro_recall"], m["accuracy"], m["unparsed"], m["tweets_per_s"])
    return scored, results, example_labels


def train_in_rounds(model, fmt, rounds: list[SlicedRound], validation: Split | None, config: RunConfig,
                    notes: AdapterNotes, base_model_id: str | None) -> dict:
    """Train round after round, each from the best adapter of the one before. A round before the last is kept in
    out/round-N; the last writes out/ itself. With --resume, a finished round is loaded, not trained again.
    Returns the last round's summary with the totals of all rounds (and, for several, a list of them)."""
    summaries = []
    for number, sliced in enumerate(rounds, start=1):
        last = number == len(rounds)
        folder = config.out if last else round_folder(config.out, number)
        first_tweet = config.train_skip + sliced.first
        round_notes = notes
        if number > 1:  # recorded like --init-adapter/--train-skip: where this round started, and on which tweets
            round_notes = replace(notes, init_adapter=str(round_folder(config.out, number - 1) / ADAPTER_DIR),
                                  train_skip=first_tweet)
        if len(rounds) > 1:
            log.info("round %d of %d: train tweets %d-%d", number, len(rounds), first_tweet + 1,
                     first_tweet + len(sliced.tweets))
        if config.resume and not last and distributed.any_process((folder / SUMMARY_FILE).is_file()):
            summary = distributed.broadcast_from_main(
                json.loads((folder / SUMMARY_FILE).read_text()) if distributed.is_main_process() else None)
            load_trained_adapter(model, folder / ADAPTER_DIR, sliced.round.train)
            log.info("round %d was done before: its best adapter (step %s) is loaded", number, summary["best_step"])
        else:
            resumes = config.resume and distributed.any_process(bool(checkpoint_folders(folder / CHECKPOINT_DIR)))
            summary = train(model, fmt, sliced.tweets, validation, sliced.round.train, folder, notes=round_notes,
                            resume=resumes, progress=config.progress, base_model_id=base_model_id,
                            report_to=config.report_to)
            if not last and distributed.is_main_process():
                write_json(folder / SUMMARY_FILE, summary)
        summaries.append({**summary, "first_train_tweet": first_tweet + 1})
    if len(summaries) == 1:
        return summaries[0]
    totals = {key: sum(s[key] for s in summaries) for key in ("steps", "train_examples", "tokens")}
    totals["seconds"] = round(sum(s["seconds"] for s in summaries), 2)
    return {**summaries[-1], **totals, "rounds": summaries}


def describe_subsets(splits: dict[str, Split], train_split: Split, rounds: list[SlicedRound], test: Split,
                     generate_test: Split, train_skip: int = 0) -> str | None:
    parts = []
    if len(rounds) > 1:
        spans = [f"{train_skip + r.first + 1:,}-{train_skip + r.first + len(r.tweets):,}" for r in rounds]
        parts.append(f"trained in {len(rounds)} rounds, on train tweets {', then '.join(spans)} of "
                     f"{len(splits['train']):,}, each round from the previous one's best adapter")
    elif train_skip:
        parts.append(f"trained on train tweets {train_skip + 1:,}-{train_skip + len(train_split):,} of "
                     f"{len(splits['train']):,}")
    elif len(train_split) < len(splits["train"]):
        parts.append(f"trained on the first {len(train_split):,} of {len(splits['train']):,} train tweets")
    if len(test) < len(splits["test"]):
        parts.append(f"scored on the first {len(test):,} of {len(splits['test']):,} test tweets")
    if len(generate_test) < len(test):
        parts.append(f"generation evaluated on the first {len(generate_test):,}")
    return "; ".join(parts) or None
