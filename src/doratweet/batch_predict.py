"""File-to-file prediction for inputs of any size: stream, label in batches, append, resume.

`predict_file` reads the input a batch at a time (.txt and .jsonl line by line, .csv with Python's csv,
.parquet with pyarrow's `iter_batches`), so memory holds one batch, never the file. Each labelled batch is
appended to the output and flushed: the output on disk is always a prefix of the final file plus at most
one half-written line. That is what resuming relies on: count the complete rows already written, cut off
a truncated last line, skip that many inputs and append the rest. Rows keep the input's order and its
id column, when it has one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from . import LABELS
from .data import MAX_TEXT_CHARS, parse_json_line
from .errors import UserError

log = logging.getLogger("doratweet")

INPUT_SUFFIXES = (".txt", ".csv", ".jsonl", ".json", ".parquet")
OUTPUT_FORMATS = ("jsonl", "csv")
READ_CHUNK_ROWS = 4096  # rows pyarrow decodes at once: bounded memory, few Python round trips


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


def iter_input_rows(path: str | os.PathLike, text_column: str = "text", id_column: str | None = "id") -> Iterator[InputRow]:
    """The input's rows in order; `id_column` is passed through when the file has that column."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--input {path}: no such file; check the path")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_rows(path)
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, text_column, id_column)
    if suffix == ".csv":
        return _csv_rows(path, text_column, id_column)
    if suffix == ".parquet":
        return _parquet_rows(path, text_column, id_column)
    raise UserError(f"--input {path}: unsupported file type {path.suffix or '(none)'!r}; use {', '.join(INPUT_SUFFIXES)}")


def _binary_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) split on '\\n' only: tweets may hold '\\r' or U+2028."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{path}:{line_number}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); "
                                "re-save the file as UTF-8") from None
            yield line_number, line.removeprefix("\ufeff") if line_number == 1 else line


def _checked_text(where: str, value) -> str:
    if not isinstance(value, str):
        missing = value is None or (isinstance(value, float) and value != value)
        raise UserError(f"{where}: {'empty text' if missing else f'text is not a string: {value!r}'}; "
                        "fix or remove that row")
    text = value.strip()
    if not text:
        raise UserError(f"{where}: empty text; fix or remove that row")
    if len(text) > MAX_TEXT_CHARS:
        raise UserError(f"{where}: text is {len(text):,} characters, over the {MAX_TEXT_CHARS:,} allowed "
                        "(a tweet has at most 280); shorten it or remove that row")
    return text


def _txt_rows(path: Path) -> Iterator[InputRow]:
    for line_number, line in _binary_lines(path):
        text = line.rstrip("\n")
        if not text.strip():
            raise UserError(f"{path}:{line_number}: blank line; put one text per line and remove blank lines")
        yield InputRow(f"{path}:{line_number}", text.strip())


def _jsonl_rows(path: Path, text_column: str, id_column: str | None) -> Iterator[InputRow]:
    for line_number, line in _binary_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = parse_json_line(line)
        except ValueError as error:
            raise UserError(f"{where}: {error}; fix or remove that line") from None
        if text_column not in record:
            raise UserError(f"{where}: no field {text_column!r} (fields: {', '.join(map(repr, record))}); "
                            "choose one with --text-column")
        yield InputRow(where, _checked_text(where, record[text_column]), record.get(id_column) if id_column else None)


def _csv_rows(path: Path, text_column: str, id_column: str | None) -> Iterator[InputRow]:
    """Python's csv over the file's lines, as data.py reads CSV: each row is named by the line it starts on
    (a quoted text may span lines), every cell stays a string ("NA" stays a tweet), and a line that is not
    UTF-8 is named by `_binary_lines`."""
    reader = csv.reader((line for _, line in _binary_lines(path)), strict=True)
    header: list[str] | None = None
    start = 1  # the line the next row starts on
    # csv refuses cells over 128 KiB; a giant text must reach the length check instead, which names its line.
    field_size_limit = csv.field_size_limit(2**31 - 1)
    try:
        for fields in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not fields:
                continue  # a blank line
            if header is None:
                header = fields
                _require_column(path, header, text_column)
                id_index = header.index(id_column) if id_column in header else None
                continue
            if len(fields) > len(header):
                raise UserError(f"{where}: more fields than the header has columns ({len(fields)}, not {len(header)}); "
                                "quote texts that contain commas")
            fields += [""] * (len(header) - len(fields))  # a short row reads as empty cells
            text = fields[header.index(text_column)].replace("\r\n", "\n")  # a quoted text from a Windows file
            yield InputRow(where, _checked_text(where, text), fields[id_index] if id_index is not None else None)
    except csv.Error as error:
        raise UserError(f"{path}:{start}: not valid CSV ({error}); check the quotes: put a text that holds commas, "
                        "quotes or line breaks in double quotes, and double each quote inside it") from None
    finally:
        csv.field_size_limit(field_size_limit)


