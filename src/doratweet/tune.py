"""`doratweet tune`: an Optuna study (TPE sampler) over a search space (search_space.py), each trial a `train` run.

    out/
      study.db                  the study (SQLite) unless --storage names another database
      tune.json                 what this folder's study is: name, storage, space, held-out tweets, validation rhythm
      search_space.yaml         the space, as the study was started with it
      trials/NNNN/              trial NNNN: a `doratweet train` folder (adapter/, train_log.jsonl, ...) + trial.json
      leaderboard.md, .csv      every trial of the study, pruned, failed and interrupted ones included
      plots/                    Optuna's optimisation history and parameter importances
      best/                     the best trial's adapter and its model card

How a trial is scored (docs/experiments.md, "doratweet tune"): training validates on the validation split every
--eval-every-tweets tweets and keeps its best adapter; each validation's macro-F1 is reported to the pruner. The
kept adapter is then scored on the held-out tweets: the first --holdout train tweets, which no trial trains on.
The trial's value is the mean of the two macro-F1s; both are recorded. The test split is never read here.

Resuming: a study lives in its database, so `--resume` on the same --out goes on where it stopped. A trial this
folder's worker was running when it was stopped (Ctrl-C, SIGTERM, a crash) is marked failed and interrupted, and
run again with the same values in the same folder, from its last checkpoint. Several workers (machines) share one
study through `--storage URL --study NAME`, each with its own --out (docs/distributed.md).
"""

from __future__ import annotations

import csv
import gc
import fcntl
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .files import write_atomically
from .run_folder import ADAPTER_DIR, CHECKPOINT_DIR, SUMMARY_FILE, is_json_object, is_own_card, write_json
from .search_space import SYSTEM_PROMPT, SearchSpace, check_against_model

log = logging.getLogger("doratweet")

STUDY_FILE = "study.db"
TUNE_FILE = "tune.json"
SPACE_FILE = "search_space.yaml"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
BEST_DIR = "best"
PLOTS_DIR = "plots"
_LOCK = ".tune.lock"
# Trial user attributes
_FOLDER, _WORKER, _INTERRUPTED, _VAL, _HOLDOUT, _ERROR = (
    "run_folder", "worker", "interrupted", "val_macro_f1", "holdout_macro_f1", "error")


@dataclass(frozen=True)
class TuneConfig:
    out: Path
    space: SearchSpace
    base: RunConfig  # every trial's settings before the space's values (its `out` is replaced per trial)
    trials: int  # the study stops when it holds this many trials (pruned and failed included; interrupted not)
    study: str = "doratweet"
    storage: str | None = None  # None: sqlite in out/study.db
    holdout: int = 4000
    eval_every_tweets: int = 8000
    pruner: str = "median"  # median, hyperband or none
    seed: int = 0  # the sampler's seed, with this worker's identity mixed in (two workers must not repeat)
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.trials < 1 or self.holdout < 1 or self.eval_every_tweets < 1:
            raise UserError("--trials, --holdout and --eval-every-tweets must be 1 or more")
        if self.pruner not in ("median", "hyperband", "none"):
            raise UserError(f"--pruner {self.pruner}: choose median, hyperband or none")
        if not self.study or len(self.study) > 128 or not self.study.isprintable():
            raise UserError(f"--study {self.study!r}: give a name of 1 to 128 printable characters")
        if self.storage is not None and self.storage.startswith("sqlite:") and (
                self.storage.rstrip("/") in ("sqlite:", "sqlite:") or ":memory:" in self.storage):
            raise UserError(f"--storage {self.storage}: an in-memory database is lost when tune stops, and a study "
                            "must outlive it; give a file (sqlite:///path/study.db) or leave --storage out")

    @property
    def storage_url(self) -> str:
        """The database; the default is the SQLite file in --out, found again wherever the folder is moved."""
        return self.storage or f"sqlite:///{(self.out / STUDY_FILE).resolve()}"

    @property
    def shown_storage(self) -> str:
        """--storage for messages and files: a password in the URL is hidden."""
        if self.storage is None:
            return f"{STUDY_FILE} in --out"
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.storage).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy reads: said so when the study is opened
            return self.storage.split("@")[-1] if "@" in self.storage else self.storage

    def settings(self) -> dict:
        """The training settings every trial shares (all but what the space sets, and what tune sets itself): a study
        records them, and a resumed study or another worker must use the same."""
        searched = self.space.fields()
        train = {k: v for k, v in json.loads(json.dumps(self.base.train.flat())).items()
                 if k not in searched and k not in ("eval_every", "save_every", "log_every")}
        run = {"system_prompt": self.base.system_prompt, "train_limit": self.base.train_limit}
        return {**train, **{k: v for k, v in run.items() if k not in searched}}

    @cached_property
    def worker(self) -> str:
        """Who runs trials from this --out: a trial marked with it and still running when this worker starts again
        was interrupted. Made once, when the folder's study starts, and kept in tune.json: the same after a restart
        on a machine with another host name or a moved folder, never that of another worker with the same path."""
        recorded = self.out / TUNE_FILE
        if recorded.is_file():
            return json.loads(recorded.read_text())["worker"]
        return f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"


