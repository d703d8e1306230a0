"""File-to-file prediction for inputs of any size: stream, label in batches, append, resume.

`predict_file` first reads the whole input once, a row at a time, to hash it and check every row, so a bad row is
refused before anything is written. Then it reads the input a batch at a time (streamed by tables.py, which reads
training data too), so memory holds one batch, never the file. Each labelled batch is appended to the output and
flushed, then a progress file beside the output (`.NAME.progress`, replaced atomically) records how many rows and
bytes are done and the SHA-256 of those bytes, with the SHA-256 of the input and the settings that decide the
labels and their digits (adapter, options, batch size: padding changes the last digits, device). Resuming relies
on it: an output is continued only when its progress file matches this input and these settings and its first
bytes are the ones recorded; what follows them (rows written after the last record, a half-written row) is cut off
and written again, so a resumed output is byte for byte the uninterrupted one. Any other existing file is refused
unless `overwrite`. When the output is complete its progress file stays, marked complete, so a rerun can tell an
output that is done from one that was changed since. Rows keep the input's order and its id column, when it has
one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from . import __version__
from .errors import UserError
from .files import write_atomically
from .tables import format_rows, open_table, prediction_columns, prediction_row, read_lines, require_column
from .texts import text_problem

log = logging.getLogger("doratweet")

INPUT_SUFFIXES = (".txt", ".csv", ".jsonl", ".json", ".parquet")
OUTPUT_FORMATS = ("jsonl", "csv")
PROGRESS_WRITER = "doratweet predict"


@dataclass(frozen=True)
class InputRow:
    where: str  # file:line (or file:row) for error messages
    text: str
    row_id: object = None  # the id column's value; None when the input has no id column


@dataclass(frozen=True)
class BatchResult:
    written: int  # rows appended by this call
    skipped: int  # rows already in the output (resumed)
    already_complete: bool  # the output held every row; nothing was written


# --- reading the input, one row at a time ----------------------------------------------------------------


def iter_input_rows(path: str | os.PathLike, text_column: str = "text", id_column: str | None = "id",
                    raw_hasher=None) -> Iterator[InputRow]:
    """The input's rows in order; `id_column` is passed through when the file has that column. A text file's
    bytes, as they are read, also go to `raw_hasher` (a hashlib object) when one is given."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--input {path}: no such file; check the path")
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise UserError(f"--input {path}: unsupported file type {path.suffix or '(none)'!r}; "
                        f"use {', '.join(INPUT_SUFFIXES)}")
    return _input_rows(path, text_column, id_column, raw_hasher)


def _input_rows(path: Path, text_column: str, id_column: str | None, raw_hasher) -> Iterator[InputRow]:
    if path.suffix.lower() == ".txt":  # one text per line; a blank line is an empty text, so output row N is line N
        for line_number, line in read_lines(path, raw_hasher=raw_hasher):
            where = f"{path}:{line_number}"
            yield InputRow(where, checked_text(where, line))
        return
    table = open_table(path, bad_row=_refuse_row, only_columns=[text_column, id_column], raw_hasher=raw_hasher)
    if table.columns is not None:
        require_column(path, table.columns, text_column, "--text-column")
    for record in table.records:
        if text_column not in record.fields:  # JSON Lines: each line names its own fields
            fields = ", ".join(map(repr, record.fields))
            raise UserError(f"{record.where}: no field {text_column!r} (fields: {fields}); choose one with --text-column")
        row_id = record.fields.get(id_column) if id_column else None
        yield InputRow(record.where, checked_text(record.where, record.fields[text_column]), row_id)


def _refuse_row(where: str, problem: str, fix: str = "fix or remove that line") -> None:
    raise UserError(f"{where}: {problem}; {fix}")


def checked_text(where: str, value, *, in_a_file: bool = True) -> str:
    """The text stripped, by the rule every path follows (texts.py); else the text is named, and the fix said
    (a row of a file may also be removed)."""
    problem = text_problem(value)
    if problem:
        fix = "shorten it" if problem.startswith("text is ") else "fix it"
        raise UserError(f"{where}: {problem}; {fix}{' or remove that row' if in_a_file else ''}")
    return value.strip()


# --- the whole job -------------------------------------------------------------------------------------


def output_format(path: str | os.PathLike, fmt: str | None) -> str:
    if fmt in OUTPUT_FORMATS:
        return fmt
    suffix = Path(path).suffix.lower()
    if fmt is None and suffix in (".jsonl", ".csv"):
        return suffix[1:]
    raise UserError(f"--output {path}: batch prediction writes .jsonl or .csv; rename the file or pass --format jsonl/csv")


