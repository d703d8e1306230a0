"""Tables in files, read a record at a time, and the rows `doratweet predict` writes.

Reading: .txt (one text per line), CSV, JSON Lines (.jsonl, .json) and Parquet. Training and evaluation data
(data.py) and `predict --input` or stdin (batch_predict.py, predict.py) are read here, by the same rules:
- Files are read as UTF-8. A UTF-16 or UTF-32 file is named as such; a byte that is not UTF-8 is named by its
  line; a byte-order mark at the start is ignored; '\\r\\n' is read as '\\n'.
- In .txt and JSON Lines files only '\\n' ends a line, so a lone '\\r' (or U+2028, where str.splitlines would
  split) stays inside its tweet.
- CSV goes through Python's csv in strict mode: a row is named by the line it starts on (a quoted text may span
  lines), every cell stays a string ("NA" stays a tweet), a short row reads as empty cells, and a cell of any
  size reaches the caller, whose length check names its line.
- A line that cannot be a record (malformed JSON, more cells than the header) goes to the caller's `bad_row`,
  which raises or counts it; reading goes on after it.
Every record carries `where`, its file:line (a Parquet file has rows, not lines), for the caller's messages.

The two callers read differently, and `whole` says which way:
- streamed (predict): a line at a time, each line's raw bytes into a hash for resuming, so memory holds one row.
  Only '\\n' ends a CSV line (a lone '\\r' outside quotes is refused as invalid CSV). A Parquet file is read a
  batch of rows at a time by pyarrow, its rows named `file: row N`.
- whole (training data): every line is decoded before any is parsed, so a file in the wrong encoding is refused
  whatever else is wrong with it, and an empty file is an error, not an empty table. CSV is split into lines as
  Python's csv splits a whole text: a lone '\\r' outside quotes ends a row too, as in Excel and pandas, and
  counts as a line. A Parquet file is read by pandas (its index restored, pandas' types), its rows named
  `file row N`.

Writing: each labelled text is one row of id (when the input has one), text, label and p_<label>, written as
JSON Lines, CSV (cells a spreadsheet would run as a formula neutralised) or an aligned table; printed and
streamed output go through the same writer, so their files are byte for byte the same.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import LABELS
from .errors import UserError, first_line

TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
ENCODING_SNIFF_BYTES = 4096
# Byte-order marks of the encodings a file saved as "Unicode" may be in; UTF-32's start like UTF-16's.
_FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                 (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
# csv refuses cells over 128 KiB; a giant text must reach the caller's length check (and --skip-bad-rows)
# instead. 2**31 - 1 is the largest limit a C long holds on every platform.
_CSV_FIELD_SIZE_LIMIT = 2**31 - 1
PARQUET_BATCH_ROWS = 4096  # rows pyarrow decodes at once: bounded memory, few Python round trips
# OWASP's list for CSV injection: a cell starting with one of these is run as a formula by spreadsheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

BadRow = Callable[..., None]  # bad_row(where, problem[, fix]): raise, or note it and let reading go on


@dataclass(frozen=True)
class Record:
    where: str  # file:line, or the Parquet row (see the module docstring), for messages
    fields: dict


@dataclass(frozen=True)
class Table:
    """A table file open for reading: `records` come one at a time, in the file's order."""

    path: Path
    columns: list[str] | None  # the CSV header or Parquet schema; None for JSON Lines and a CSV without a header
    records: Iterator[Record]


# --- lines: decoding ----------------------------------------------------------------------------------


def check_utf8_encoding(name, head: bytes) -> None:
    """A file saved as UTF-16 (Windows' "Unicode", Excel's "Unicode Text") is named as such: read as UTF-8 it
    fails at its first byte, or, without a byte-order mark, decodes into texts with a NUL between letters."""
    encoding = next((encoding for bom, encoding in _FOREIGN_BOMS if head.startswith(bom)), None)
    # Without a mark: each ASCII character (letters, commas, line breaks) in UTF-16 has a NUL byte beside it,
    # all on even or all on odd offsets; a UTF-8 text file holds a NUL rarely if ever.
    parities = {offset % 2 for offset, byte in enumerate(head) if byte == 0}
    if encoding is None and (head.count(0) * 4 >= len(head) > 0 or (head.count(0) >= 4 and len(parities) == 1)):
        encoding = "UTF-16"
    if encoding:
        raise UserError(f"{name}: the file is {encoding}, not UTF-8; re-save it as UTF-8 "
                        f"(e.g. iconv -f {encoding} -t UTF-8)")