def tune(config: TuneConfig) -> dict:
    """Run trials until the study holds `config.trials`; write the leaderboard, plots and the best adapter. Returns
    the study's summary (also in tune.json)."""
    import optuna

    from .data import load_data

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # what matters is said in doratweet's own lines
    _check_out(config)
    splits = load_data(config.base.data.spec, **config.base.data.load_options())
    for name in ("train", "validation"):
        if name not in splits:
            raise UserError(f"--data: has no {name} split; tune trains on train, selects on validation and on "
                            "--holdout train tweets")
    train_split = splits["train"]
    if config.holdout >= len(train_split):
        raise UserError(f"--holdout {config.holdout}: the train split has only {len(train_split)} tweets; hold out "
                        "fewer")
    holdout, trial_train = train_split.head(config.holdout), train_split.skip(config.holdout).head(
        config.base.train_limit)
    _check_space_against_the_model(config)
    created = not config.out.exists()
    config.out.mkdir(parents=True, exist_ok=True)
    with _worker_lock(config.out):  # held from the study's opening to the end: no other worker slips in between
        try:
            study = _open_study(config, optuna)
        except BaseException:
            if created:  # refused before the study was recorded here: leave no folder that a rerun would refuse
                shutil.rmtree(config.out, ignore_errors=True)
            raise
        _continue_interrupted(study, config)
        runner = TrialRunner(config, trial_train, splits["validation"], holdout)
        _run_trials(study, config, runner)
        summary = write_study_outputs(study, config)
    _refuse_a_study_of_failures(study)
    return summary


def _check_space_against_the_model(config: TuneConfig) -> None:
    from .models import load_base_model

    base = load_base_model(config.base.model, trust_remote_code=config.base.trust_remote_code)
    check_against_model(config.space, config.base, base.model)


def _check_out(config: TuneConfig) -> None:
    out = config.out
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out}: is a link to nothing; remove it or choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; choose a folder")
    ours = (out / TUNE_FILE).is_file()
    if config.resume and not ours:
        raise UserError(f"--resume: {out} holds no study ({TUNE_FILE} is missing); start one without --resume")
    if not config.resume and out.exists() and any(e.name != _LOCK for e in out.iterdir()):
        hint = "pass --resume to go on with its study" if ours else "choose another folder"
        raise UserError(f"--out {out}: the folder exists and is not empty; {hint}")
    if config.resume:
        recorded = json.loads((out / TUNE_FILE).read_text())
        storage = None if config.storage is None else config.shown_storage  # as recorded: no password
        for key, value in (("study", config.study), ("storage", storage), ("holdout", config.holdout),
                           ("eval_every_tweets", config.eval_every_tweets)):
            if recorded.get(key) != value:
                flag = "--" + key.replace("_", "-")
                shown = config.shown_storage if key == "storage" else value
                raise UserError(f"--resume: {flag} {shown} differs from the study's ({recorded.get(key)}); use the "
                                "same, or start a new study in another --out")
        if config.storage is None and not (out / STUDY_FILE).is_file():
            raise UserError(f"--resume: {out / STUDY_FILE} is missing, and with it the study's trials; restore it, "
                            "or start a new study in another --out")
    _check_best_folder(out / BEST_DIR)


