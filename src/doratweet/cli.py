"""The `doratweet` command: argument parsing only; each verb calls one function of the package."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import typing
from dataclasses import fields, replace

from . import __version__
from .adapters.config import MAX_COUNT, AdapterConfig
from .config import PRESETS, DataConfig, Preset, Round, RunConfig, TrainConfig, default_preset, with_options
from .errors import UserError, first_line
from .prompts import DEFAULT_SYSTEM_PROMPT
from .stopping import Terminated, sigterm_as_interrupt


def add_config_options(group, defaults, verb: str, default_text: str | None = None) -> None:
    """One option for each field with `help` metadata (see config.py) of the config `defaults`, typed like the
    field, its value in `defaults` shown (or `default_text`). Options are None unless given, so that a preset's
    value stays."""
    hints = typing.get_type_hints(type(defaults))
    for f in fields(defaults):
        if "help" not in f.metadata or verb not in f.metadata.get("verbs", (verb,)):
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        if hints[f.name] is bool:  # a switch that is on by default is turned off with --no-NAME, whose help says
            flag = flag if not default else "--no-" + flag[2:]  # what turning it off does: off unless given
            group.add_argument(flag, dest=f.name, action="store_const", const=not default, default=None,
                               help=f"{f.metadata['help']} (default: off)")
            continue
        shown = default_text or f.metadata.get("default_help") or (
            ",".join(default) if isinstance(default, tuple) else default)
        parse = f.metadata.get("parse") or next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                                                if t is not type(None))
        metavar = f.metadata.get("metavar", flag[2:].upper().replace("-", "_"))
        group.add_argument(flag, dest=f.name, type=parse, default=None, metavar=metavar,
                           help=f"{f.metadata['help']} (default: {shown})")


def given(args, config_class) -> dict:
    """The fields of `config_class` the user gave on the command line (only those that are options: `run`'s own
    --eval-batch-size is not TrainConfig's eval_batch_size, the validation batch)."""
    return {f.name: getattr(args, f.name) for f in fields(config_class)
            if "help" in f.metadata and getattr(args, f.name, None) is not None}


def add_model_options(p: argparse.ArgumentParser, required_help: str = "") -> None:
    p.add_argument("--model", default=None, help="base model: 'smollm2-135m' (embedded, offline), a Hub id, a local "
                   "folder or a .gguf file (default: smollm2-135m, or the model the adapter names)" + required_help)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (default: off)")


def add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="evaluation/prediction weights: auto = bf16 on CUDA and on CPUs with AMX/AVX512-BF16, "
                   "else fp32 (default: %(default)s)")


def bf16_choice(args) -> bool | None:
    return {"auto": None, "fp32": False, "bf16": True}[args.precision]


def data_config(args) -> DataConfig:
    return DataConfig(**given(args, DataConfig))


def add_training_options(p: argparse.ArgumentParser, verb: str) -> None:
    group = p.add_argument_group("training")
    preset_default = "the preset's value" if verb == "run" else None
    add_config_options(group, TrainConfig().adapter, verb, preset_default)
    add_config_options(group, TrainConfig(), verb, preset_default)
    group.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system prompt (default: %(default)r)")
    group.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                       help="also write the training curves (loss, lr, validation) as TensorBoard events in "
                       "OUT/tensorboard (tune: in each trial's folder), as the Hugging Face Trainer does; needs "
                       "`pip install tensorboard` (default: %(default)s)")


def add_init_adapter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-adapter", default=None, help="adapter or run folder to start from instead of a new adapter "
                   "(train it further); its method, rank, alpha, targets, rsLoRA and layers apply (default: none)")
    p.add_argument("--train-skip", type=int, default=0, help="leave out the first N train tweets, before --train-limit "
                   "applies, e.g. those the --init-adapter was trained on (default: %(default)s)")