def decoded_lines(name, handle, raw_hasher=None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a seekable binary `handle` (a file, or stdin's bytes), each line decoded as UTF-8
    and ending in '\\n' (but perhaps the last), or refused naming `name` and its line. Each line's bytes, as
    read, also go to `raw_hasher` (a hashlib object) when one is given."""
    check_utf8_encoding(name, handle.read(ENCODING_SNIFF_BYTES))
    handle.seek(0)
    for line_number, raw in enumerate(handle, start=1):  # a binary file splits at b"\n" only
        if raw_hasher is not None:
            raw_hasher.update(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{name}:{line_number}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); "
                            "re-save the file as UTF-8") from None
        if line_number == 1:
            line = line.removeprefix("\ufeff")
        if line.endswith("\r\n"):
            line = line[:-2] + "\n"
        yield line_number, line


def _file_lines(path: Path, raw_hasher=None) -> Iterator[tuple[int, str]]:
    try:
        with path.open("rb") as handle:
            yield from decoded_lines(path, handle, raw_hasher)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror}); check the path and its permissions") from None


def _lines(path: Path, whole: bool, raw_hasher=None) -> Iterable[tuple[int, str]]:
    if not whole:
        return _file_lines(path, raw_hasher)
    lines = list(_file_lines(path, raw_hasher))
    if not any(line.strip() for _, line in lines):
        raise empty_file(path)
    return lines


def empty_file(path: Path) -> UserError:
    return UserError(f"{path}: the file is empty (or holds only whitespace); fill it, or pass the file you meant")


def read_lines(path: Path, *, whole: bool = False, raw_hasher=None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file holding one text per line, without the line's '\\n'."""
    for line_number, line in _lines(path, whole, raw_hasher):
        yield line_number, line.removesuffix("\n")


# --- tables -------------------------------------------------------------------------------------------


def open_table(path: Path, *, bad_row: BadRow, whole: bool = False, unique_columns: bool = False,
               only_columns: list[str] | None = None, raw_hasher=None) -> Table:
    """A .csv, .jsonl/.json or .parquet file, read `whole` or streamed (see the module docstring).

    `unique_columns` refuses a CSV header that names a column twice (else the first of them is read);
    `only_columns` are the columns a streamed Parquet file is read for (a table may have many, and wide).
    """
    suffix = path.suffix.lower()
    assert suffix in TABLE_SUFFIXES, f"not a table file: {path}"
    if suffix == ".parquet":
        return _parquet_table(path, whole, only_columns)
    lines = _lines(path, whole, raw_hasher)
    if suffix == ".csv":
        records = _csv_records(path, lines, bad_row, universal_newlines=whole, unique_columns=unique_columns)
        return Table(path, next(records), records)  # reads up to the header, the generator's first item
    return Table(path, None, _jsonl_records(path, lines, bad_row))


def require_column(path: Path, columns: list[str], column: str, option: str) -> None:
    if column not in columns:
        available = ", ".join(repr(name) for name in columns) or "none"
        raise UserError(f"{path}: no column {column!r} (columns: {available}); choose one with {option}")


def _csv_records(path: Path, lines: Iterable[tuple[int, str]], bad_row: BadRow, *, universal_newlines: bool,
                 unique_columns: bool) -> Iterator:
    """The header first (None when the file has none), then a Record for each row."""
    texts = (line for _, line in lines)
    if universal_newlines:
        texts = (part for text in texts for part in io.StringIO(text, newline=""))
    reader = csv.reader(texts, strict=True)
    header: list[str] | None = None
    start = 1  # the line the next row starts on
    field_size_limit = csv.field_size_limit(_CSV_FIELD_SIZE_LIMIT)
    try:
        for fields in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not fields:
                continue  # a blank line
            if header is None:
                repeated = [name for index, name in enumerate(fields) if name in fields[:index]]
                if unique_columns and repeated:
                    raise UserError(f"{where}: column {repeated[0]!r} appears twice in the header; rename or "
                                    "remove one of them")
                header = fields
                yield header
            elif len(fields) > len(header):
                bad_row(where, f"more fields than the header has columns ({len(fields)}, not {len(header)})",
                        "quote texts that contain commas")
            else:
                # A short row reads as empty cells, as in pandas: a missing text or label is reported as such.
                record: dict[str, str] = {}
                for name, cell in zip(header, fields + [""] * (len(header) - len(fields))):
                    record.setdefault(name, cell)  # a column named twice (unique_columns off) reads its first cell
                yield Record(where, record)
        if header is None:
            yield None
    except csv.Error as error:
        raise UserError(
            f"{path}:{start}: not valid CSV ({error}); check the quotes: put a text that holds commas, quotes or "
            f"line breaks in double quotes, and double each quote inside it"
        ) from None
    finally:
        csv.field_size_limit(field_size_limit)


def parse_json_line(line: str) -> dict:
    """One JSON Lines record; a ValueError says what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed JSON ({error.msg}); expected one JSON object per line (JSON Lines)") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object per line, found {type(record).__name__}")
    return record


def _jsonl_records(path: Path, lines: Iterable[tuple[int, str]], bad_row: BadRow) -> Iterator[Record]:
    for line_number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = parse_json_line(line.removesuffix("\n"))
        except ValueError as error:
            bad_row(where, str(error))
            continue
        yield Record(where, record)


def _parquet_table(path: Path, whole: bool, only_columns: list[str] | None) -> Table:
    if path.stat().st_size == 0:
        raise empty_file(path)
    if whole:
        import pandas as pd

        frame = _readable_parquet(path, pd.read_parquet)
        records = [Record(f"{path} row {index}", fields)
                   for index, fields in enumerate(frame.to_dict("records"), start=1)]
        return Table(path, [str(column) for column in frame.columns], iter(records))
    import pyarrow.parquet as pq

    parquet = _readable_parquet(path, pq.ParquetFile)
    names = parquet.schema_arrow.names
    wanted = [name for name in dict.fromkeys(only_columns or names) if name in names]
    return Table(path, names, _parquet_batches(path, parquet, wanted))


def _readable_parquet(path: Path, read):
    try:
        return read(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        reason = first_line(error, 200)
        raise UserError(f"{path}: not a readable Parquet file ({reason}); re-export it or use .csv/.jsonl") from None


def _parquet_batches(path: Path, parquet, columns: list[str]) -> Iterator[Record]:
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        for fields in batch.to_pylist():
            row += 1
            yield Record(f"{path}: row {row}", fields)


# --- writing the labelled rows ------------------------------------------------------------------------


def prediction_row(text: str, probabilities: dict[str, float], id_column: str | None = None,
                   row_id=None) -> dict:
    """The fields of one labelled text: the input's id first (when it has an id column), the text, the most
    probable label and each label's probability to 4 decimals."""
    fields = {id_column: row_id} if id_column else {}
    fields.update(text=text, label=max(probabilities, key=probabilities.get))
    fields.update({f"p_{label}": round(probabilities[label], 4) for label in LABELS})
    return fields


def prediction_columns(id_column: str | None = None) -> list[str]:
    return ([id_column] if id_column else []) + ["text", "label"] + [f"p_{label}" for label in LABELS]


def format_rows(rows: list[dict], fmt: str, columns: list[str], header: bool = True) -> str:
    """`rows` as "jsonl", "csv" (with its header line when `header`) or an aligned "table"; every row, in every
    format, ends with '\\n'."""
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if fmt == "csv":
        return csv_rows(rows, columns, header)
    assert fmt == "table", fmt
    return "".join(
        f"{row['label']:<8}  " + "  ".join(f"{key[2:]}={row[key]:.3f}" for key in row if key.startswith("p_"))
        + f"  {row['text'][:80]}\n"
        for row in rows
    )


def csv_rows(records: list[dict], columns: list[str], header: bool) -> str:
    """CSV text ending each row with '\\n'. A list, object or boolean (a JSON Lines id) is written as JSON text,
    not as Python would print it; cells are made spreadsheet-safe."""
    # csv quotes a cell holding a character of its line terminator: with "\r\n" both '\r' and '\n' inside a
    # text are quoted (with "\n" a bare '\r' would not be, and readers would split the row there). Each row's
    # own "\r\n" is then cut to "\n".
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\r\n")
    rows = [dict(zip(columns, columns))] if header else []
    rows += [{key: spreadsheet_safe(_csv_value(value)) for key, value in record.items()} for record in records]
    lines = []
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(row)
        lines.append(buffer.getvalue().removesuffix("\r\n") + "\n")
    return "".join(lines)


def spreadsheet_safe(value):
    """A CSV cell a spreadsheet shows as text: a string starting like a formula gets a leading single quote,
    as OWASP's guidance on CSV injection says. Numbers are left alone; JSON Lines output is never changed."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _csv_value(value):
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict, bool)) else value
