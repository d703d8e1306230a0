"""What a doratweet run writes in its --out folder, and how to tell it from a user's files there.

`--overwrite` may replace only what a doratweet run wrote. A run's files have fixed names, and each is recognised
by its content as well as its name: a checkpoint folder `step-NNNNNNNN` holds only `state.json` and a safetensors
file, the adapter's config carries doratweet's own section, the model card's front matter is tagged `doratweet`,
plots are PNGs, predictions are label ids, and so on. An entry under one of those names that does not look like
that (a user's README.md, `checkpoint/thesis.tex`, an empty `round-1/`) is refused in one line naming it, before
anything is loaded or written. Entries under other names are never touched.

Only names and the first bytes of most files are read, so checking a large run folder costs next to nothing.

Every name a run writes is defined here (the adapter's and a checkpoint's own files by their formats, in
adapters/peft_format.py and checkpoints.py), with the checks of --out before a run and the writers of its JSON and
label files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from .adapters.peft_format import CONFIG_FILE as ADAPTER_CONFIG_FILE
from .adapters.peft_format import WEIGHTS_FILE as ADAPTER_WEIGHTS_FILE
from .checkpoints import STATE_FILE, TENSORS_FILE, checkpoint_folders
from .errors import UserError
from .files import check_creatable, write_atomically

# What `doratweet train` writes, and each round of `doratweet run`:
ADAPTER_DIR = "adapter"  # the best adapter, in PEFT's format
CHECKPOINT_DIR = "checkpoint"  # checkpoints.py: step-NNNNNNNN/
LOG_FILE = "train_log.jsonl"  # one JSON object a line: losses every --log-every steps, validations
SUMMARY_FILE = "train_summary.json"  # what training did; in out/round-N it also marks the round as done
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard: the lines of train_log.jsonl as TensorBoard events
# What `doratweet run` writes on top:
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"  # the model card
PREDICTIONS_DIR = "predictions"
PREDICTION_FILES = ("test_before.txt", "test_after.txt")  # one label id a line, TweetEval's format
PLOTS_DIR = "plots"
PLOT_FILES = ("training_curves.png", "confusion_before.png", "confusion_after.png", "per_class_f1.png")


def round_folder(out_dir: Path, number: int) -> Path:
    """Where round `number` of a run in several rounds is kept (the last round writes out_dir itself)."""
    return Path(out_dir) / f"round-{number}"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TRASH = ".trash"  # suffix of an entry renamed for removal


class _Foreign(Exception):
    """An entry under a doratweet name that doratweet did not write."""

    def __init__(self, path: Path, why: str):
        super().__init__(path, why)
        self.path, self.why = path, why


# --- what doratweet's files look like -------------------------------------------------------------------------

def _anything(path: Path) -> bool:
    return True


def is_json_object(path: Path, *keys: str) -> bool:
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, OSError):
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def _safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte length of its JSON header, then the header's `{`."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE


def is_label_ids(path: Path) -> bool:
    return all(re.fullmatch(rb"-?\d", line) for line in path.read_bytes().splitlines())


def _train_log(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline()
    if not first:
        return True
    try:
        line = json.loads(first)
    except ValueError:
        return False
    return isinstance(line, dict) and "step" in line


_CARD_SEAL = "<!-- doratweet wrote this card; the SHA-256 of the text above: "


def sealed_card(text: str) -> str:
    """The card with a last line holding its checksum, so that a card the user edited is told from one doratweet
    wrote, and --overwrite or `report` never replace the user's edits."""
    return f"{text}{_CARD_SEAL}{hashlib.sha256(text.encode('utf-8')).hexdigest()} -->\n"