def run_config(args, preset: Preset | None = None) -> RunConfig:
    """The RunConfig of `run` (with a preset) or `train` (without): the preset's rounds, or one round of
    TrainConfig's defaults, with the options the user gave; an --init-adapter's shape and base model."""
    from .adapters import read_adapter_record
    from .config import ADAPTER_SHAPE, with_shape_of
    from .models import EMBEDDED_NAME
    from .predict import adapter_folder, base_model_spec

    adapter_options, train_options = given(args, AdapterConfig), given(args, TrainConfig)
    rounds = preset.rounds if preset else (Round(None, TrainConfig()),)
    rounds = tuple(replace(r, train=with_options(r.train, adapter_options, train_options)) for r in rounds)
    model, init_folder = args.model, None
    if args.init_adapter:
        init_folder = adapter_folder(args.init_adapter)
        saved = read_adapter_record(init_folder)
        for name in ADAPTER_SHAPE:  # a different rank or other targets would be a new adapter, not this one further
            value, own = adapter_options.get(name), getattr(saved.config, name)
            if name == "targets" and value is not None and not isinstance(own, str):
                value, own = sorted(value), sorted(own)
            if value is not None and value != own:
                flag = "--rslora" if name == "use_rslora" else "--" + name
                raise UserError(f"{flag} {value}: the --init-adapter {args.init_adapter} has {own}; drop {flag} "
                                "(an adapter trained further keeps its shape)")
        rounds = tuple(replace(r, train=with_shape_of(r.train, saved.config)) for r in rounds)
        model = model or base_model_spec(saved)
    limits = {}
    if preset:
        limits = dict(preset=preset.name, test_limit=args.test_limit or preset.test_limit,
                      generate_limit=args.generate_limit or preset.generate_limit,
                      eval_batch_size=args.eval_batch_size, eval_bf16=bf16_choice(args))
    return RunConfig(out=args.out, model=model or EMBEDDED_NAME, rounds=rounds, data=data_config(args),
                     system_prompt=args.system_prompt, init_adapter=init_folder, train_skip=args.train_skip,
                     train_limit=args.train_limit or (preset.train_limit if preset else None),
                     trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, resume=args.resume,
                     progress=not args.quiet, report_to=args.report_to, **limits)


class OneLineErrors(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; one line naming the option and where to look reads better."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    if value > MAX_COUNT:  # counts reach torch as 64-bit integers
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="doratweet", description="Fine-tune small chat LLMs with DoRA to label "
                           "tweet sentiment (negative / neutral / positive).")
    parser.add_argument("--version", action="version", version=f"doratweet {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs (default: off)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: off)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND", parser_class=OneLineErrors)
    add_run_verb(verbs)
    add_train_verb(verbs)
    add_tune_verb(verbs)
    add_evaluate_verb(verbs)
    add_predict_verb(verbs)
    add_report_verb(verbs)
    add_serve_verb(verbs)
    add_push_verb(verbs)
    add_merge_verb(verbs)
    return parser


def add_run_verb(verbs) -> None:
    run = verbs.add_parser("run", help="evaluate, fine-tune with DoRA, evaluate again, write a model card")
    add_model_options(run)
    add_config_options(run, DataConfig(), "run")
    run.add_argument("--out", default="runs/latest", help="run folder to write (default: %(default)s)")
    run.add_argument("--preset", choices=list(PRESETS), default=None,
                     help="quick: subsets and the top 15 layers, for a CPU in < 10 min (--layers all for every layer); "
                     "best: the shipped adapter's recipe (all train tweets in 2 rounds, whole test split, ~2 h 20 min "
                     "on a CPU); full: all data (default: full on CUDA, else quick)")
    run.add_argument("--train-limit", type=positive_int, default=None, help="train on the first N tweets (default: preset's)")
    add_init_adapter_options(run)
    run.add_argument("--test-limit", type=positive_int, default=None, help="evaluate on the first N test tweets (default: preset's)")
    run.add_argument("--generate-limit", type=positive_int, default=None,
                     help="evaluate generation on the first N of those (default: preset's)")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --out: only the files "
                    "a doratweet run wrote are removed; anything else under their names is refused (default: off)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (default: off)")
    run.add_argument("--eval-batch-size", type=positive_int, default=32, help="tweets per evaluation batch (default: %(default)s)")
    add_precision_option(run)
    add_training_options(run, "run")


