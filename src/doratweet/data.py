"""Resolve `--data` to validated (text, label) splits.

Accepted specs, tried in this order:
- `tweet_eval` (the default): the Hugging Face dataset `cardiffnlp/tweet_eval`, config `sentiment`;
- `train=a.csv,validation=b.jsonl,test=c.parquet`: one file per split, any subset of splits;
- a folder in the official TweetEval layout (`{train,val,test}_text.txt`, `..._labels.txt`, `mapping.txt`);
- a folder of split files (`train.csv`, `val.jsonl`, `test.parquet`, ...);
- a single `.csv` / `.jsonl` / `.json` (JSON Lines) / `.parquet` file with a text and a label column.

`--data` left out means `$DORATWEET_DATA`, else `tweet_eval`. Labels are ids into `LABELS` (0 negative,
1 neutral, 2 positive); files may also spell them as names. Every text is stripped, as the Hugging Face
loader does. A bad row stops loading with `file:line: problem; fix`, unless `skip_bad_rows` is set: then
bad rows are dropped and counted in one warning per split, so nothing disappears silently.

What counts as a bad row: an empty text, a text over MAX_TEXT_CHARS, an unknown label, a malformed JSON
line, a CSV row with more fields than its header, and a repeated value in a table's id column (the first
row with that id is the one kept). Problems with a whole file stop loading whatever the option says: a
missing or empty file, a missing column, bytes that are not UTF-8 (a file in another encoding; dropping its
non-ASCII rows would bias the data), TweetEval text and label files of different lengths.

Files are read whole, by the rules of tables.py (encodings, line endings, CSV quoting), which `predict --input`
follows too.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path

from . import LABELS
from .errors import UserError, first_line
from .tables import TABLE_SUFFIXES, open_table, read_lines, require_column
from .texts import MAX_TEXT_CHARS  # a text far longer than a tweet is a bad row, not data (see texts.py)

log = logging.getLogger("doratweet.data")

DEFAULT_DATA = "tweet_eval"
HUB_ID, HUB_CONFIG = "cardiffnlp/tweet_eval", "sentiment"
SPLIT_NAMES = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
# The official layout calls the validation split "val".
_TWEETEVAL_PREFIXES = {"train": "train", "validation": "val", "test": "test"}
_ACCEPTED_LABELS = "0, 1, 2, " + ", ".join(LABELS)
_SKIP_HINT = "or pass --skip-bad-rows to drop bad rows"


@dataclass(frozen=True)
class Split:
    name: str  # "train" | "validation" | "test", or another name for a single file
    texts: list[str]
    labels: list[int]  # ids into LABELS
    source: str  # where the rows came from, for logs and the model card

    def __post_init__(self):
        assert len(self.texts) == len(self.labels), "one label per text"

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Split:
        """The first `n` rows (all of them when `n` is None), e.g. for `--limit`."""
        if n is None:
            return self
        if n < 0:
            raise UserError(f"row limit (--limit) must be 0 or more, got {n}")
        return replace(self, texts=self.texts[:n], labels=self.labels[:n])

    def skip(self, n: int) -> Split:
        """All rows after the first `n`, e.g. to go on training an adapter on tweets it has not seen."""
        if n < 0:
            raise UserError(f"--train-skip must be 0 or more, got {n}")
        if n >= len(self):
            raise UserError(f"--train-skip {n}: the {self.name} split has only {len(self)} rows; skip fewer")
        return replace(self, texts=self.texts[n:], labels=self.labels[n:])


def canonical_split_name(name: str) -> str:
    """`val`, `valid` and `dev` all mean `validation`; names are case-insensitive."""
    name = name.strip().lower()
    return _SPLIT_ALIASES.get(name, name)


def resolve_data_spec(spec: str | None) -> str:
    """`spec`, else `$DORATWEET_DATA` when set and non-empty, else `tweet_eval`."""
    if spec is not None:
        return spec
    return os.environ.get("DORATWEET_DATA") or DEFAULT_DATA


def load_data(
    spec: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    id_column: str | None = "id",
    skip_bad_rows: bool = False,
) -> dict[str, Split]:
    """All splits that `spec` provides, keyed by split name, in train/validation/test order.

    A table with an `id_column` must not repeat an id; None turns that check off.
    """
    from_env = spec is None and bool(os.environ.get("DORATWEET_DATA"))
    option = "DORATWEET_DATA" if from_env else "--data"
    spec = resolve_data_spec(spec)
    if not spec.strip():
        raise UserError(f"{option} is empty; pass a data path, or leave it out to use {DEFAULT_DATA}")
    options = dict(text_column=text_column, label_column=label_column, id_column=id_column, skip_bad_rows=skip_bad_rows)

    if spec in (DEFAULT_DATA, HUB_ID):
        splits = _load_hub(skip_bad_rows)
    elif "=" in spec and not Path(spec).expanduser().exists():
        files = _parse_split_mapping(spec, option)
        splits = [_load_table(path, name, **options) for name, path in files.items()]
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(
                f"{option} {spec}: no such file or folder; pass a TweetEval folder, a "
                f"{'/'.join(TABLE_SUFFIXES)} file, a folder of split files, split=path pairs, or {DEFAULT_DATA}"
            )
        if path.is_dir():
            splits = _load_folder(path, **options)
        else:
            splits = [_load_table(path, _split_name_from_stem(path), **options)]
    return {split.name: split for split in sorted(splits, key=_split_order)}


def load_split(spec: str | None, split: str, **load_options) -> Split:
    """One split of `load_data(spec)`, e.g. `load_split(None, "val")` for the validation split."""
    name = canonical_split_name(split)
    splits = load_data(spec, **load_options)
    if name not in splits:
        raise UserError(
            f"data {resolve_data_spec(spec)!r} has no {name!r} split (it has: {', '.join(splits)}); "
            f"add a {name} file or pick one of those splits"
        )
    return splits[name]


# --- bad rows: raise on the first, or count them and log one line -------------------------------------


class _BadRows:
    """Each message is `where: problem; fix hint`: the fix belongs to the problem, the hint (the way out
    with --skip-bad-rows, or "or remove it") to the caller."""

    def __init__(self, skip: bool, hint: str = _SKIP_HINT):
        self.skip = skip
        self.hint = hint
        self.problems: list[str] = []

    def add(self, where: str, problem: str, fix: str = "fix the row") -> None:
        if not self.skip:
            raise UserError(f"{where}: {problem}; {fix} {self.hint}")
        self.problems.append(f"{where}: {problem}")

    def log_summary(self, split_name: str) -> None:
        if self.problems:
            count = len(self.problems)
            log.warning(
                "skipped %d bad row%s in %s (first: %s)",
                count, "" if count == 1 else "s", split_name, self.problems[0],
            )


def _keep_good_rows(
    rows: Iterable[tuple[str, object, str, object, object]], bad_rows: _BadRows
) -> tuple[list[str], list[int]]:
    """Stripped texts and label ids from (text_where, text, label_where, label, row_id) rows.

    Bad rows go to `bad_rows`. `row_id` is None where the source has no id column; an id already seen on a
    good row makes a bad row, so skipping keeps the first row with each id.
    """
    texts, labels = [], []
    where_id_was_seen: dict[str, str] = {}
    for text_where, raw_text, label_where, raw_label, row_id in rows:
        text = _good_text(text_where, raw_text, bad_rows)
        if text is None:
            continue
        label = _label_id(raw_label)
        if label is None:
            bad_rows.add(label_where, _label_problem(raw_label))
            continue
        id_key = _id_key(row_id)
        if id_key in where_id_was_seen:
            first = where_id_was_seen[id_key]
            bad_rows.add(text_where, f"duplicate id {row_id!r}, first used on {first}", fix="give each row its own id")
            continue
        if id_key is not None:
            where_id_was_seen[id_key] = text_where
        texts.append(text)
        labels.append(label)
    return texts, labels


def _good_text(where: str, value, bad_rows: _BadRows) -> str | None:
    """`value` stripped, or None once `bad_rows` has been told what is wrong with it."""
    problem = _text_problem(value)
    if problem:
        bad_rows.add(where, problem)
        return None
    text = value.strip()
    if len(text) > MAX_TEXT_CHARS:
        too_long = f"text is {len(text):,} characters, over the {MAX_TEXT_CHARS:,} allowed (a tweet has at most 280)"
        bad_rows.add(where, too_long, fix="shorten it")
        return None
    return text


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text_problem(value) -> str | None:
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return "empty text"
    if not isinstance(value, str):
        return f"text is not a string: {value!r}"
    return None


def _id_key(value) -> str | None:
    """Ids compare as text, so 7 and "7" are one id; a missing or blank id is never a duplicate."""
    if _is_missing(value):
        return None
    return str(value).strip() or None


def _label_id(value) -> int | None:
    """0, 1, 2 as numbers or digit strings, or a label name (any case); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():  # pandas turns an int column with gaps into floats
        value = int(value)
    if isinstance(value, numbers.Integral):
        return int(value) if 0 <= value < len(LABELS) else None
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("0", "1", "2"):
            return int(name)
        if name in LABELS:
            return LABELS.index(name)
    return None