def is_own_card(path: Path) -> bool:
    """A model card `doratweet report` wrote, unchanged since: YAML front matter whose tags include `doratweet`, and
    the checksum of `sealed_card` (cards written before the seal existed have none)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if _CARD_SEAL in text:
        body, _, seal = text.rpartition(_CARD_SEAL)
        if seal != f"{hashlib.sha256(body.encode('utf-8')).hexdigest()} -->\n":
            return False
    if not text.startswith("---\n") or "\n---" not in text[3:]:
        return False
    try:
        front = yaml.safe_load(text[4:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return False
    return isinstance(front, dict) and isinstance(front.get("tags"), list) and "doratweet" in front["tags"]


# --- the layout of a run folder ---------------------------------------------------------------------------------

Check = Callable[[Path], None]


def _file(recognised: Callable[[Path], bool] = _anything) -> Check:
    def check(path: Path) -> None:
        if path.is_symlink():
            raise _Foreign(path, "is a link")
        if not path.is_file():
            raise _Foreign(path, "is not a plain file")
        if not recognised(path):
            raise _Foreign(path, "does not hold what doratweet writes there, or was changed since")
    return check


def _not_ours(path: Path) -> None:
    raise _Foreign(path, "is not a temporary file doratweet writes")


class _Layout:
    """The entries doratweet writes in one folder: exact names, and patterns (checkpoint steps, rounds)."""

    def __init__(self, names: dict[str, Check], patterns: dict[str, Check] | None = None):
        self.names, self.patterns = names, patterns or {}

    def check_for(self, name: str) -> Check | None:
        if name in self.names:
            return self.names[name]
        for pattern, check in self.patterns.items():
            if re.fullmatch(pattern, name):
                return check
        if name.startswith(".") and name.endswith(_TRASH):  # a removal of folder NAME cut short: what is left of it
            layout = getattr(self.check_for(name[1 : -len(_TRASH)]), "layout", None)
            return _folder(layout, may_be_empty=True) if layout else None
        for own, check in self.names.items():
            # A write of file NAME cut short: `.NAME.<8 random>.tmp` (files.atomic_path: tempfile's mkstemp), or
            # `.NAME.tmp` (the fixed name earlier versions used). Another `.NAME.*.tmp` only looks like one: refused.
            if name.startswith(f".{own}.") and name.endswith(".tmp"):
                if not hasattr(check, "layout") and re.fullmatch(rf"\.{re.escape(own)}(\.[a-z0-9_]{{8}})?\.tmp", name):
                    return _file()
                return _not_ours
        return None

    def check_entry(self, entry: Path) -> None:
        check = self.check_for(entry.name)
        if check is None:
            raise _Foreign(entry, "is not a file doratweet writes there")
        check(entry)


def _folder(layout: _Layout, may_be_empty: bool = False) -> Check:
    """A folder doratweet made: a real folder, not empty (unless `may_be_empty`: what a removal cut short leaves),
    every entry in `layout` and recognised."""
    def check(path: Path) -> None:
        if path.is_symlink():
            raise _Foreign(path, "is a link")
        if not path.is_dir():
            raise _Foreign(path, "is not a folder")
        entries = sorted(path.iterdir())
        if not entries and not may_be_empty:
            raise _Foreign(path, "is an empty folder")
        for entry in entries:
            layout.check_entry(entry)
    check.layout = layout
    return check


_CHECKPOINT_STEP = _folder(_Layout({STATE_FILE: _file(),  # even a damaged state.json is the checkpoint's own
                                    TENSORS_FILE: _file(_safetensors)}))
TRAINING_LAYOUT = _Layout({
    ADAPTER_DIR: _folder(_Layout({ADAPTER_CONFIG_FILE: _file(lambda p: is_json_object(p, "peft_type", "doratweet")),
                                  ADAPTER_WEIGHTS_FILE: _file(_safetensors)})),
    CHECKPOINT_DIR: _folder(_Layout({}, {r"step-\d{8}": _CHECKPOINT_STEP,
                                         r"\.step-\d{8}\.tmp": _CHECKPOINT_STEP})),
    LOG_FILE: _file(_train_log),
    SUMMARY_FILE: _file(lambda p: is_json_object(p, "steps")),
    TENSORBOARD_DIR: _folder(_Layout({}, {r"events\.out\.tfevents\.[^/]+": _file()})),
})
RUN_LAYOUT = _Layout({
    **TRAINING_LAYOUT.names,
    METRICS_FILE: _file(lambda p: is_json_object(p, "results", "training")),
    CARD_FILE: _file(is_own_card),
    PREDICTIONS_DIR: _folder(_Layout({name: _file(is_label_ids) for name in PREDICTION_FILES})),
    PLOTS_DIR: _folder(_Layout({name: _file(is_png) for name in PLOT_FILES})),
}, {r"round-\d+": _folder(TRAINING_LAYOUT)})


def previous_run_entries(out_dir: Path) -> list[Path]:
    """The entries of `out_dir` that a previous doratweet run wrote, for --overwrite to remove. An entry under a
    run's name that doratweet did not write is refused in one line naming it; other names are left out."""
    if not out_dir.is_dir():
        return []
    found = []
    for entry in sorted(out_dir.iterdir()):
        check = RUN_LAYOUT.check_for(entry.name)
        if check is None:
            continue
        try:
            check(entry)
        except _Foreign as foreign:
            shown = foreign.path.relative_to(out_dir).as_posix() + ("/" if foreign.path.is_dir() else "")
            raise UserError(f"--out {out_dir}: {shown} {foreign.why}, and --overwrite replaces only what a doratweet "
                            f"run wrote; move {shown} out of --out, or choose another --out") from None
        found.append(entry)
    return found