def _check_best_folder(folder: Path) -> None:
    """best/ is replaced at the end of every study run: anything in it that tune did not write is refused now."""
    if not folder.exists() and not folder.is_symlink():
        return
    own = {ADAPTER_DIR: lambda p: p.is_dir() and not p.is_symlink() and all(
               e.name in ("adapter_config.json", "adapter_model.safetensors") for e in p.iterdir()),
           "README.md": lambda p: p.is_file() and is_own_card(p),
           TRIAL_FILE: lambda p: p.is_file() and is_json_object(p, "trial", "value")}
    entries = list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else [folder]
    for entry in entries:
        if entry == folder or entry.name not in own or not own[entry.name](entry):
            shown = entry.relative_to(folder.parent)
            raise UserError(f"--out: {shown} is not something tune wrote, and best/ is replaced when the study ends; "
                            f"move {shown} out of --out")


class _worker_lock:
    """One worker per --out: a second `tune` on the same folder would run the same trials into the same folders."""

    def __init__(self, out: Path):
        self.path = out / _LOCK

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(f"--out {self.path.parent}: another doratweet tune is working in this folder; give each "
                            "worker its own --out (they share the study through --storage)") from None
        return self

    def __exit__(self, *exc):
        self.file.close()


def _open_study(config: TuneConfig, optuna):
    """Create or load the study; refuse one whose search space differs from this space."""
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3),
              "none": optuna.pruners.NopPruner}[config.pruner]()
    for attempt in range(5):
        try:
            study = optuna.create_study(storage=config.storage_url, study_name=config.study, direction="maximize",
                                        pruner=pruner, load_if_exists=True)
            break
        except (ImportError, ModuleNotFoundError) as err:
            raise UserError(f"--storage {config.shown_storage}: needs a database driver Optuna can use "
                            f"({type(err).__name__})") from None
        except Exception as err:  # SQLAlchemy's errors: a bad URL, an unreachable server, or a race
            if not err.__class__.__module__.startswith(("sqlalchemy", "optuna")):
                raise
            if type(err).__name__ in ("OperationalError", "IntegrityError", "DuplicatedStudyError") and attempt < 4:
                time.sleep(0.5 * (attempt + 1))  # workers starting together both create the tables: try again
                continue
            raise UserError(f"--storage {config.shown_storage}: cannot open the study ({type(err).__name__}: "
                            f"{str(err).splitlines()[0].replace(config.storage or '', config.shown_storage)})") from None
    else:
        raise UserError(f"--storage {config.shown_storage}: could not open the study after 5 tries (other workers "
                        "kept it locked); start this worker again")
    # Seeded by the worker and by how far the study is: a resumed or second worker draws new values, not the
    # first worker's first ones again.
    study.sampler = optuna.samplers.TPESampler(seed=int(hashlib.sha256(
        f"{config.seed}:{config.worker}:{len(study.trials)}".encode()).hexdigest()[:8], 16))
    recorded = study.user_attrs.get("space")
    settings = config.settings()
    if recorded is None:
        study.set_user_attr("space", config.space.canonical())
        study.set_user_attr("holdout", config.holdout)
        study.set_user_attr("eval_every_tweets", config.eval_every_tweets)
        study.set_user_attr("settings", settings)
    elif recorded != config.space.canonical():
        raise UserError(f"--space {config.space.path}: differs from the search space study {config.study!r} was "
                        "started with; use that space, or start a new study (another --out, or --study NAME)")
    elif (study.user_attrs.get("holdout"), study.user_attrs.get("eval_every_tweets")) != (
            config.holdout, config.eval_every_tweets):
        raise UserError(f"--holdout/--eval-every-tweets: study {config.study!r} uses {study.user_attrs['holdout']} "
                        f"and {study.user_attrs['eval_every_tweets']}; every worker must score trials alike")
    else:
        theirs = study.user_attrs.get("settings", {})
        differ = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        if differ:
            shown = ", ".join(f"{k} {settings.get(k)!r} (the study's: {theirs.get(k)!r})" for k in differ[:3])
            raise UserError(f"training options differ from those study {config.study!r} was started with: {shown}; "
                            "every trial of a study trains alike: use the same options")
    if not (config.out / TUNE_FILE).is_file():
        write_atomically(config.out / SPACE_FILE, config.space.text)
        write_json(config.out / TUNE_FILE, {"study": config.study,
                                            "storage": None if config.storage is None else config.shown_storage,
                                            "holdout": config.holdout, "eval_every_tweets": config.eval_every_tweets,
                                            "pruner": config.pruner, "worker": config.worker, "settings": settings})
    return study


