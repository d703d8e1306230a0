"""`doratweet predict` and the Python API keep a user's files and treat every text by one rule.

What is covered: an --output that is the --input (by any path or link) or a folder, CSV output that a
spreadsheet would run as formulas, one rule for what text can be labelled on every path (arguments, stdin,
--input with and without --output, the Python API, the server), what an interruption says, UTF-16 inputs.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import zlib

import httpx
import pandas as pd
import pytest

from doratweet.batch_predict import predict_file
from doratweet.cli import main
from doratweet.predict import SentimentClassifier, format_predictions
from doratweet.serve import create_app


class FakeClassifier:
    """Probabilities from each text's CRC (fast, and the same text always gets the same answer)."""

    base_model_id = "fake"

    def __init__(self, interrupt_at: int | None = None):
        self.batch_size = 32
        self.texts: list[str] = []
        self.interrupt_at = interrupt_at  # Ctrl-C during this call of predict_proba (1-based)
        self.calls = 0

    def predict_proba(self, texts):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.texts += texts
        rows = []
        for text in texts:
            a, b = zlib.crc32(text.encode()) % 97 + 1, len(text) % 13 + 1
            rows.append({"negative": a / (a + b + 10), "neutral": b / (a + b + 10), "positive": 10 / (a + b + 10)})
        return rows


@pytest.fixture
def fake(monkeypatch):
    """`doratweet predict` with FakeClassifier in place of the model; the fixture's value is the fake."""
    classifier = FakeClassifier()
    monkeypatch.setattr(SentimentClassifier, "load", classmethod(lambda cls, *args, **kwargs: classifier))
    return classifier


def predict(*args) -> int:
    return main(["--quiet", "predict", *map(str, args)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("doratweet: error: ") and err.count("\n") == 1, err
    return err


# --- --output is --input -----------------------------------------------------------------------------------


def _same_file_by(kind: str, source):
    folder = source.parent
    if kind == "same name":
        return source
    if kind == "another spelling":
        (folder / "sub").mkdir()
        return folder / "sub" / ".." / source.name
    if kind == "symlink":
        (folder / "link.jsonl").symlink_to(source)
        return folder / "link.jsonl"
    os.link(source, folder / "hard.jsonl")
    return folder / "hard.jsonl"


@pytest.mark.parametrize("kind", ["same name", "another spelling", "symlink", "hard link"])
@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "table"])
def test_an_output_that_is_the_input_is_refused_even_with_overwrite(tmp_path, capsys, fake, kind, streamed):
    source = tmp_path / "big.jsonl"
    source.write_text("".join(json.dumps({"text": f"tweet {i}"}) + "\n" for i in range(30)))
    before = source.read_bytes()
    output = _same_file_by(kind, source)
    options = ["--format", "jsonl"] if streamed else ["--format", "table"]
    assert predict("--input", source, "--output", output, "--overwrite", *options) == 2
    assert "is the --input file" in one_line_error(capsys)
    assert source.read_bytes() == before and fake.texts == []


# --- --output is a folder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments", [["--input", "IN"], ["hello there"]], ids=["streamed", "texts"])
def test_an_output_that_is_a_folder_is_one_line(tmp_path, capsys, fake, arguments):
    (tmp_path / "in.txt").write_text("hello\n")
    folder = tmp_path / "labels.jsonl"
    folder.mkdir()
    arguments = [str(tmp_path / "in.txt") if a == "IN" else a for a in arguments]
    assert predict(*arguments, "--output", folder) == 2
    assert "labels.jsonl: is a folder; give a file name" in one_line_error(capsys)
    assert list(folder.iterdir()) == []


# --- an --output that cannot be written ----------------------------------------------------------------


def _unwritable_outputs(tmp_path):
    """Paths no one may create a file at: kernel folders, and (unless root, who may write anywhere) a folder
    without write permission."""
    paths = [p for p in ("/sys/labels.jsonl", "/proc/1/labels.jsonl") if os.path.isdir(os.path.dirname(p))]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        paths += [str(locked / "labels.jsonl"), str(locked / "missing" / "labels.jsonl")]
    return paths


@pytest.mark.parametrize("arguments", [["--input", "IN"], ["--input", "IN", "--format", "jsonl", "--overwrite"],
                                       ["hello there"]], ids=["streamed", "printed from --input", "texts"])
