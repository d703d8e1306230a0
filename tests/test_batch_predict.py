"""Streaming file-to-file prediction: every input format, ids and order kept, resume after an interruption."""

from __future__ import annotations

import json
import zlib

import pandas as pd
import pytest

from doratweet.batch_predict import iter_input_rows, predict_file
from doratweet.cli import main
from doratweet.errors import UserError
from doratweet.predict import SentimentClassifier

TEXTS = [f"tweet number {i}, {'great' if i % 3 == 0 else 'awful' if i % 3 == 1 else 'meh'}" for i in range(23)]


class FakeClassifier:
    """Deterministic probabilities from each text's CRC: fast, and a wrong row order changes the output."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def predict_proba(self, texts):
        self.batches.append(list(texts))
        rows = []
        for text in texts:
            a, b = zlib.crc32(text.encode()) % 97 + 1, len(text) % 13 + 1
            total = a + b + 10
            rows.append({"negative": a / total, "neutral": b / total, "positive": 10 / total})
        return rows


def write_input(path, texts, ids=None):
    ids = ids if ids is not None else [None] * len(texts)
    suffix = path.suffix
    if suffix == ".txt":
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t} | ({"id": i} if i is not None else {})) + "\n"
                                for t, i in zip(texts, ids)), encoding="utf-8")
    else:
        frame = pd.DataFrame({"text": texts} | ({"id": ids} if ids[0] is not None else {}))
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
    return path


def run(input_path, output_path, **options):
    classifier = FakeClassifier()
    result = predict_file(input_path, output_path, lambda: classifier, progress=False, **options)
    return result, classifier


def read_rows(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".parquet"])
def test_each_input_format_is_labelled_in_order_in_batches(tmp_path, suffix):
    source = write_input(tmp_path / f"in{suffix}", TEXTS)
    result, classifier = run(source, tmp_path / "out.jsonl", batch_size=5)
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["text"] for r in rows] == TEXTS
    assert [len(b) for b in classifier.batches] == [5, 5, 5, 5, 3]
    assert result.written == 23 and result.skipped == 0
    expected = FakeClassifier().predict_proba(TEXTS)
    assert [r["label"] for r in rows] == [max(p, key=p.get) for p in expected]
    assert rows[0]["p_negative"] == round(expected[0]["negative"], 4)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_the_id_column_is_kept_first(tmp_path, suffix):
    ids = [f"t{1000 - i}" for i in range(len(TEXTS))]  # not sorted: order must come from the file
    source = write_input(tmp_path / f"in{suffix}", TEXTS, ids)
    run(source, tmp_path / "out.csv", batch_size=4)
    rows = read_rows(tmp_path / "out.csv")
    assert [r["id"] for r in rows] == ids
    assert list(rows[0]) == ["id", "text", "label", "p_negative", "p_neutral", "p_positive"]


def test_another_id_column_can_be_named(tmp_path):
    source = tmp_path / "in.csv"
    pd.DataFrame({"tweet_id": ["a", "b"], "text": TEXTS[:2]}).to_csv(source, index=False)
    run(source, tmp_path / "out.jsonl", id_column="tweet_id")
    assert [r["tweet_id"] for r in read_rows(tmp_path / "out.jsonl")] == ["a", "b"]


class InterruptedClassifier(FakeClassifier):
    """Ctrl-C while labelling batch number `at` (counting from 1)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def predict_proba(self, texts):
        if len(self.batches) + 1 == self.at:
            raise KeyboardInterrupt
        return super().predict_proba(texts)


def interrupt(input_path, output_path, at: int, **options) -> KeyboardInterrupt:
    with pytest.raises(KeyboardInterrupt) as raised:
        predict_file(input_path, output_path, lambda: InterruptedClassifier(at), progress=False, **options)
    return raised.value


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_an_interruption_gives_the_uninterrupted_file(tmp_path, fmt):
    source = write_input(tmp_path / "in.csv", TEXTS, [str(i) for i in range(len(TEXTS))])
    full = tmp_path / f"full.{fmt}"
    run(source, full, batch_size=4)
    expected = full.read_bytes()

    partial = tmp_path / f"partial.{fmt}"
    assert "holds the first 8 rows" in str(interrupt(source, partial, at=3, batch_size=4))
    # A kill can land after rows reached the file but before the progress file counted them, or in the middle
    # of a row: both leave bytes past what the progress file records.
    done = partial.read_bytes()
    assert expected.startswith(done)
    partial.write_bytes(done + expected[len(done):][:100])

    result, classifier = run(source, partial, batch_size=4)
    assert result.skipped == 8 and result.written == len(TEXTS) - 8
    assert classifier.batches[0][0] == TEXTS[8]  # the first 8 were not labelled again
    assert partial.read_bytes() == expected
    assert run(source, partial, batch_size=4)[0].already_complete


