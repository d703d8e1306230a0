"""The bodies of the `train`, `evaluate`, `predict` and `export`/`merge` verbs: load, call the building block, write."""

from __future__ import annotations

import logging
from pathlib import Path

from . import distributed
from .adapters import load_adapter, read_adapter_record
from .config import DataConfig, RunConfig
from .data import load_split
from .errors import UserError
from .evaluate import UNPARSED, inference_model, timed_predictions
from .files import check_creatable, write_atomically
from .hardware import default_device, environment
from .models import load_base_model
from .predict import (
    SentimentClassifier,
    adapter_folder,
    adapter_sha256,
    base_model_spec,
    format_predictions,
    read_prediction_input,
)
from .preparation import check_out_and_load_data, load_model_for_training
from .prompts import DEFAULT_SYSTEM_PROMPT, make_prompt_format
from .run_folder import (
    ADAPTER_DIR,
    SUMMARY_FILE,
    is_json_object,
    is_label_ids,
    refuse_to_replace,
    remove_if_still_empty,
    start_out_dir,
    write_json,
    write_label_ids,
)
from .train import train

log = logging.getLogger("doratweet")


@distributed.process_group()  # under torchrun / `accelerate launch` every process runs this
def train_command(config: RunConfig) -> dict:
    """Rank 0 alone checks and writes --out; every rank trains (see train.py)."""
    data = check_out_and_load_data(config, needed=("train",))
    prepared = load_model_for_training(config)
    if config.init_adapter:
        load_adapter(prepared.base.model, config.init_adapter, dropout=config.train.adapter.dropout)
    made = distributed.is_main_process() and start_out_dir(config.out, config.overwrite)
    try:
        summary = train(prepared.base.model, prepared.fmt, data.train, data.splits.get("validation"), config.train,
                        config.out, notes=prepared.notes, resume=config.resume, progress=config.progress,
                        base_model_id=prepared.base.base_model_id, report_to=config.report_to)
    except BaseException:
        remove_if_still_empty(config.out, made)
        raise
    if distributed.is_main_process():
        write_json(config.out / SUMMARY_FILE, summary)
        log.info("adapter saved in %s", config.out / ADAPTER_DIR)
    return summary


def evaluate_command(args, data: DataConfig, bf16: bool | None) -> dict:
    if args.out:  # replaced at the end: refuse now a file evaluate did not write there
        out = Path(args.out)
        refuse_to_replace(out, lambda p: is_json_object(p, "mode", "macro_f1", "n"), "evaluate's metrics")
        refuse_to_replace(out.with_suffix(".predictions.txt"), is_label_ids, "evaluate's predictions")
    split = load_split(data.spec, args.split, **data.load_options()).head(args.limit)
    system_prompt = args.system_prompt
    if args.adapter:
        folder = adapter_folder(args.adapter)
        record = read_adapter_record(folder)
        base = load_base_model(args.model or base_model_spec(record), device=default_device(),
                               trust_remote_code=args.trust_remote_code)
        load_adapter(base.model, folder)
        system_prompt = system_prompt or record.notes.system_prompt
    else:
        base = load_base_model(args.model, device=default_device(), trust_remote_code=args.trust_remote_code)
    fmt = make_prompt_format(base.tokenizer, system_prompt or DEFAULT_SYSTEM_PROMPT)
    model = inference_model(base.model, default_device(), bf16, copy=False)
    predictions, metrics = timed_predictions(model, fmt, split, args.mode, args.batch_size, progress=not args.quiet)
    metrics.update(base_model_id=base.base_model_id, adapter=args.adapter, environment=environment(default_device()))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, metrics)
        # TweetEval's format: one label id per line; an unparsed answer is written as -1.
        write_label_ids(out.with_suffix(".predictions.txt"), [y if y != UNPARSED else -1 for y in predictions.labels])
        log.info("metrics in %s", out)
    return metrics


def predict_command(args, bf16: bool | None) -> None:
    from .batch_predict import check_output_path, is_our_progress_file, predict_file, progress_file

    def load_classifier() -> SentimentClassifier:
        classifier = SentimentClassifier.load(args.run or args.adapter, model=args.model, bf16=bf16)
        classifier.batch_size = args.batch_size
        return classifier

    if args.output:
        check_output_path(args.output, args.input)
    if args.input and args.input != "-" and args.output and not args.texts and args.format != "table":
        # File to file: streamed in batches and appended, so any size fits in memory and a rerun resumes.
        job = {"adapter": adapter_sha256(adapter_folder(args.run or args.adapter)), "--model": args.model,
               "--precision": args.precision,
               "device": default_device().type}  # a GPU's sums round differently: its digits are not the CPU's
        result = predict_file(args.input, args.output, load_classifier, text_column=args.text_column,
                              id_column=args.id_column or None, fmt=args.format, batch_size=args.batch_size,
                              overwrite=args.overwrite, progress=not args.quiet, job=job)
        if result.already_complete:
            print(f"{args.output}: already complete ({result.skipped} rows); pass --overwrite to redo it")
        return
    fmt = args.format or _format_from_extension(args.output)
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UserError(f"--output {args.output}: already exists; pass --overwrite to replace it, or choose "
                        "another file")
    texts = read_prediction_input(args.input, args.texts, args.text_column)
    if not texts:
        raise UserError("predict: no texts to label")
    classifier = load_classifier()
    probabilities = classifier.predict_proba(texts)
    text = format_predictions(texts, probabilities, fmt)
    if args.output:
        progress = progress_file(Path(args.output))
        ours = is_our_progress_file(progress)  # a user's file under that name is left alone
        write_atomically(args.output, text)
        if ours:
            progress.unlink()  # it described the file just replaced
    else:
        print(text, end="")


def _format_from_extension(path: str | None) -> str:
    if path is None:
        return "table"
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".csv"):
        return suffix[1:]
    raise UserError(f"--output {path}: use a .jsonl or .csv file name, or pass --format")


def export_command(args) -> Path:
    """`export` (and `merge`, its `--format hf`): refuse an --out that exists before any work, then export."""
    from .export import export

    out = Path(args.out)
    check_creatable(out, "--out")
    if args.format == "hf" and args.quant is not None:
        raise UserError(f"--quant {args.quant}: applies to --format gguf; a transformers folder keeps the base "
                        "model's dtype")
    folder = adapter_folder(args.adapter)
    if args.format == "hf" or out.suffix.lower() != ".gguf":
        if out.exists():
            raise UserError(f"--out {out}: already exists; choose a new folder")
    elif out.exists() or out.is_symlink():
        raise UserError(f"--out {out}: already exists; choose a new file name")
    elif any((out.parent / name).exists() for name in ("README.md", "Modelfile")):
        raise UserError(f"--out {out}: {out.parent} already holds a README.md or Modelfile; choose a new folder")
    return export(folder, out, args.format, args.quant or "f16", model=args.model)