def test_an_output_that_cannot_be_written_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                              arguments):
    (tmp_path / "in.txt").write_text("hello\n")
    arguments = [str(tmp_path / "in.txt") if a == "IN" else a for a in arguments]
    loads = []
    monkeypatch.setattr(SentimentClassifier, "load", classmethod(lambda cls, *a, **k: loads.append(1) or FakeClassifier()))
    outputs = _unwritable_outputs(tmp_path)
    assert outputs, "no unwritable folder on this machine"
    for output in outputs:
        assert predict(*arguments, "--output", output) == 2
        message = one_line_error(capsys)
        assert f"--output {output}: cannot create a file in " in message and "choose another path" in message
    assert loads == []


def test_an_output_in_folders_that_do_not_exist_yet_is_created(tmp_path, fake):
    (tmp_path / "in.txt").write_text("hello\n")
    output = tmp_path / "new" / "deeper" / "labels.jsonl"
    assert predict("--input", tmp_path / "in.txt", "--output", output) == 0
    assert json.loads(output.read_text())["text"] == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "new"]


# --- an --output that is a symbolic link, a progress file doratweet did not write ------------------------


@pytest.mark.parametrize("target", ["elsewhere/labels.jsonl", "existing.jsonl"], ids=["dangling", "to a file"])
@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "texts"])
def test_an_output_that_is_a_symbolic_link_is_refused_naming_the_real_path(tmp_path, capsys, fake, target, streamed):
    (tmp_path / "in.txt").write_text("hello\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "existing.jsonl").write_text("mine\n")
    link = tmp_path / "labels.jsonl"
    link.symlink_to(tmp_path / target)
    arguments = ["--input", tmp_path / "in.txt"] if streamed else ["hello"]
    assert predict(*arguments, "--output", link, "--overwrite") == 2
    message = one_line_error(capsys)
    assert f"--output {link}: is a symbolic link to {tmp_path / target}" in message
    assert list((tmp_path / "elsewhere").iterdir()) == [] and (tmp_path / "existing.jsonl").read_text() == "mine\n"
    assert fake.texts == []


def test_a_users_file_under_the_progress_files_name_is_refused_unless_overwrite(tmp_path, capsys, fake):
    (tmp_path / "in.txt").write_text("hello\n")
    mine = tmp_path / ".labels.jsonl.progress"
    mine.write_text("my notes\n")
    assert predict("--input", tmp_path / "in.txt", "--output", tmp_path / "labels.jsonl") == 2
    assert ".labels.jsonl.progress: already exists and was not written by doratweet predict" in one_line_error(capsys)
    assert mine.read_text() == "my notes\n" and not (tmp_path / "labels.jsonl").exists()
    assert predict("--input", tmp_path / "in.txt", "--output", tmp_path / "labels.jsonl", "--overwrite") == 0


def test_printed_output_leaves_a_users_file_under_the_progress_files_name_alone(tmp_path, fake):
    mine = tmp_path / ".labels.jsonl.progress"
    mine.write_text("my notes\n")
    assert predict("hello", "--output", tmp_path / "labels.jsonl") == 0
    assert mine.read_text() == "my notes\n"


# --- an existing file given as --output for texts from arguments or stdin ----------------------------------


def test_an_existing_output_for_texts_from_arguments_is_refused_unless_overwrite(tmp_path, capsys, fake):
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,notes\n")
    assert predict("I love it", "--output", notes) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert notes.read_text() == "my,own,notes\n"
    assert predict("I love it", "--output", notes, "--overwrite") == 0
    assert notes.read_text().splitlines()[1].startswith("I love it,")


# --- CSV output: texts a spreadsheet would run as a formula ------------------------------------------------

FORMULAS = ["=1+2", "+1+2", "-1+2", "@SUM(A1)", "\t=tab", "=HYPERLINK(\"http://x\",\"y\")", "fine"]


def _csv_cells(path_or_text) -> list[dict]:
    text = path_or_text.read_text(encoding="utf-8") if hasattr(path_or_text, "read_text") else path_or_text
    return list(csv.DictReader(io.StringIO(text)))


def test_streamed_csv_output_neutralises_formulas_in_texts_and_ids(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"={i}" if i % 2 else i, "text": t}) + "\n"
                              for i, t in enumerate(FORMULAS)))
    out = tmp_path / "out.csv"
    predict_file(source, out, FakeClassifier, progress=False)
    rows = _csv_cells(out)
    assert [r["text"] for r in rows] == ["'=1+2", "'+1+2", "'-1+2", "'@SUM(A1)", "'=tab", "'=HYPERLINK(\"http://x\",\"y\")",
                                         "fine"]  # "\t=tab" is stripped like every text, then neutralised
    assert [r["id"] for r in rows] == ["0", "'=1", "2", "'=3", "4", "'=5", "6"]