def _label_problem(value) -> str:
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return f"missing label; accepted: {_ACCEPTED_LABELS}"
    return f"unknown label {value!r}; accepted: {_ACCEPTED_LABELS}"


def _make_split(name: str, texts: list[str], labels: list[int], source: str, bad_rows: _BadRows) -> Split:
    bad_rows.log_summary(name)
    if not texts:
        skipped = f" after skipping {len(bad_rows.problems)} bad rows" if bad_rows.problems else ""
        raise UserError(f"{source}: no rows{skipped} in the {name} split; give it at least one labelled text")
    return Split(name=name, texts=texts, labels=labels, source=source)


# --- the Hugging Face Hub -----------------------------------------------------------------------------


def _load_hub(skip_bad_rows: bool) -> list[Split]:
    source = f"{HUB_ID} ({HUB_CONFIG})"
    try:
        import datasets

        dataset_dict = datasets.load_dataset(HUB_ID, HUB_CONFIG)
    except Exception as error:  # no internet, no cache, hub down, datasets missing: all mean "use a local copy"
        reason = first_line(error, 200)
        raise UserError(
            f"could not load {source} from the Hugging Face Hub ({type(error).__name__}: {reason}); "
            f"pass --data PATH or set DORATWEET_DATA to a TweetEval folder (e.g. .../tweeteval/sentiment) "
            f"or a data file"
        ) from error

    splits = []
    for hub_split, dataset in dataset_dict.items():
        name = canonical_split_name(hub_split)
        where = [f"{source} {hub_split} row {index}" for index in range(1, len(dataset) + 1)]
        bad_rows = _BadRows(skip_bad_rows)
        rows = zip(where, dataset["text"], where, dataset["label"], repeat(None))
        texts, labels = _keep_good_rows(rows, bad_rows)
        splits.append(_make_split(name, texts, labels, source, bad_rows))
    return splits