def test_a_file_doratweet_did_not_write_is_refused_and_kept(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"note": 1}\n{"note": 2}\nmy non-json line\n{"note": 3}\n')
    source = tmp_path / "in5.txt"
    source.write_text("I love it\nhate this\nmeh ok\ngreat stuff\nawful\n")
    with pytest.raises(UserError) as raised:
        run(source, notes)
    message = str(raised.value)
    assert message.startswith(f"--output {notes}: already exists and was not written by doratweet predict")
    assert message.endswith("pass --overwrite to replace it, or choose another file") and "\n" not in message
    assert notes.read_text() == '{"note": 1}\n{"note": 2}\nmy non-json line\n{"note": 3}\n'


def test_a_csv_with_the_output_columns_that_doratweet_did_not_write_is_refused_and_kept(tmp_path):
    source = write_input(tmp_path / "in.txt", TEXTS[:4])
    mine = tmp_path / "mine.csv"
    mine.write_text("text,label,p_negative,p_neutral,p_positive\n" + TEXTS[0] + ",positive,0,0,1\n")
    before = mine.read_bytes()
    with pytest.raises(UserError, match="was not written by doratweet predict"):
        run(source, mine)
    assert mine.read_bytes() == before


def test_a_partial_output_of_an_input_changed_since_is_refused(tmp_path):
    source = write_input(tmp_path / "in.txt", TEXTS)
    out = tmp_path / "out.jsonl"
    interrupt(source, out, at=2, batch_size=4)
    before = out.read_bytes()
    write_input(source, TEXTS[:4] + ["a row the user changed"] + TEXTS[5:])  # the rows done are unchanged
    with pytest.raises(UserError, match=r"was written from another --input .*; pass --overwrite to start again"):
        run(source, out, batch_size=4)
    assert out.read_bytes() == before


# Another batch size changes the fourth decimal of some probabilities (padding changes the sums), so a file
# resumed with it would match no uninterrupted run.
@pytest.mark.parametrize("change", [{"job": {"adapter_sha256": "another"}}, {"text_column": "tweet"},
                                    {"id_column": None}, {"batch_size": 5}])
def test_a_partial_output_made_with_another_adapter_or_options_is_refused(tmp_path, change):
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": range(len(TEXTS)), "text": TEXTS, "tweet": TEXTS[::-1]}).to_csv(source, index=False)
    out = tmp_path / "out.jsonl"
    options = {"job": {"adapter_sha256": "one"}, "text_column": "text", "id_column": "id", "batch_size": 4}
    interrupt(source, out, at=2, **options)
    with pytest.raises(UserError, match="was written with another adapter or other options") as raised:
        run(source, out, **(options | change))
    assert "\n" not in str(raised.value)


def test_a_complete_output_changed_since_is_refused_not_reported_complete(tmp_path):
    source = write_input(tmp_path / "in.txt", TEXTS[:5])
    out = tmp_path / "out.jsonl"
    run(source, out)
    edited = out.read_text().replace('"label": "', '"label": "edited-', 1)
    out.write_text(edited)
    with pytest.raises(UserError, match=r"has changed since doratweet predict wrote it; pass --overwrite"):
        run(source, out)
    assert out.read_text() == edited


def test_a_progress_file_left_without_its_output_is_ignored(tmp_path):
    source = write_input(tmp_path / "in.txt", TEXTS[:5])
    out = tmp_path / "out.jsonl"
    interrupt(source, out, at=2, batch_size=2)
    out.unlink()
    result, _ = run(source, out, batch_size=2)
    assert result.skipped == 0 and [r["text"] for r in read_rows(out)] == TEXTS[:5]


def test_a_complete_output_is_not_rewritten_and_the_model_not_loaded(tmp_path):
    source = write_input(tmp_path / "in.txt", TEXTS)
    out = tmp_path / "out.jsonl"
    run(source, out)
    before = out.stat().st_mtime_ns, out.read_bytes()

    def must_not_load():
        raise AssertionError("the model was loaded for a complete output")

    result = predict_file(source, out, must_not_load, progress=False)
    assert result.already_complete and result.written == 0 and result.skipped == len(TEXTS)
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before


def test_overwrite_starts_again(tmp_path):
    source = write_input(tmp_path / "in.txt", TEXTS[:3])
    out = tmp_path / "out.jsonl"
    out.write_text('{"text": "something else"}\n')
    result, _ = run(source, out, overwrite=True)
    assert result.written == 3 and [r["text"] for r in read_rows(out)] == TEXTS[:3]


def test_an_output_from_another_input_is_refused_not_appended_to(tmp_path):
    source = write_input(tmp_path / "in.txt", TEXTS[:3])
    out = tmp_path / "out.jsonl"
    out.write_text('{"text": "something else"}\n')
    with pytest.raises(UserError, match="--overwrite"):
        run(source, out)
    assert out.read_text() == '{"text": "something else"}\n'