def check_output_path(output_path: str | os.PathLike, input_path: str | os.PathLike | None) -> None:
    """Refuse an --output that cannot be written as a file, or that is the --input under any name or link
    (writing there would destroy the texts while they are read; --overwrite does not change that)."""
    output_path = Path(output_path)
    if output_path.is_dir():
        raise UserError(f"--output {output_path}: is a folder; give a file name, e.g. {output_path / 'labels.jsonl'}")
    parent = next((folder for folder in output_path.parents if folder.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--output {output_path}: {parent} is a file, not a folder; choose another path")
    if input_path and input_path != "-" and output_path.exists() and Path(input_path).exists() \
            and os.path.samefile(input_path, output_path):
        raise UserError(f"--output {output_path}: is the --input file ({input_path}); writing labels there would "
                        "destroy the texts being read; choose another file")
    if output_path.is_symlink():  # writing through it would create or replace a file somewhere else
        real = os.path.realpath(output_path)
        raise UserError(f"--output {output_path}: is a symbolic link to {real}; give that path itself, or "
                        "another file")
    if parent is not None:
        _check_can_create_files_in(output_path, parent)


def _check_can_create_files_in(output_path: Path, folder: Path) -> None:
    """Create and remove a file in the folder the output (or the folders leading to it) will be made in, so
    that a folder the user may not write (read-only, /sys, /proc) is said before the model loads, not after."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=f".{output_path.name}.", suffix=".check")
    except OSError as error:
        raise UserError(f"--output {output_path}: cannot create a file in {folder} ({error.strerror or error}); "
                        "choose another path, or a folder you may write to") from None
    os.close(handle)
    os.unlink(name)


def progress_file(output_path: Path) -> Path:
    """The record beside an output that says which job wrote it and how far it got (see the module docstring)."""
    return output_path.with_name(f".{output_path.name}.progress")


@dataclass
class _Progress:
    rows: int  # complete rows in the output
    size: int  # the bytes they take; anything after them is cut off on resume
    hasher: object  # SHA-256 of those bytes, to be continued
    complete: bool


def predict_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    load_classifier: Callable[[], object],
    *,
    text_column: str = "text",
    id_column: str | None = "id",
    fmt: str | None = None,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
    job: dict | None = None,
) -> BatchResult:
    """Label every row of `input_path` into `output_path`, resuming an output this same job left unfinished.

    `job` holds whatever else decides the labels (the caller's adapter hash, base model, precision); an
    output written with other values, or from another input, or not by doratweet at all, is refused unless
    `overwrite`. `load_classifier` is called only when there is work to do, so a complete output costs no
    model load. An interruption is re-raised as the same kind of KeyboardInterrupt, saying how many rows are kept.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, got {batch_size}")
    output_path = Path(output_path)
    check_output_path(output_path, input_path)
    fmt = output_format(output_path, fmt)
    input_file = Path(input_path).expanduser()
    input_sha256, total = _check_every_row(input_file, text_column, id_column)
    if total == 0:
        raise UserError(f"--input {input_path}: no texts to classify; put one text per line (.txt) or one per row")
    rows = iter_input_rows(input_file, text_column, id_column)
    first = next(rows)
    kept_id = id_column if id_column and first.row_id is not None else None
    rows = _chain_first(first, rows)

    record = {"written_by": PROGRESS_WRITER,
              "input": {"bytes": input_file.stat().st_size, "sha256": input_sha256},
              "settings": {"--text-column": text_column, "--id-column": id_column, "--format": fmt,
                           "--batch-size": batch_size, "doratweet": __version__, **(job or {})}}
    progress_path = progress_file(output_path)
    if not output_path.exists() and not overwrite:
        check_progress_file_is_ours(progress_path)
    done = None
    if output_path.exists() and not overwrite:
        done = _resumable(output_path, progress_path, record, input_path)
        if done.complete:
            return BatchResult(written=0, skipped=done.rows, already_complete=True)
    skipped = done.rows if done else 0
    if skipped:
        if sum(1 for _ in islice(rows, skipped)) < skipped:  # the input's hash matched: only a reader change can
            raise UserError(f"--input {input_path}: has fewer rows than --output {output_path}; pass --overwrite")
        log.info("resuming %s: %d rows already written, labelling the rest", output_path, skipped)

    size, hasher = (done.size, done.hasher) if done else (0, hashlib.sha256())
    written = 0

    def save_progress(complete: bool = False) -> None:
        write_atomically(progress_path, json.dumps(record | {"rows": skipped + written, "bytes": size,
                                                             "output_sha256": hasher.hexdigest(),
                                                             "complete": complete}) + "\n")

    try:
        first_batch = next(_batches(rows, batch_size), None)
        classifier = load_classifier() if first_batch else None
        output_path.parent.mkdir(parents=True, exist_ok=True)
        save_progress()  # before the output is created or cut, so an output on disk always has its record
        with output_path.open("ab") as out, _progress_bar(progress, total, skipped) as bar:
            out.truncate(size)  # what follows the recorded rows: rows not yet recorded, a half-written row
            for batch in _chain_first(first_batch, _batches(rows, batch_size)) if first_batch else ():
                probabilities = classifier.predict_proba([row.text for row in batch])
                rows = [prediction_row(row.text, p, kept_id, row.row_id) for row, p in zip(batch, probabilities)]
                data = format_rows(rows, fmt, prediction_columns(kept_id), header=size == 0).encode("utf-8")
                out.write(data)
                out.flush()  # the rows reach the file before the record that counts them
                hasher.update(data)
                size, written = size + len(data), written + len(batch)
                save_progress()
                bar.update(len(batch))
        save_progress(complete=True)
    except KeyboardInterrupt as interrupt:  # its type says Ctrl-C or SIGTERM (stopping.Terminated): keep it
        raise type(interrupt)(f"{output_path} holds the first {skipped + written} rows: run the same command "
                                "again to label the rest") from None
    return BatchResult(written=written, skipped=skipped, already_complete=False)


def _check_every_row(input_file: Path, text_column: str, id_column: str | None) -> tuple[str, int]:
    """The input's SHA-256 and row count, from one read that also checks every row (encoding, columns, the
    text rule), so that a bad row anywhere is refused before the output or its progress file exists: a
    partial output would tie the corrected input to a refusal ("written from another --input")."""
    hasher = hashlib.sha256()
    total = sum(1 for _ in iter_input_rows(input_file, text_column, id_column, raw_hasher=hasher))
    if input_file.suffix.lower() == ".parquet":  # pyarrow reads columns, not the file's bytes in order
        hasher = _sha256(input_file)
    return hasher.hexdigest(), total


def check_progress_file_is_ours(progress_path: Path) -> None:
    """Refuse to replace a file under the progress file's name that doratweet did not write (a user's own)."""
    if (progress_path.exists() or progress_path.is_symlink()) and _read_record(progress_path) is None:
        raise UserError(f"{progress_path}: already exists and was not written by doratweet predict, which keeps "
                        "its progress there; move it away, or pass --overwrite to replace it")


def is_our_progress_file(progress_path: Path) -> bool:
    return _read_record(progress_path) is not None


def _resumable(output_path: Path, progress_path: Path, record: dict, input_path) -> _Progress:
    """How far the job that wrote `output_path` got, when that job is this one; else a UserError saying why not."""
    recorded = _read_record(progress_path)
    if recorded is None:
        raise UserError(f"--output {output_path}: already exists and was not written by doratweet predict (no "
                        f"readable {progress_path.name} beside it); pass --overwrite to replace it, or choose another file")
    if recorded["input"] != record["input"]:
        raise UserError(f"--output {output_path}: was written from another --input (or {input_path} has changed "
                        "since); pass --overwrite to start again, or choose another file")
    settings, now = recorded["settings"], record["settings"]
    if settings != now:
        differ = ", ".join(sorted(k for k in set(settings) | set(now) if settings.get(k) != now.get(k)))
        raise UserError(f"--output {output_path}: was written with another adapter or other options ({differ}); "
                        "pass --overwrite to start again, or choose another file")
    size = output_path.stat().st_size
    hasher = _sha256(output_path, recorded["bytes"]) if size >= recorded["bytes"] else None
    if hasher is None or hasher.hexdigest() != recorded["output_sha256"] or (recorded["complete"] and size != recorded["bytes"]):
        raise UserError(f"--output {output_path}: has changed since doratweet predict wrote it; pass --overwrite "
                        "to start again, or choose another file")
    return _Progress(recorded["rows"], recorded["bytes"], hasher, recorded["complete"])


def _read_record(path: Path) -> dict | None:
    """The progress record, or None when there is none or it is not one (damaged, or some other file)."""
    try:
        recorded = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    fields = {"written_by": str, "input": dict, "settings": dict, "rows": int, "bytes": int, "output_sha256": str,
              "complete": bool}
    if not isinstance(recorded, dict) or recorded.get("written_by") != PROGRESS_WRITER or \
            not all(isinstance(recorded.get(name), kind) for name, kind in fields.items()):
        return None
    return recorded


def _sha256(path: Path, limit: int | None = None):
    """A SHA-256 (the hashlib object) of the file's first `limit` bytes, or of all of it."""
    hasher = hashlib.sha256()
    left = limit if limit is not None else float("inf")
    with path.open("rb") as handle:
        while left > 0 and (chunk := handle.read(int(min(1 << 20, left)))):
            hasher.update(chunk)
            left -= len(chunk)
    return hasher


def _chain_first(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _batches(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    while batch := list(islice(rows, size)):
        yield batch


def _progress_bar(enabled: bool, total: int | None, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="text", desc="predicting", disable=not enabled, dynamic_ncols=True)