def _parquet_rows(path: Path, text_column: str, id_column: str | None) -> Iterator[InputRow]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    _require_column(path, names, text_column)
    columns = [text_column] + ([id_column] if id_column and id_column in names and id_column != text_column else [])
    row = 0
    for batch in parquet.iter_batches(batch_size=READ_CHUNK_ROWS, columns=columns):
        texts = batch.column(text_column).to_pylist()
        ids = batch.column(id_column).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, row_id in zip(texts, ids):
            row += 1
            where = f"{path}: row {row}"
            yield InputRow(where, _checked_text(where, text), row_id)


def _require_column(path: Path, columns: list[str], column: str) -> None:
    if column not in columns:
        available = ", ".join(repr(name) for name in columns) or "none"
        raise UserError(f"{path}: no column {column!r} (columns: {available}); choose one with --text-column")


def count_input_rows(path: str | os.PathLike) -> int | None:
    """The number of rows when it is cheap to know (Parquet's metadata), for the progress bar; else None."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


# --- the output: rows, and what a partial file already holds -----------------------------------------------


def output_row(row: InputRow, probabilities: dict[str, float], id_column: str | None) -> dict:
    """The same fields `doratweet predict` prints (text, label, p_*), with the input's id first."""
    fields = {id_column: row.row_id} if id_column else {}
    fields.update(text=row.text, label=max(probabilities, key=probabilities.get))
    fields.update({f"p_{label}": round(probabilities[label], 4) for label in LABELS})
    return fields


def output_columns(id_column: str | None) -> list[str]:
    return ([id_column] if id_column else []) + ["text", "label"] + [f"p_{label}" for label in LABELS]


@dataclass(frozen=True)
class ExistingOutput:
    rows: int  # complete data rows
    good_bytes: int  # where the complete rows end; anything after is a truncated row to cut off
    size: int
    last_text: str | None  # the text of the last complete row, to check it matches the input
    header: list[str] | None  # CSV only