def remove_previous_run(out_dir: Path) -> None:
    """--overwrite: remove what a previous run wrote in `out_dir` (see `previous_run_entries`), so that nothing of
    it (an old checkpoint a later --resume would pick up, an old card or metrics) passes for this run's."""
    for entry in previous_run_entries(out_dir):
        if entry.is_dir() and not entry.is_symlink():
            # Renamed first: a removal cut short leaves `.NAME.trash`, which no run reads and the next removes.
            trash = entry if entry.name.endswith(_TRASH) else entry.with_name(f".{entry.name}{_TRASH}")
            if trash != entry:
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(entry, trash)
            shutil.rmtree(trash)
        else:
            entry.unlink()


def refuse_links(folder: Path, names) -> None:
    """Before writing into `folder`: refuse an entry among `names` that is a link. Writing through it would replace
    files wherever it points, outside the run folder included."""
    for name in names:
        path = Path(folder) / name
        if path.is_symlink():
            raise UserError(f"{path}: is a link (to {os.readlink(path)}), and doratweet never writes through a link; "
                            "replace it with a real file or folder, or remove it")


def refuse_foreign_plots(run_dir: Path) -> None:
    """Before drawing the plots: refuse a file under a plot's name that is not a PNG (or is a link)."""
    for name in PLOT_FILES:
        refuse_to_replace(Path(run_dir) / PLOTS_DIR / name, is_png, "a doratweet plot")


def refuse_to_replace(path: Path, recognised: Callable[[Path], bool], what: str) -> None:
    """Before writing `path`: refuse in one line when a file is there that doratweet did not write."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        _file(recognised)(path)
    except _Foreign as foreign:
        raise UserError(f"{path}: {foreign.why} ({what} goes there), and doratweet replaces only what it wrote; "
                        "move it away, then run this again") from None


# --- before a run, and its writers ------------------------------------------------------------------------------------

def check_out_dir(out_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse, before anything is loaded or written, an --out that would lose the user's files or cannot resume."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; choose a folder")
    check_creatable(out_dir, "--out")
    if resume and not any(checkpoint_folders(folder / CHECKPOINT_DIR) or (folder / SUMMARY_FILE).is_file()
                          for folder in [out_dir, *out_dir.glob("round-*")]):
        raise UserError(f"--resume: no checkpoint in {out_dir / CHECKPOINT_DIR}; train without --resume, or point "
                        "--out at the run (checkpoints are written every --save-every steps and on Ctrl-C)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise UserError(f"--out {out_dir}: the folder exists and is not empty; pass --overwrite or choose another")
    if resume:  # a resumed run writes into the folder as it is: never through a link out of it
        refuse_links(out_dir, [*RUN_LAYOUT.names, *(path.name for path in out_dir.glob("round-*"))])
        for folder in out_dir.glob("round-*"):
            refuse_links(folder, TRAINING_LAYOUT.names)
        refuse_foreign_plots(out_dir)
    if overwrite:
        previous_run_entries(out_dir)  # refuses, naming it, anything under a run's names that no run wrote


def start_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Create --out once the inputs are known to be good, so a bad input leaves no half-made folder behind.
    --overwrite removes the previous run's files (only those: see above), so that none of them passes for this
    run's: an old checkpoint or round a later --resume would pick up, an old card beside a new adapter.
    Returns whether the folder was made now (see `remove_if_still_empty`)."""
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_previous_run(out_dir)
    return made


def remove_if_still_empty(out_dir: Path, made: bool) -> None:
    """A run stopped or failed before it wrote anything (in the frozen-layer cache's build, say) leaves no empty
    --out behind, if it made the folder."""
    if made and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def write_json(path: Path, value) -> None:
    write_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_label_ids(path: Path, labels) -> None:
    write_atomically(path, "".join(f"{int(y)}\n" for y in labels))