# --- folders ------------------------------------------------------------------------------------------


def _load_folder(
    folder: Path, *, text_column: str, label_column: str, id_column: str | None, skip_bad_rows: bool
) -> list[Split]:
    """A TweetEval layout or a folder of train/validation/test files; a mix of both is ambiguous."""
    split_files = _split_files(folder)
    if _has_tweeteval_files(folder):
        if split_files:
            names = ", ".join(path.name for path in split_files.values())
            raise UserError(f"{folder}: holds TweetEval *_text.txt files and split files ({names}); keep one layout")
        return _load_tweeteval_folder(folder, skip_bad_rows)
    if split_files:
        options = dict(text_column=text_column, label_column=label_column, id_column=id_column,
                       skip_bad_rows=skip_bad_rows)
        return [_load_table(path, name, **options) for name, path in split_files.items()]
    raise UserError(
        f"{folder}: no data files; expected TweetEval files ({{train,val,test}}_text.txt with "
        f"{{train,val,test}}_labels.txt) or train/validation/test files ending in {', '.join(TABLE_SUFFIXES)}"
    )


# --- the official TweetEval folder layout -------------------------------------------------------------


def _has_tweeteval_files(folder: Path) -> bool:
    return any(
        (folder / f"{prefix}_{kind}.txt").exists()
        for prefix in _TWEETEVAL_PREFIXES.values()
        for kind in ("text", "labels")
    )


def _load_tweeteval_folder(folder: Path, skip_bad_rows: bool) -> list[Split]:
    _check_mapping(folder / "mapping.txt")
    splits = []
    for name, prefix in _TWEETEVAL_PREFIXES.items():
        text_path, label_path = folder / f"{prefix}_text.txt", folder / f"{prefix}_labels.txt"
        if not text_path.exists() and not label_path.exists():
            continue
        for present, missing in ((text_path, label_path), (label_path, text_path)):
            if not missing.exists():
                raise UserError(f"{present} has no partner {missing.name} in {folder}; add it or remove {present.name}")

        text_lines, label_lines = _read_lines(text_path), _read_lines(label_path)
        if len(text_lines) != len(label_lines):
            raise _line_count_mismatch(text_path, text_lines, label_path, label_lines)
        line_numbers = range(1, len(text_lines) + 1)
        rows = (
            (f"{text_path}:{n}", text, f"{label_path}:{n}", label, None)
            for n, text, label in zip(line_numbers, text_lines, label_lines)
        )
        bad_rows = _BadRows(skip_bad_rows)
        texts, labels = _keep_good_rows(rows, bad_rows)
        splits.append(_make_split(name, texts, labels, f"{text_path} + {label_path.name}", bad_rows))
    return splits