def test_a_carriage_return_inside_a_text_is_quoted_in_streamed_csv(tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b"one\rtwo\nplain\n")
    out = tmp_path / "out.csv"
    predict_file(source, out, FakeClassifier, progress=False)
    with out.open(newline="", encoding="utf-8") as handle:
        assert [r["text"] for r in csv.DictReader(handle)] == ["one\rtwo", "plain"]


def test_list_and_object_ids_go_into_csv_as_json_text(tmp_path):
    source = tmp_path / "in.jsonl"
    ids = [[1, "a"], {"user": "é", "n": 2}, True, None, 7]
    source.write_text("".join(json.dumps({"id": i, "text": f"t{n}"}) + "\n" for n, i in enumerate(ids)))
    out = tmp_path / "out.csv"
    predict_file(source, out, FakeClassifier, progress=False)
    assert [r["id"] for r in _csv_cells(out)] == ['[1, "a"]', '{"user": "é", "n": 2}', "true", "", "7"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_printed_and_streamed_output_files_are_byte_for_byte_the_same(tmp_path, fake, fmt):
    texts = ["I love it", "=formula", "a, \"quoted\" text"]
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts))
    assert predict("--input", tmp_path / "in.txt", "--output", tmp_path / f"streamed.{fmt}") == 0
    assert predict(*texts, "--output", tmp_path / f"printed.{fmt}") == 0
    printed = (tmp_path / f"printed.{fmt}").read_bytes()
    assert printed == (tmp_path / f"streamed.{fmt}").read_bytes() and b"\r" not in printed


def test_jsonl_output_keeps_texts_as_they_are(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in FORMULAS))
    out = tmp_path / "out.jsonl"
    predict_file(source, out, FakeClassifier, progress=False)
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()][:4] == FORMULAS[:4]


def test_printed_csv_neutralises_formulas_and_a_tab_or_carriage_return_at_the_start():
    texts = ["=cmd|' /C calc'!A0", "\tx", "\ry", "ok"]
    probabilities = FakeClassifier().predict_proba(texts)
    rows = _csv_cells(format_predictions(texts, probabilities, "csv"))
    assert [r["text"] for r in rows] == ["'=cmd|' /C calc'!A0", "'\tx", "'\ry", "ok"]
    assert json.loads(format_predictions(texts[:1], probabilities[:1], "jsonl"))["text"] == texts[0]


# --- one rule for every path -------------------------------------------------------------------------------

LONG = "x" * 5_001


@pytest.mark.parametrize("streamed", [True, False], ids=["with --output", "printed"])
@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".parquet"])
def test_a_text_over_5000_characters_is_refused_in_every_input_format(tmp_path, capsys, fake, suffix, streamed):
    source = tmp_path / f"in{suffix}"
    pd.DataFrame({"text": ["short", LONG]}).to_csv(source, index=False) if suffix == ".csv" else None
    if suffix == ".txt":
        source.write_text(f"short\n{LONG}\n")
    elif suffix == ".jsonl":
        source.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": LONG}) + "\n")
    elif suffix == ".parquet":
        pd.DataFrame({"text": ["short", LONG]}).to_parquet(source)
    output = ["--output", tmp_path / "out.jsonl"] if streamed else ["--format", "jsonl"]
    assert predict("--input", source, *output) == 2
    assert "text is 5,001 characters, over the 5,000 allowed" in one_line_error(capsys)
    assert fake.texts == []


def test_a_text_over_5000_characters_is_refused_as_an_argument_and_on_stdin(capsys, fake, monkeypatch):
    assert predict("fine", LONG) == 2
    assert "TEXT 2: text is 5,001 characters" in one_line_error(capsys)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"fine\n{LONG}\n"))
    assert predict("--format", "jsonl") == 2
    assert "<stdin>:2: text is 5,001 characters" in one_line_error(capsys)
    assert fake.texts == []


def test_a_text_of_5000_characters_with_spaces_around_it_is_labelled_stripped(capsys, fake):
    assert predict(f"  {'y' * 5_000}  ", "--format", "jsonl") == 0
    assert fake.texts == ["y" * 5_000]