def test_a_missing_text_column_names_the_option(tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("id,tweet\n1,hello\n")
    with pytest.raises(UserError, match="--text-column"):
        run(source, tmp_path / "out.jsonl")


def test_a_text_longer_than_max_text_chars_names_the_file_and_line(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x" * 1_000_000}) + "\n")
    expected = r"in\.jsonl:2: text is 1,000,000 characters, over the 5,000 allowed .*; shorten it or remove that row$"
    with pytest.raises(UserError, match=expected):
        run(source, tmp_path / "out.jsonl")


_GOOD_LINES = "".join(f"tweet {i}\n" for i in range(300))
_BAD_ROWS = {"invalid UTF-8 at line 301": ("in.txt", _GOOD_LINES.encode() + b"caf\xe9\n", r"in\.txt:301: not valid UTF-8"),
             "a long text at line 301": ("in.txt", (_GOOD_LINES + "x" * 5001 + "\n").encode(), r"in\.txt:301: text is 5,001"),
             "a null at line 301": ("in.jsonl", ("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(300))
                                                 + '{"text": null}\n').encode(), r"in\.jsonl:301: no text"),
             "too many cells at line 302": ("in.csv", ("text\n" + _GOOD_LINES + "a,b\n").encode(),
                                            r"in\.csv:302: more fields than the header")}


@pytest.mark.parametrize("case", list(_BAD_ROWS))
def test_a_bad_row_deep_in_the_input_is_refused_before_the_output_is_created(tmp_path, case):
    name, data, expected = _BAD_ROWS[case]
    source, out = tmp_path / name, tmp_path / "out.jsonl"
    source.write_bytes(data)
    labelled = []
    with pytest.raises(UserError, match=expected):
        predict_file(source, out, lambda: labelled.append(1) or FakeClassifier(), batch_size=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and labelled == []
    source.write_bytes(data[:data.rindex(b"\n", 0, -1) + 1])  # the user removes the bad row: a fresh run starts
    assert run(source, out, batch_size=8)[0].written == 300


def test_crlf_input_is_read_like_lf_even_inside_quoted_csv_texts(tmp_path):
    source = tmp_path / "in.csv"
    source.write_bytes(b'id,text\r\n1,"two\r\nlines"\r\n2,plain\r\n')
    run(source, tmp_path / "out.jsonl")
    assert [row["text"] for row in read_rows(tmp_path / "out.jsonl")] == ["two\nlines", "plain"]


def test_a_csv_error_names_the_line_its_row_starts_on_after_texts_that_span_lines(tmp_path):
    source = tmp_path / "in.csv"
    source.write_text('id,text\n1,"three\nline\ntext"\n2,"' + "x" * 1_000_000 + '"\n')
    with pytest.raises(UserError, match=r"in\.csv:5: text is 1,000,000 characters"):
        list(iter_input_rows(source))
    source.write_text('id,text\n1,"two\nlines"\n2,a,b\n')
    with pytest.raises(UserError, match=r"in\.csv:4: more fields than the header has columns \(3, not 2\)"):
        list(iter_input_rows(source))
    source.write_bytes(b'id,text\n1,"two\nlines"\n2,caf\xe9\n')
    with pytest.raises(UserError, match=r"in\.csv:4: not valid UTF-8"):
        list(iter_input_rows(source))


def test_csv_cells_stay_strings_and_blank_lines_are_skipped(tmp_path):
    source = tmp_path / "in.csv"
    source.write_text('id,text\n007,NA\n\n8,""\n9\n')
    rows = [(r.where.rsplit(":", 1)[1], r.text, r.row_id) for r in iter_input_rows(source)]
    # the blank line 3 is no row; an empty cell and a short row are empty texts, labelled like any other
    assert rows == [("2", "NA", "007"), ("4", "", "8"), ("5", "", "9")]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_a_byte_order_mark_is_ignored(tmp_path, suffix):
    source = write_input(tmp_path / f"in{suffix}", ["first", "second"])
    source.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    run(source, tmp_path / "out.jsonl")
    assert [row["text"] for row in read_rows(tmp_path / "out.jsonl")] == ["first", "second"]


# --- through the CLI, with the tiny trained run --------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir):
    return tiny_run_dir


def test_cli_streams_resumes_and_reports_a_complete_output(run_dir, tmp_path, capsys, monkeypatch):
    source = write_input(tmp_path / "in.parquet", TEXTS[:7], [10, 11, 12, 13, 14, 15, 16])
    out = tmp_path / "out.csv"
    command = ["--quiet", "predict", "--run", str(run_dir), "--input", str(source), "--output", str(out),
               "--batch-size", "3"]
    assert main(command) == 0
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [str(i) for i in range(10, 17)] and [r["text"] for r in rows] == TEXTS[:7]
    assert {r["label"] for r in rows} <= {"negative", "neutral", "positive"}
    complete = out.read_bytes()

    out.unlink()
    original = SentimentClassifier.predict_proba
    calls = []

    def interrupted_at_the_second_batch(self, texts):
        calls.append(texts)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, texts)

    monkeypatch.setattr(SentimentClassifier, "predict_proba", interrupted_at_the_second_batch)
    assert main(command) == 130
    monkeypatch.setattr(SentimentClassifier, "predict_proba", original)
    assert main(command) == 0
    assert out.read_bytes() == complete
    capsys.readouterr()

    assert main(command) == 0
    assert "already complete (7 rows)" in capsys.readouterr().out