def _line_count_mismatch(text_path: Path, text_lines: list[str], label_path: Path, label_lines: list[str]) -> UserError:
    (short_path, short_lines), (long_path, _) = sorted(
        [(text_path, text_lines), (label_path, label_lines)], key=lambda pair: len(pair[1])
    )
    message = (
        f"{text_path} has {len(text_lines)} lines but {label_path} has {len(label_lines)}; each text line needs "
        f"exactly one label line (the first line without a partner is {long_path.name}:{len(short_lines) + 1})"
    )
    if any("\r" in line for line in short_lines):
        # Old Mac files end lines with a lone '\r', which is not a line break here (see the module docstring).
        message += f"; {short_path.name} holds lone \\r characters: if they end lines, save it with \\n line endings"
    return UserError(message)


def _check_mapping(path: Path) -> None:
    """mapping.txt must say 0 negative, 1 neutral, 2 positive: our label ids are positions in LABELS."""
    if not path.exists():
        return  # the official sentiment mapping is assumed
    found = {}
    for line_number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{path}:{line_number}: expected '<id><TAB><label name>', found {line!r}")
        found[parts[0]] = parts[1].lower()
    expected = {str(label_id): name for label_id, name in enumerate(LABELS)}
    if found != expected:
        shown = ", ".join(f"{label_id} {name}" for label_id, name in found.items())
        raise UserError(
            f"{path}: maps {shown or 'nothing'}, but the sentiment task needs 0 negative, 1 neutral, 2 positive; "
            f"point --data at the TweetEval sentiment folder or fix mapping.txt"
        )


# --- csv / jsonl / parquet files ----------------------------------------------------------------------


def _parse_split_mapping(spec: str, option: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for part in spec.split(","):
        name, separator, path = part.partition("=")
        name = canonical_split_name(name)
        if not separator or not path.strip():
            raise UserError(f"{option}: {part.strip()!r} is not split=path; write e.g. train=a.csv,test=b.csv")
        if name not in SPLIT_NAMES:
            raise UserError(f"{option}: unknown split {name!r} in {part.strip()!r}; use {', '.join(SPLIT_NAMES)}")
        if name in files:
            raise UserError(f"{option}: the {name} split is given twice; give each split one file")
        files[name] = _existing_path(path.strip(), f"{name} file in {option}")
    return files


def _split_name_from_stem(path: Path) -> str:
    """`val.csv` holds the validation split; a file with any other name is treated as a test set."""
    name = canonical_split_name(path.stem)
    return name if name in SPLIT_NAMES else "test"


def _split_files(folder: Path) -> dict[str, Path]:
    """{split name: file} for train/validation/test table files in `folder`."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = canonical_split_name(path.stem)
        if not path.is_file() or path.suffix.lower() not in TABLE_SUFFIXES or name not in SPLIT_NAMES:
            continue
        if name in files:
            raise UserError(f"{folder}: two files for the {name} split ({files[name].name}, {path.name}); keep one")
        files[name] = path
    return files


def _load_table(
    path: Path, name: str, *, text_column: str, label_column: str, id_column: str | None, skip_bad_rows: bool
) -> Split:
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise UserError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; use {', '.join(TABLE_SUFFIXES)}, "
            f"or pass the folder that holds a TweetEval layout ({{train,val,test}}_text.txt and _labels.txt)"
        )
    bad_rows = _BadRows(skip_bad_rows)
    table = open_table(path, bad_row=bad_rows.add, whole=True, unique_columns=True)
    records = list(table.records)  # the file's own problems (a malformed line, say) come before its columns'
    # JSON Lines has no header: its columns are every key seen, in order of first appearance.
    columns = table.columns if table.columns is not None else list(dict.fromkeys(
        key for record in records for key in record.fields))
    require_column(path, columns, text_column, "--text-column")
    require_column(path, columns, label_column, "--label-column")
    rows = (
        (record.where, record.fields.get(text_column), record.where, record.fields.get(label_column),
         record.fields.get(id_column) if id_column else None)
        for record in records
    )
    texts, labels = _keep_good_rows(rows, bad_rows)
    return _make_split(name, texts, labels, str(path), bad_rows)


# --- plain files --------------------------------------------------------------------------------------


def _existing_path(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path}: no such file; check the path")
    return path


def _read_lines(path: Path) -> list[str]:
    return [line for _, line in read_lines(path, whole=True)]


def _split_order(split: Split) -> tuple[int, str]:
    return (SPLIT_NAMES.index(split.name) if split.name in SPLIT_NAMES else len(SPLIT_NAMES), split.name)