@pytest.mark.parametrize("streamed", [True, False], ids=["with --output", "printed"])
def test_blank_lines_and_empty_cells_are_labelled_like_any_text(tmp_path, capsys, fake, streamed):
    txt = tmp_path / "in.txt"
    txt.write_text("first\n\n   \nlast\n")
    table = tmp_path / "in.csv"
    table.write_text('id,text\n1,first\n2,""\n3,"  "\n4,last\n')
    for source in (txt, table):
        out = tmp_path / f"out-{source.suffix[1:]}.jsonl"
        output = ["--output", out] if streamed else ["--format", "jsonl"]
        assert predict("--input", source, *output) == 0
        text = out.read_text() if streamed else capsys.readouterr().out
        assert [json.loads(line)["text"] for line in text.splitlines()] == ["first", "", "", "last"]


def test_blank_lines_on_stdin_and_empty_arguments_are_labelled(capsys, fake, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n\nlast\n"))
    assert predict("--format", "jsonl") == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["first", "", "last"]
    assert predict("", "  ", "--format", "jsonl") == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["", ""]


@pytest.mark.parametrize("streamed", [True, False], ids=["with --output", "printed"])
def test_a_null_text_is_refused_naming_its_line(tmp_path, capsys, fake, streamed):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n{"text": null}\n')
    output = ["--output", tmp_path / "out.jsonl"] if streamed else ["--format", "jsonl"]
    assert predict("--input", source, *output) == 2
    assert "in.jsonl:2: no text (null)" in one_line_error(capsys)


def test_a_lone_surrogate_in_a_json_text_is_refused_naming_its_line(tmp_path, capsys, fake):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "broken \\ud800 half"}\n')
    assert predict("--input", source, "--output", tmp_path / "out.jsonl") == 2
    assert "in.jsonl:2: text holds a lone surrogate" in one_line_error(capsys)


def test_the_server_refuses_a_text_over_5000_characters_whatever_its_max_chars(tmp_path):
    app = create_app(FakeClassifier(), max_chars=10_000)

    async def send(texts):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/classify", json={"texts": texts})

    refused = asyncio.run(send(["fine", LONG]))
    assert refused.status_code == 413
    assert refused.json()["detail"].startswith("texts[1]: text is 5,001 characters, over the 5,000 allowed")
    assert asyncio.run(send(["", "   "])).status_code == 200


# --- the Python API ----------------------------------------------------------------------------------------


@pytest.fixture
def bare_classifier():
    """A SentimentClassifier whose model must never run: each case here is decided before the model."""
    return SentimentClassifier(model=None, prompt_format=None, base_model_id="none")


def test_the_python_api_gives_an_empty_list_for_no_texts(bare_classifier):
    assert bare_classifier.predict_proba([]) == []
    assert bare_classifier.predict([]) == []


@pytest.mark.parametrize("method", ["predict", "predict_proba"])
def test_the_python_api_refuses_a_single_string_with_a_type_error(bare_classifier, method):
    with pytest.raises(TypeError, match=r"^texts must be a list of strings, not a str; pass \[text\] for one text$"):
        getattr(bare_classifier, method)("I love it")


@pytest.mark.parametrize("item, message", [(None, "no text (null)"), (3, "not a string but int"),
                                           (b"bytes", "not a string but bytes")])
def test_the_python_api_names_the_index_of_an_item_that_is_not_a_string(bare_classifier, item, message):
    with pytest.raises(TypeError) as raised:
        bare_classifier.predict(["fine", "also fine", item])
    assert str(raised.value).startswith(f"texts[2]: {message}") and "\n" not in str(raised.value)


def test_the_python_api_refuses_a_text_over_5000_characters_naming_its_index(bare_classifier):
    with pytest.raises(ValueError, match=r"^texts\[1\]: text is 5,001 characters, over the 5,000 allowed"):
        bare_classifier.predict_proba(["fine", LONG])


def test_the_python_api_labels_a_text_as_the_cli_does_stripped(tiny_run_dir):
    classifier = SentimentClassifier.load(tiny_run_dir, bf16=False)
    padded, stripped, blank = classifier.predict_proba(["  so happy today \n", "so happy today", " "])
    assert padded == stripped
    assert set(blank) == {"negative", "neutral", "positive"}


# --- interrupting predict ----------------------------------------------------------------------------------