def add_train_verb(verbs) -> None:
    tr = verbs.add_parser("train", help="fine-tune an adapter and save it in PEFT format")
    add_model_options(tr)
    add_config_options(tr, DataConfig(), "train")
    tr.add_argument("--out", required=True, help="folder for adapter/, checkpoint/ and train_log.jsonl (required)")
    tr.add_argument("--train-limit", type=positive_int, default=None, help="train on the first N tweets (default: all)")
    add_init_adapter_options(tr)
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (default: off)")
    tr.add_argument("--overwrite", action="store_true", help="replace a previous run in --out: only the files "
                    "a doratweet run wrote are removed; anything else under their names is refused (default: off)")
    add_training_options(tr, "train")


def add_tune_verb(verbs) -> None:
    tu = verbs.add_parser("tune", help="search hyperparameters: an Optuna study whose trials are train runs, "
                          "resumable, shareable by several machines")
    add_model_options(tu)
    add_config_options(tu, DataConfig(), "tune")
    tu.add_argument("--space", required=True, help="search space, a YAML file: option: value, {low, high, log, "
                    "step} or {choices: [...]} (see docs/experiments.md) (required)")
    tu.add_argument("--out", required=True, help="study folder: study.db, trials/NNNN, leaderboard, plots, best/ "
                    "(required)")
    tu.add_argument("--trials", type=positive_int, default=20, help="stop when the study holds N trials, pruned "
                    "and failed ones included (default: %(default)s)")
    tu.add_argument("--study", default="doratweet", help="study name in --storage (default: %(default)s)")
    tu.add_argument("--storage", default=None, help="Optuna storage URL shared by several workers, e.g. "
                    "sqlite:////shared/study.db or postgresql://... (default: sqlite in --out)")
    tu.add_argument("--holdout", type=positive_int, default=4000, help="hold out the first N train tweets: no trial "
                    "trains on them, every trial is scored on them (default: %(default)s)")
    tu.add_argument("--eval-every-tweets", type=positive_int, default=8000, help="validate (and let the pruner "
                    "judge) every N training tweets (default: %(default)s)")
    tu.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                    help="stop unpromising trials early on validation macro-F1 (default: %(default)s)")
    tu.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler, mixed with the worker's "
                    "identity and the study's progress (default: %(default)s)")
    tu.add_argument("--train-limit", type=positive_int, default=None, help="train each trial on the first N tweets "
                    "after the held-out ones (default: all)")
    tu.add_argument("--resume", action="store_true", help="go on with the study in --out (default: off)")
    add_training_options(tu, "tune")


def add_evaluate_verb(verbs) -> None:
    ev = verbs.add_parser("evaluate", help="metrics of a model (with or without an adapter) on a split")
    add_model_options(ev)
    ev.add_argument("--adapter", default=None, help="adapter or run folder (default: none, the base model alone)")
    add_config_options(ev, DataConfig(), "evaluate")
    ev.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    ev.add_argument("--mode", choices=["score", "generate"], default="score",
                    help="score: likelihood of each label; generate: parse a free answer (default: %(default)s)")
    ev.add_argument("--limit", type=positive_int, default=None, help="first N tweets only (default: all)")
    ev.add_argument("--batch-size", type=positive_int, default=32, help="tweets per batch (default: %(default)s)")
    add_precision_option(ev)
    ev.add_argument("--system-prompt", default=None, help="system prompt (default: the adapter's, else the built-in)")
    ev.add_argument("--out", default=None, help="write metrics JSON here, predictions beside it (default: print)")


def add_predict_verb(verbs) -> None:
    pr = verbs.add_parser("predict", help="label texts with a trained adapter")
    pr.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label (default: read --input or stdin)")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--run", default=None, help="run folder written by `doratweet run` (default: none)")
    src.add_argument("--adapter", default=None, help="adapter folder in PEFT format (default: the adapter shipped "
                     "with doratweet, DoRA on SmolLM2-135M-Instruct)")
    pr.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    pr.add_argument("--input", default=None, help=".txt (one per line), .csv, .jsonl or .parquet (default: none)")
    pr.add_argument("--text-column", default="text", help="text column of --input tables (default: %(default)s)")
    pr.add_argument("--output", default=None, help="write .jsonl or .csv here instead of printing; with --input it "
                    "is streamed, and a rerun resumes it; CSV cells that start like a formula (= + - @, tab, CR) "
                    "get a leading ' so spreadsheets show them as text (default: print)")
    pr.add_argument("--format", choices=["table", "jsonl", "csv"], default=None,
                    help="output format (default: from --output's extension, else table)")
    pr.add_argument("--id-column", default="id", help="column of --input passed through to --output when "
                    "present; '' for none (default: %(default)s)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --output; without it, an output "
                    "this same job left unfinished is resumed, a finished one kept, and any other file refused "
                    "(default: off)")
    pr.add_argument("--batch-size", type=positive_int, default=32, help="texts per batch (default: %(default)s)")
    add_precision_option(pr)