def scan_output(path: Path, fmt: str) -> ExistingOutput:
    """What a (possibly interrupted) output file holds, reading it line by line."""
    size = path.stat().st_size
    if fmt == "jsonl":
        rows, good_bytes, last_text = 0, 0, None
        for line, end in _lines_with_offsets(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith("\n") or not isinstance(record, dict):
                break
            rows, good_bytes, last_text = rows + 1, end, record.get("text")
        return ExistingOutput(rows, good_bytes, size, last_text, None)

    # CSV: a quoted text may span lines, so let the csv module decide where each record ends.
    offsets = _lines_with_offsets(path)
    position = {"end": 0}

    def lines() -> Iterator[str]:
        for line, end in offsets:
            position["end"] = end
            yield line

    reader = csv.reader(lines())
    header, rows, good_bytes, last_text = None, 0, 0, None
    try:
        for record in reader:
            if header is None:
                header, good_bytes = record, position["end"]
                continue
            complete = len(record) == len(header) and _ends_with_newline(path, position["end"])
            if not complete:
                break
            rows, good_bytes = rows + 1, position["end"]
            last_text = record[header.index("text")] if "text" in header else None
    except csv.Error:
        pass  # a quoted field cut off by the interruption
    if header is not None and not _ends_with_newline(path, good_bytes):
        header, good_bytes = None, 0  # even the header was cut off
    return ExistingOutput(rows, good_bytes, size, last_text, header)


def _lines_with_offsets(path: Path) -> Iterator[tuple[str, int]]:
    """Each line (with its '\\n') and the byte offset where it ends; bytes that are not UTF-8 end the scan."""
    end = 0
    with path.open("rb") as handle:
        for raw in handle:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return
            end += len(raw)
            yield line, end


def _ends_with_newline(path: Path, offset: int) -> bool:
    if offset == 0:
        return False
    with path.open("rb") as handle:
        handle.seek(offset - 1)
        return handle.read(1) == b"\n"


# --- the whole job -------------------------------------------------------------------------------------


def output_format(path: str | os.PathLike, fmt: str | None) -> str:
    if fmt in OUTPUT_FORMATS:
        return fmt
    suffix = Path(path).suffix.lower()
    if fmt is None and suffix in (".jsonl", ".csv"):
        return suffix[1:]
    raise UserError(f"--output {path}: batch prediction writes .jsonl or .csv; rename the file or pass --format jsonl/csv")


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
) -> BatchResult:
    """Label every row of `input_path` into `output_path`, resuming a partial output unless `overwrite`.

    `load_classifier` is called only when there is work to do, so a complete output costs no model load.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, got {batch_size}")
    output_path = Path(output_path)
    fmt = output_format(output_path, fmt)
    rows = iter_input_rows(input_path, text_column, id_column)
    first = next(rows, None)
    if first is None:
        raise UserError(f"--input {input_path}: no texts to classify; put one text per line (.txt) or one per row")
    kept_id = id_column if id_column and first.row_id is not None else None
    rows = _chain_first(first, rows)

    existing = None
    if output_path.exists() and not overwrite:
        existing = scan_output(output_path, fmt)
        if fmt == "csv" and existing.header not in (None, output_columns(kept_id)):
            raise UserError(f"--output {output_path}: has columns {existing.header}, not "
                            f"{output_columns(kept_id)}; pass --overwrite to start again, or choose another file")
    skipped = existing.rows if existing else 0
    if skipped:
        done = list(islice(rows, skipped))
        if len(done) < skipped:
            raise UserError(f"--output {output_path}: holds {skipped} rows but --input {input_path} has only "
                            f"{len(done)}; it belongs to another input: pass --overwrite or choose another file")
        if existing.last_text is not None and existing.last_text != done[-1].text:
            raise UserError(f"--output {output_path}: row {skipped} does not match {done[-1].where}; it belongs to "
                            "another input: pass --overwrite to start again, or choose another file")
        upcoming = next(rows, None)
        if upcoming is None:
            if existing.good_bytes < existing.size:
                os.truncate(output_path, existing.good_bytes)  # only a half-written duplicate row follows
            return BatchResult(written=0, skipped=skipped, already_complete=True)
        rows = _chain_first(upcoming, rows)
        log.info("resuming %s: %d rows already written, labelling the rest", output_path, skipped)

    classifier = load_classifier()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    resuming = existing is not None and existing.good_bytes > 0
    if resuming:
        os.truncate(output_path, existing.good_bytes)  # drop the half-written row an interruption left
    written = 0
    with output_path.open("a" if resuming else "w", encoding="utf-8", newline="") as out, \
            _progress_bar(progress, count_input_rows(input_path), skipped) as bar:
        write_row = _row_writer(out, fmt, kept_id, header=not resuming)
        for batch in _batches(rows, batch_size):
            probabilities = classifier.predict_proba([row.text for row in batch])
            for row, p in zip(batch, probabilities):
                write_row(output_row(row, p, kept_id))
            out.flush()  # each batch reaches the file before the next starts: an interruption loses one batch
            written += len(batch)
            bar.update(len(batch))
    return BatchResult(written=written, skipped=skipped, already_complete=False)


def _chain_first(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _batches(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    while batch := list(islice(rows, size)):
        yield batch


def _row_writer(out: io.TextIOBase, fmt: str, id_column: str | None, header: bool) -> Callable[[dict], object]:
    """A function that writes one row; every row, CSV or JSON Lines, ends with '\n' (scan_output relies on it)."""
    if fmt == "jsonl":
        return lambda record: out.write(json.dumps(record, ensure_ascii=False) + "\n")
    writer = csv.DictWriter(out, fieldnames=output_columns(id_column), lineterminator="\n")
    if header:
        writer.writeheader()
    return writer.writerow


def _progress_bar(enabled: bool, total: int | None, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="text", desc="predicting", disable=not enabled, dynamic_ncols=True)