def test_an_interrupted_streamed_predict_says_to_run_the_same_command_and_that_resumes(tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"tweet {i}\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    command = ["--input", source, "--output", out, "--batch-size", "3"]
    interrupted = FakeClassifier(interrupt_at=3)
    monkeypatch.setattr(SentimentClassifier, "load", classmethod(lambda cls, *args, **kwargs: interrupted))
    assert predict(*command) == 130
    err = capsys.readouterr().err
    assert err == (f"doratweet: interrupted; {out} holds the first 6 rows: run the same command again to label "
                   "the rest\n")
    assert "--resume" not in err
    resumed = FakeClassifier()
    monkeypatch.setattr(SentimentClassifier, "load", classmethod(lambda cls, *args, **kwargs: resumed))
    assert predict(*command) == 0
    assert resumed.texts == [f"tweet {i}" for i in range(6, 10)]
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [f"tweet {i}" for i in range(10)]


def test_sigterm_during_a_streamed_predict_exits_143_saying_what_the_output_holds(tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"tweet {i}\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    terminated = FakeClassifier()
    original = terminated.predict_proba

    def predict_proba(texts):
        if terminated.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler main() installs raises at the next bytecode
        return original(texts)

    terminated.predict_proba = predict_proba
    monkeypatch.setattr(SentimentClassifier, "load", classmethod(lambda cls, *args, **kwargs: terminated))
    assert predict("--input", source, "--output", out, "--batch-size", "3") == 143
    assert capsys.readouterr().err == (f"doratweet: stopped by SIGTERM; {out} holds the first 6 rows: run the same "
                                       "command again to label the rest\n")


def test_an_interrupted_printed_predict_does_not_mention_resume(capsys, monkeypatch):
    interrupted = FakeClassifier(interrupt_at=1)
    monkeypatch.setattr(SentimentClassifier, "load", classmethod(lambda cls, *args, **kwargs: interrupted))
    assert predict("hello") == 130
    assert capsys.readouterr().err == "doratweet: interrupted; nothing was written\n"


# --- UTF-16 files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding, bom", [("utf-16", True), ("utf-16-le", False), ("utf-16-be", False)])
@pytest.mark.parametrize("streamed", [True, False], ids=["with --output", "printed"])
def test_a_utf16_prediction_input_is_named_as_utf16(tmp_path, capsys, fake, encoding, bom, streamed):
    source = tmp_path / "in.csv"
    source.write_bytes("id,text\n1,I love it\n2,hate this\n".encode(encoding))
    assert source.read_bytes()[:2] in ((b"\xff\xfe", b"\xfe\xff") if bom else (b"i\x00", b"\x00i"))
    output = ["--output", tmp_path / "out.jsonl"] if streamed else ["--format", "jsonl"]
    assert predict("--input", source, *output) == 2
    assert f"{source}: the file is UTF-16, not UTF-8; re-save it as UTF-8" in one_line_error(capsys)


def test_a_utf8_file_with_a_nul_byte_in_a_tweet_is_still_utf8(tmp_path, fake):
    source = tmp_path / "in.txt"
    source.write_bytes("a tweet with a \x00 inside it, and enough other text around it\nsecond\n".encode())
    assert predict("--input", source, "--output", tmp_path / "out.jsonl") == 0
    assert len(fake.texts) == 2


def test_a_utf16_input_of_mostly_non_latin_text_without_a_byte_order_mark_is_named(tmp_path, capsys, fake):
    source = tmp_path / "in.txt"
    source.write_bytes("中文推文很好\n我讨厌这个天气\n今天真不错\n明天见\n".encode("utf-16-le"))
    assert predict("--input", source, "--output", tmp_path / "out.jsonl") == 2
    assert "the file is UTF-16, not UTF-8" in one_line_error(capsys)


@pytest.mark.parametrize("encoding, expected", [
    ("utf-16", "<stdin>: the file is UTF-16, not UTF-8; re-save it as UTF-8"),
    ("utf-16-le", "<stdin>: the file is UTF-16, not UTF-8; re-save it as UTF-8"),
    ("latin-1", "<stdin>:2: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8")])
def test_stdin_in_another_encoding_is_named_as_a_file_would_be(capsys, fake, monkeypatch, encoding, expected):
    data = "I love it\ncafé was awful\n".encode(encoding)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))
    assert predict("--format", "jsonl") == 2
    assert expected in one_line_error(capsys)
    assert fake.texts == []


def test_stdin_bytes_with_a_byte_order_mark_are_read_as_utf8(capsys, fake, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\ufeffcafé\nsecond\n".encode()), encoding="utf-8"))
    assert predict("--format", "jsonl") == 0
    assert fake.texts == ["café", "second"]