def add_report_verb(verbs) -> None:
    rep = verbs.add_parser("report", help="rebuild the model card and plots of a run folder")
    rep.add_argument("run_dir", help="run folder written by `doratweet run`")


def add_serve_verb(verbs) -> None:
    sv = verbs.add_parser("serve", help="serve an adapter over HTTP (API, classify page, report page)")
    src = sv.add_mutually_exclusive_group()
    src.add_argument("--run", default=None, help="run folder written by `doratweet run`; its metrics and plots "
                     "appear on /report (default: none)")
    src.add_argument("--adapter", default=None, help="adapter folder in PEFT format (default: the adapter shipped "
                     "with doratweet, DoRA on SmolLM2-135M-Instruct)")
    sv.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network "
                    "(default: %(default)s)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    sv.add_argument("--max-batch", type=int, default=32, help="most texts in one forward pass; 1 turns dynamic "
                    "batching off (default: %(default)s)")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a forward pass waits to gather more "
                    "requests (default: %(default)s)")
    sv.add_argument("--max-texts", type=int, default=256, help="most texts per request, else HTTP 413 "
                    "(default: %(default)s)")
    sv.add_argument("--max-chars", type=int, default=1000, help="most characters per text, else HTTP 413 "
                    "(default: %(default)s)")
    sv.add_argument("--queue-size", type=int, default=1024, help="most requests waiting for the model, else "
                    "HTTP 503 with Retry-After (default: %(default)s)")
    sv.add_argument("--shutdown-timeout", type=float, default=5.0, help="on SIGTERM or Ctrl-C: seconds to answer "
                    "the requests already waiting before refusing them with 503 and exiting (default: %(default)s)")
    sv.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY or X-API-Key) "
                    "on /v1/* and the plots (default: $DORATWEET_API_KEY, else no key)")
    add_precision_option(sv)


def add_push_verb(verbs) -> None:
    pu = verbs.add_parser("push", help="upload a run's adapter, model card and plots to the Hugging Face Hub")
    pu.add_argument("run_dir", help="run folder written by `doratweet run`")
    pu.add_argument("--repo", required=True, help="Hub model repo to create or update, as user/name (required)")
    pu.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    pu.add_argument("--dry-run", action="store_true", help="list what would be uploaded where, touch no network "
                    "(default: off)")