def _continue_interrupted(study, config: TuneConfig) -> None:
    """Trials this worker was running when it stopped: marked failed and interrupted, and queued again with the same
    values and folder, so that the next trial continues from the folder's last checkpoint."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(_WORKER) != config.worker:
            continue
        study._storage.set_trial_user_attr(trial._trial_id, _INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={_FOLDER: trial.user_attrs.get(_FOLDER)}, skip_if_exists=False)
        log.info("trial %d was interrupted: it continues from its last checkpoint", trial.number)


def counted(trial) -> bool:
    """Whether a trial counts toward --trials: all of them, pruned and failed ones too, but not one that was
    interrupted (it goes on as another trial) nor one queued to continue it (it counts once it runs)."""
    from optuna.trial import TrialState

    return not trial.user_attrs.get(_INTERRUPTED) and trial.state != TrialState.WAITING


def _run_trials(study, config: TuneConfig, runner: TrialRunner) -> None:
    from tqdm.auto import tqdm

    def done() -> int:
        return sum(counted(t) for t in study.get_trials(deepcopy=False))

    bar = tqdm(total=config.trials, initial=min(done(), config.trials), desc="trials", unit="trial", position=0,
               disable=not config.progress)
    try:
        while done() < config.trials:
            trial = study.ask()
            runner.run(study, trial)
            gc.collect()  # the trial's model, its bf16 copies and its cache maps go before the next model loads
            write_leaderboard(study, config)  # after every trial: a study stopped for good still has its table
            bar.n = min(done(), config.trials)
            best = _best(study)
            if best is not None:
                bar.set_postfix(best=f"{best.value:.4f}", trial=best.number)
            bar.refresh()
    finally:
        bar.close()


class TrialRunner:
    """Runs one trial: the space's values into a `train` run in trials/NNNN, pruning on validation, then the
    held-out tweets. The base model is loaded for each trial (trials differ in prompt, layers and shape)."""

    def __init__(self, config: TuneConfig, train_split, val_split, holdout):
        self.config, self.train_split, self.val_split, self.holdout = config, train_split, val_split, holdout

    def run(self, study, trial) -> None:
        import optuna
        from optuna.trial import TrialState

        config = self.config
        continued = trial.user_attrs.get(_FOLDER)
        folder = Path(continued or config.out / TRIALS_DIR / f"{trial.number:04d}")
        if not continued and folder.exists() and any(folder.iterdir()):
            study.tell(trial, state=TrialState.FAIL)
            raise UserError(f"{folder}: already holds a trial that study {config.study!r} does not know (was the "
                            "database replaced?); start the study in another --out")
        trial.set_user_attr(_FOLDER, str(folder))
        trial.set_user_attr(_WORKER, config.worker)
        values = config.space.suggest(trial)
        started = time.time()
        record = {"number": trial.number, "values": values, "folder": str(folder)}
        try:
            val_f1, holdout_f1 = self.train_and_score(trial, values, folder)
        except optuna.TrialPruned as pruned:
            self.finish(study, trial, folder, {**record, "state": "pruned", "reason": str(pruned)}, started,
                        state=TrialState.PRUNED)
            return
        except UserError as err:  # e.g. a NaN loss at a high lr: this trial failed, the study goes on
            trial.set_user_attr(_ERROR, str(err))
            self.finish(study, trial, folder, {**record, "state": "failed", "error": str(err)}, started,
                        state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, err)
            return
        except KeyboardInterrupt:
            raise  # stays RUNNING: --resume continues it from its checkpoint
        except BaseException as err:
            trial.set_user_attr(_ERROR, f"{type(err).__name__}: {err}")
            study.tell(trial, state=TrialState.FAIL)
            raise
        score = (val_f1 + holdout_f1) / 2
        trial.set_user_attr(_VAL, val_f1)
        trial.set_user_attr(_HOLDOUT, holdout_f1)
        self.finish(study, trial, folder, {**record, "state": "complete", "value": score, _VAL: val_f1,
                                           _HOLDOUT: holdout_f1}, started, value=score)
        log.info("trial %d: %.4f (validation %.4f, held-out %.4f)", trial.number, score, val_f1, holdout_f1)

    def finish(self, study, trial, folder: Path, record: dict, started: float, state=None, value=None) -> None:
        write_json(folder / TRIAL_FILE, {**record, "seconds": round(time.time() - started, 1)})
        if state is None:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)

    def train_and_score(self, trial, values: dict, folder: Path) -> tuple[float, float]:
        """Train as `doratweet train` would (resuming from the folder's checkpoint when there is one); return the
        kept adapter's validation and held-out macro-F1."""
        import optuna

        from .checkpoints import checkpoint_folders
        from .preparation import load_model_for_training
        from .train import train, validate

        config = self.config
        run = config.space.apply(values, config.base)
        per_step = run.train.batch_size * run.train.grad_accum
        every = max(1, config.eval_every_tweets // per_step)
        run = replace(run, out=folder, rounds=(replace(run.rounds[0], train=replace(
            run.train, eval_every=every, save_every=every)),))
        resume = bool(checkpoint_folders(folder / CHECKPOINT_DIR))  # an interrupted trial's folder
        prepared = load_model_for_training(run)
        folder.mkdir(parents=True, exist_ok=True)

        reported = set()

        def report(step: int, metrics: dict) -> None:
            position = max(1, round(step * per_step / config.eval_every_tweets))  # aligned across batch sizes
            if position in reported:  # the last validation, a few steps after the one before it
                return
            reported.add(position)
            trial.report(metrics["macro_f1"], position)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation macro-F1 {metrics['macro_f1']:.4f} after about "
                                         f"{position * config.eval_every_tweets} tweets")

        summary = train(prepared.base.model, prepared.fmt, self.train_split, self.val_split, run.train, folder,
                        notes=prepared.notes, resume=resume, progress=config.progress,
                        base_model_id=prepared.base.base_model_id, on_validation=report, report_to=run.report_to)
        write_json(folder / SUMMARY_FILE, summary)
        holdout = validate(prepared.base.model, prepared.fmt, prepared.fmt.prompt_ids(self.holdout.texts),
                           self.holdout.labels, run.train.eval_batch_size)
        return summary["best_val_macro_f1"], holdout["macro_f1"]


def _refuse_a_study_of_failures(study) -> None:
    """A study whose every trial failed (bad settings, a NaN loss at every lr) exits with an error, not 0."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if trials and len(failed) == len(trials):
        raise UserError(f"no trial finished: all {len(failed)} failed, the last with: "
                        f"{failed[-1].user_attrs.get(_ERROR, 'an error')}; see the leaderboard")


def _best(study):
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(complete, key=lambda t: t.value) if complete else None


# --- what a study leaves ------------------------------------------------------------------------------------------

def leaderboard_rows(study) -> list[dict]:
    """One row per trial: complete ones best first, then pruned, failed, interrupted and running ones."""
    from optuna.trial import TrialState

    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2, TrialState.RUNNING: 3,
             TrialState.WAITING: 4}
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    rows = []
    for t in study.get_trials(deepcopy=False):
        interrupted = t.user_attrs.get(_INTERRUPTED)
        state = "interrupted" if interrupted else names.get(t.state, t.state.name.lower())
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start and not interrupted else None  # an interrupted one "ends" when the study resumes
        rows.append({"trial": t.number, "state": state, "value": t.value,
                     "val_macro_f1": t.user_attrs.get(_VAL), "holdout_macro_f1": t.user_attrs.get(_HOLDOUT),
                     "last_val_macro_f1": t.intermediate_values[max(t.intermediate_values)]
                     if t.intermediate_values else None,
                     "minutes": round(seconds / 60, 1) if seconds is not None else None,
                     **{k: v for k, v in t.params.items()}, "error": t.user_attrs.get(_ERROR),
                     "folder": t.user_attrs.get(_FOLDER),
                     "_order": (order.get(t.state, 5) + (2 if t.user_attrs.get(_INTERRUPTED) else 0),
                                -(t.value or 0), t.number)})
    rows.sort(key=lambda r: r.pop("_order"))
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 and value else f"{value:.4f}".rstrip("0").rstrip(".") \
            if value < 10 else f"{value:.1f}"
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 40 else text[:37] + "..."


def leaderboard_markdown(study, rows: list[dict], fixed: dict) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row if k != "folder" and (
        k != "error" or any(r.get("error") for r in rows))))
    states = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    head = (f"# Study {_cell(study.study_name)}: {len(rows)} trials (" +
            ", ".join(f"{n} {s}" for s, n in states.items()) +
            ")\n\nvalue = mean of the kept adapter's validation macro-F1 and held-out macro-F1 (the first "
            f"{study.user_attrs.get('holdout')} train tweets, never trained on).\n\n")
    if fixed:
        head += "Fixed by the space: " + ", ".join(f"{k} = {_cell(v)}" for k, v in fixed.items()) + ".\n\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return head + "\n".join(lines) + "\n"


def leaderboard_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in columns})
    return buffer.getvalue()


def write_plots(study, folder: Path) -> list[str]:
    """Optuna's optimisation history and parameter importances as PNGs (importances need 2 complete trials and
    a searched parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots
    from optuna.trial import TrialState

    written = []
    folder.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    drawings = [("optimization_history.png", lambda: plots.plot_optimization_history(study))]
    if len(complete) >= 2 and any(len(t.distributions) for t in complete):
        drawings.append(("param_importances.png", lambda: plots.plot_param_importances(
            study, evaluator=_importance_evaluator())))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        drawings.append(("intermediate_values.png", lambda: plots.plot_intermediate_values(study)))
    for name, draw in drawings:
        try:
            with warnings.catch_warnings():  # "experimental" plots, empty legends: nothing for the user to act on
                warnings.simplefilter("ignore")
                axes = draw()
        except (ValueError, RuntimeError) as err:  # e.g. every trial with the same values: nothing to rank
            log.info("plot %s skipped: %s", name, err)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        write_atomically(folder / name, buffer.getvalue())
        written.append(name)
    return written


def _importance_evaluator():
    """fANOVA (Optuna's default) needs scikit-learn; PED-ANOVA does not."""
    import optuna.importance as importance

    try:
        import sklearn  # noqa: F401
    except ImportError:
        return importance.PedAnovaImportanceEvaluator()
    return importance.FanovaImportanceEvaluator(seed=0)


def write_best(study, config: TuneConfig) -> dict | None:
    """The best trial's adapter and a model card in out/best, when its folder is on this machine."""
    best = _best(study)
    if best is None:
        return None
    source = Path(best.user_attrs.get(_FOLDER, "")) / ADAPTER_DIR
    target = config.out / BEST_DIR
    info = {"trial": best.number, "value": best.value, "params": best.params, "fixed": config.space.fixed,
            _VAL: best.user_attrs.get(_VAL), _HOLDOUT: best.user_attrs.get(_HOLDOUT),
            "folder": best.user_attrs.get(_FOLDER)}
    _check_best_folder(target)  # as at the start: nothing of the user's went in there since
    staging, trash = config.out / f".{BEST_DIR}.tmp", config.out / f".{BEST_DIR}.trash"
    for leftover in (staging, trash):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():  # moved aside in one rename, so best/ is always whole: the old one or the new one
        os.replace(target, trash)
    if source.is_dir():
        shutil.copytree(source, staging / ADAPTER_DIR)
        write_atomically(staging / "README.md", best_card(study, best, config))
        write_json(staging / TRIAL_FILE, info)
        os.replace(staging, target)
    else:  # a stale best/ of this worker's would pass for the study's best
        log.info("the best trial (%d) ran on another worker: its adapter is in %s there", best.number, info["folder"])
    shutil.rmtree(trash, ignore_errors=True)
    return info


def best_card(study, best, config: TuneConfig) -> str:
    """A short Hugging Face style card for the best trial's adapter."""
    from .adapters import read_adapter_record

    import yaml

    from .data import resolve_data_spec

    record = read_adapter_record(Path(best.user_attrs[_FOLDER]) / ADAPTER_DIR)
    base = record.base_model_id or record.notes.model_spec or "the base model"
    values = {**config.space.fixed, **best.params}
    rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in values.items() if k != SYSTEM_PROMPT)
    prompt = values.get(SYSTEM_PROMPT, record.notes.system_prompt)
    data = resolve_data_spec(config.base.data.spec)
    tweeteval = data == "tweet_eval" or (Path(data) / "mapping.txt").is_file()
    front = {"library_name": "peft", "base_model": base,
             "tags": ["doratweet", "dora" if record.config.method == "dora" else "lora", "peft",
                      "sentiment-analysis", "optuna"], **({"datasets": ["tweet_eval"]} if tweeteval else {})}
    adapter = shlex.quote(str(config.out / BEST_DIR))
    data_option = f" --data {shlex.quote(config.base.data.spec)}" if config.base.data.spec else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}