def add_merge_verb(verbs) -> None:
    from .export import FORMATS, QUANTS

    mg = verbs.add_parser("merge", help="fold an adapter into its base model and save a plain transformers model "
                          "(the same as export --format hf)")
    mg.add_argument("--adapter", required=True, help="adapter or run folder")
    mg.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    mg.add_argument("--out", required=True, help="folder for the merged model (must not exist)")
    ex = verbs.add_parser("export", help="fold an adapter into its base model (exactly, in fp32) and save it for "
                          "transformers (hf) or for llama.cpp and Ollama (gguf, with a README and a Modelfile)")
    ex.add_argument("--adapter", required=True, help="adapter or run folder")
    ex.add_argument("--format", choices=FORMATS, required=True, help="hf: a transformers folder; gguf: one .gguf file")
    ex.add_argument("--quant", choices=QUANTS, default=None, help="gguf weights (default: f16; norms stay f32)")
    ex.add_argument("--model", default=None, help="base model (default: the one the adapter names; for gguf, the "
                    "embedded model or a .gguf)")
    ex.add_argument("--out", required=True, help="hf: a folder that must not exist; gguf: a .gguf file that must not "
                    "exist, or a new folder to put NAME.QUANT.gguf, README.md and Modelfile in")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    # SIGTERM (kill, docker stop, SLURM) stops a command as Ctrl-C does; `serve` shuts down on it in its own way.
    stop_on_sigterm = sigterm_as_interrupt() if args.verb != "serve" else nullcontext()
    try:
        with stop_on_sigterm:
            return VERBS[args.verb](args) or 0
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"doratweet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated)
        if args.debug:
            traceback.print_exc()
        how = "stopped by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
        # Training says which checkpoint it kept, a streamed predict what it kept; a printed predict writes at the end.
        kept = str(interrupt) or ("nothing was written" if args.verb == "predict" else "")
        print(f"doratweet: {how}" + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130
    except Exception as err:  # a bug, or the system (disk full, out of memory): one line unless --debug
        if args.debug:
            raise
        print(f"doratweet: error: {type(err).__name__}: {first_line(err)} (rerun with --debug for the traceback; "
              "if it is a bug, please report it with that)", file=sys.stderr)
        return 1


def cmd_run(args) -> int:
    from .pipeline import run_pipeline

    run_pipeline(run_config(args, PRESETS[args.preset or default_preset()]))
    return 0


def cmd_train(args) -> int:
    from .commands import train_command

    train_command(run_config(args))
    return 0


def cmd_tune(args) -> int:
    from .models import EMBEDDED_NAME
    from .search_space import read_search_space
    from .tune import TuneConfig, tune

    adapter_options, train_options = given(args, AdapterConfig), given(args, TrainConfig)
    train = with_options(TrainConfig(), adapter_options, train_options)
    base = RunConfig(out=args.out, model=args.model or EMBEDDED_NAME, rounds=(Round(None, train),),
                     data=data_config(args), system_prompt=args.system_prompt, train_limit=args.train_limit,
                     trust_remote_code=args.trust_remote_code, progress=not args.quiet, report_to=args.report_to)
    space = read_search_space(args.space, base)
    given_too = sorted(space.fields() & ({*adapter_options, *train_options} |
                                         ({"system_prompt"} if args.system_prompt != DEFAULT_SYSTEM_PROMPT else set())))
    if given_too:
        flag = "--" + ("rslora" if given_too[0] == "use_rslora" else given_too[0].replace("_", "-"))
        raise UserError(f"{flag}: the search space {args.space} sets it too; drop one of them")
    tune(TuneConfig(out=Path(args.out), space=space, base=base, trials=args.trials, study=args.study,
                    storage=args.storage, holdout=args.holdout, eval_every_tweets=args.eval_every_tweets,
                    pruner=args.pruner, seed=args.sampler_seed, resume=args.resume, progress=not args.quiet))
    return 0


def cmd_evaluate(args) -> int:
    from .commands import evaluate_command

    metrics = evaluate_command(args, data_config(args), bf16_choice(args))
    if args.out is None:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args) -> int:
    from .commands import predict_command

    predict_command(args, bf16_choice(args))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_merge(args) -> int:
    from .commands import export_command

    args.format, args.quant = "hf", None
    print(export_command(args))
    return 0


def cmd_export(args) -> int:
    from .commands import export_command

    print(export_command(args))
    return 0


def cmd_serve(args) -> int:
    from .serve import run_server

    run_server(args.run or args.adapter, model=args.model, host=args.host, port=args.port, bf16=bf16_choice(args),
               api_key=args.api_key or os.environ.get("DORATWEET_API_KEY") or None,
               shutdown_timeout=args.shutdown_timeout, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
               max_texts=args.max_texts, max_chars=args.max_chars, queue_size=args.queue_size)
    return 0


def cmd_push(args) -> int:
    from .publish import push_run

    url = push_run(args.run_dir, args.repo, private=args.private, dry_run=args.dry_run)
    if url:
        print(url)
    return 0


VERBS = {"run": cmd_run, "train": cmd_train, "tune": cmd_tune, "evaluate": cmd_evaluate, "predict": cmd_predict,
         "report": cmd_report, "merge": cmd_merge, "export": cmd_export, "serve": cmd_serve, "push": cmd_push}

if __name__ == "__main__":
    sys.exit(main())