---

# Best trial of study {_cell(study.study_name)}: trial {best.number}

A {"DoRA" if record.config.method == "dora" else "LoRA"} adapter for {_cell(base)}, labelling tweets negative /
neutral / positive, chosen by `doratweet tune` among {len(study.trials)} trials.

| selection figure | macro-F1 |
| --- | --- |
| validation split (best step kept) | {_cell(best.user_attrs.get(_VAL))} |
| held-out train tweets (first {config.holdout}, never trained on) | {_cell(best.user_attrs.get(_HOLDOUT))} |
| trial value (their mean) | {_cell(best.value)} |

The test split was not read. Measure it once, for the configuration you report:

    doratweet evaluate --adapter {adapter}{data_option} --split test

## Values

| option | value |
| --- | --- |
{rows}

System prompt: {prompt!r}

## Use

    doratweet predict --adapter {adapter} "what a great day"
"""


def write_leaderboard(study, config: TuneConfig) -> list[dict]:
    rows = leaderboard_rows(study)
    write_atomically(config.out / "leaderboard.md", leaderboard_markdown(study, rows, config.space.fixed))
    write_atomically(config.out / "leaderboard.csv", leaderboard_csv(rows))
    return rows


def write_study_outputs(study, config: TuneConfig) -> dict:
    rows = write_leaderboard(study, config)
    plots = write_plots(study, config.out / PLOTS_DIR)
    best = write_best(study, config)
    summary = {"study": config.study, "storage": config.shown_storage, "trials": len(rows),
               "states": {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)},
               "best": best, "plots": plots}
    recorded = json.loads((config.out / TUNE_FILE).read_text())
    write_json(config.out / TUNE_FILE, {**recorded, "summary": summary})
    if best is not None:
        log.info("best: trial %d, %.4f (validation %s, held-out %s); leaderboard in %s", best["trial"],
                 best["value"], _cell(best[_VAL]), _cell(best[_HOLDOUT]), config.out / "leaderboard.md")
    return summary
