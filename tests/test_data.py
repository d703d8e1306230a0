"""data.py, and the file reader it shares with `predict --input` (tables.py): every --data source becomes validated
(text, label) splits, and every problem in a file is a one-line error naming the file, its line (or Parquet row)
and the fix (docs/reliability.md lists the cases).

Sections, by what they protect: layouts (which spec gives which splits), choosing the source and the split,
labels, texts, duplicate ids, bad rows and --skip-bad-rows, then the reading of files that predict --input
shares (missing and empty files, columns, CSV and JSON Lines syntax, encodings, line endings, prediction input).
"""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from doratweet.data import DEFAULT_DATA, MAX_TEXT_CHARS, Split, load_data, load_split, resolve_data_spec
from doratweet.errors import UserError
from doratweet.predict import read_prediction_input

REAL_TWEETEVAL = Path(__file__).resolve().parents[2] / "shared/data/tweeteval/sentiment"
MAPPING = "0\tnegative\n1\tneutral\n2\tpositive\n"


def write_tweeteval(folder: Path, splits: dict[str, tuple[str, str]], mapping: str | None = MAPPING) -> Path:
    """splits: {"train": (text file content, labels file content), ...} using the official file prefixes."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (texts, labels) in splits.items():
        (folder / f"{prefix}_text.txt").write_text(texts, encoding="utf-8", newline="")
        (folder / f"{prefix}_labels.txt").write_text(labels, encoding="utf-8", newline="")
    if mapping is not None:
        (folder / "mapping.txt").write_text(mapping, encoding="utf-8")
    return folder


def write_csv(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def raised_message(spec, **options) -> str:
    with pytest.raises(UserError) as raised:
        load_data(str(spec), **options)
    return str(raised.value)


def read_texts(path, text_column: str = "text") -> list[str]:
    """What predict prints labels for; it streams the same rows to --output (batch_predict.iter_input_rows)."""
    return read_prediction_input(str(path), [], text_column)


# --- layouts: the official TweetEval folder -----------------------------------------------------------------


def test_tweeteval_folder_strips_texts_and_maps_val_to_validation(tmp_path):
    folder = write_tweeteval(
        tmp_path / "sentiment",
        {
            "train": ("  good day \nbad day\t\n", "2\n0\n"),
            "val": ("meh\n", "1\n"),
            "test": ("fine\nawful\n", "2\n0\n"),
        },
    )
    splits = load_data(str(folder))
    assert list(splits) == ["train", "validation", "test"]
    assert splits["train"].texts == ["good day", "bad day"]
    assert splits["train"].labels == [2, 0]
    assert splits["validation"].texts == ["meh"]
    assert splits["test"].labels == [2, 0]


def test_tweeteval_folder_with_only_some_splits_has_only_those(tmp_path):
    folder = write_tweeteval(tmp_path, {"test": ("fine\n", "2\n")}, mapping=None)
    assert list(load_data(str(folder))) == ["test"]


def test_tweeteval_mapping_must_be_negative_neutral_positive(tmp_path):
    folder = write_tweeteval(tmp_path, {"test": ("ok\n", "0\n")}, mapping="0\tanger\n1\tjoy\n")
    with pytest.raises(UserError, match=r"mapping\.txt: maps 0 anger, 1 joy"):
        load_data(str(folder))


def test_tweeteval_text_file_without_labels_file_is_an_error(tmp_path):
    (tmp_path / "train_text.txt").write_text("a\n")
    with pytest.raises(UserError, match=r"train_text\.txt has no partner train_labels\.txt"):
        load_data(str(tmp_path))


def test_tweeteval_labels_file_without_text_file_is_an_error(tmp_path):
    (tmp_path / "test_labels.txt").write_text("0\n")
    with pytest.raises(UserError, match=r"test_labels\.txt has no partner test_text\.txt"):
        load_data(str(tmp_path))


def test_tweeteval_count_mismatch_names_both_files_and_counts(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\nc\n", "0\n1\n")})
    with pytest.raises(UserError, match=r"train_text\.txt has 3 lines but .*train_labels\.txt has 2"):
        load_data(str(folder))


def test_tweeteval_count_mismatch_names_the_first_line_without_a_partner(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\n", "0\n1\n2\n")})
    with pytest.raises(UserError, match=r"the first line without a partner is train_labels\.txt:3\)"):
        load_data(str(folder))


def test_tweeteval_count_mismatch_is_an_error_even_with_skip_bad_rows(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\nc\n", "0\n1\n")})
    with pytest.raises(UserError, match=r"train_text\.txt has 3 lines but .*train_labels\.txt has 2"):
        load_data(str(folder), skip_bad_rows=True)


def test_real_tweeteval_folder_has_the_published_row_counts():
    if not REAL_TWEETEVAL.exists():
        pytest.skip(f"the TweetEval sentiment copy is not at {REAL_TWEETEVAL}")
    splits = load_data(str(REAL_TWEETEVAL))
    assert {name: len(split) for name, split in splits.items()} == {
        "train": 45_615,
        "validation": 2_000,
        "test": 12_284,
    }
    for split in splits.values():
        assert set(split.labels) == {0, 1, 2}
        assert all(text == text.strip() and text for text in split.texts)


# --- layouts: single csv / jsonl / parquet files ------------------------------------------------------------


def test_csv_with_label_ids(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\n great ,2\n\"so, so\",1\n")
    splits = load_data(str(path))
    assert list(splits) == ["train"]
    assert splits["train"].texts == ["great", "so, so"]
    assert splits["train"].labels == [2, 1]
    assert splits["train"].source == str(path)


def test_jsonl_with_label_ids(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"text": "meh", "label": 1}, {"text": "yay", "label": "2"}])
    split = load_data(str(path))["validation"]
    assert split.texts == ["meh", "yay"]
    assert split.labels == [1, 2]


def test_json_suffix_is_read_as_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "test.json", [{"text": "boo", "label": 0}])
    assert load_data(str(path))["test"].texts == ["boo"]


def test_parquet_with_label_ids(tmp_path):
    path = tmp_path / "val.parquet"
    pd.DataFrame({"text": [" up ", "down"], "label": [2, 0]}).to_parquet(path)
    split = load_data(str(path))["validation"]
    assert split.texts == ["up", "down"]
    assert split.labels == [2, 0]


def test_custom_column_names(tmp_path):
    path = write_csv(tmp_path / "test.csv", "tweet,sentiment\nhello,neutral\n")
    split = load_data(str(path), text_column="tweet", label_column="sentiment")["test"]
    assert (split.texts, split.labels) == (["hello"], [1])


def test_single_file_with_other_stem_becomes_the_test_split(tmp_path):
    path = write_csv(tmp_path / "my_tweets.csv", "text,label\nhi,1\n")
    assert list(load_data(str(path))) == ["test"]


def test_unsupported_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "train.xlsx"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"unsupported file type '\.xlsx'; use \.csv, \.jsonl, \.json, \.parquet"):
        load_data(str(path))


# --- layouts: folders of split files and split=path mappings ------------------------------------------------


def test_folder_of_split_files_in_mixed_formats(tmp_path):
    write_csv(tmp_path / "train.csv", "text,label\na,0\nb,2\n")
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "c", "label": "neutral"}])
    pd.DataFrame({"text": ["d"], "label": [2]}).to_parquet(tmp_path / "test.parquet")
    (tmp_path / "README.md").write_text("not data")
    splits = load_data(str(tmp_path))
    assert list(splits) == ["train", "validation", "test"]
    assert [len(split) for split in splits.values()] == [2, 1, 1]
    assert splits["validation"].labels == [1]


def test_two_files_for_one_split_is_an_error(tmp_path):
    write_csv(tmp_path / "val.csv", "text,label\na,0\n")
    write_csv(tmp_path / "validation.csv", "text,label\nb,0\n")
    with pytest.raises(UserError, match=r"two files for the validation split \(val\.csv, validation\.csv\)"):
        load_data(str(tmp_path))


def test_folder_without_data_files_lists_expected_names(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"no data files; expected TweetEval files .*_text\.txt.*\.csv"):
        load_data(str(tmp_path))


def test_split_mapping_string_loads_each_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "a.csv", "text,label\nx,0\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "y", "label": 1}])
    pd.DataFrame({"text": ["z"], "label": [2]}).to_parquet(tmp_path / "c.parquet")
    splits = load_data("train=a.csv,dev=b.jsonl,test=c.parquet")
    assert {name: split.texts for name, split in splits.items()} == {
        "train": ["x"],
        "validation": ["y"],
        "test": ["z"],
    }


def test_split_mapping_string_may_give_a_subset(tmp_path):
    path = write_csv(tmp_path / "a.csv", "text,label\nx,0\n")
    assert list(load_data(f"test={path}")) == ["test"]


def test_split_mapping_string_rejects_unknown_split_names(tmp_path):
    path = write_csv(tmp_path / "a.csv", "text,label\nx,0\n")
    with pytest.raises(UserError, match=r"unknown split 'trian'"):
        load_data(f"trian={path}")


def test_split_mapping_with_a_missing_file_names_the_split_and_the_path(tmp_path):
    with pytest.raises(UserError, match=r"train file in --data .*gone\.csv: no such file; check the path"):
        load_data(f"train={tmp_path / 'gone.csv'}")


# --- layouts: the Hugging Face Hub (never the network: load_dataset is replaced) ----------------------------


def test_hub_default_loads_tweet_eval_sentiment(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"text": [" hi ", "bye"], "label": [1, 0]}),
                "validation": datasets.Dataset.from_dict({"text": ["meh"], "label": [1]}),
                "test": datasets.Dataset.from_dict({"text": ["yay"], "label": [2]}),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("DORATWEET_DATA", raising=False)
    splits = load_data()
    assert calls == [("cardiffnlp/tweet_eval", "sentiment")]
    assert list(splits) == ["train", "validation", "test"]
    assert splits["train"].texts == ["hi", "bye"]
    assert splits["train"].labels == [1, 0]
    assert splits["test"].source == "cardiffnlp/tweet_eval (sentiment)"


def test_hub_unreachable_suggests_a_local_copy(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cardiffnlp/tweet_eval' on the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError) as raised:
        load_data("tweet_eval")
    message = str(raised.value)
    assert "cardiffnlp/tweet_eval (sentiment)" in message
    assert "ConnectionError" in message
    assert "--data PATH" in message and "DORATWEET_DATA" in message
    assert "\n" not in message


# --- choosing the source and the split ----------------------------------------------------------------------


def test_resolve_data_spec_prefers_argument_then_env_then_default(monkeypatch):
    monkeypatch.delenv("DORATWEET_DATA", raising=False)
    assert resolve_data_spec(None) == DEFAULT_DATA == "tweet_eval"
    monkeypatch.setenv("DORATWEET_DATA", "")
    assert resolve_data_spec(None) == "tweet_eval"
    monkeypatch.setenv("DORATWEET_DATA", "/data/x.csv")
    assert resolve_data_spec(None) == "/data/x.csv"
    assert resolve_data_spec("other.csv") == "other.csv"


def test_env_variable_chooses_the_data_when_spec_is_none(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "train.csv", "text,label\nfrom env,2\n")
    monkeypatch.setenv("DORATWEET_DATA", str(path))
    assert load_data()["train"].texts == ["from env"]


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"--data .*nope\.csv: no such file or folder"):
        load_data(str(tmp_path / "nope.csv"))


def test_missing_path_from_env_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DORATWEET_DATA", str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"^DORATWEET_DATA .*gone: no such file or folder"):
        load_data()


def test_load_split_normalises_the_split_name(tmp_path):
    write_csv(tmp_path / "dev.csv", "text,label\nhi,1\n")
    split = load_split(str(tmp_path), "VAL")
    assert split.name == "validation"
    assert split.texts == ["hi"]


def test_load_split_lists_available_splits_when_absent(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nhi,1\n")
    with pytest.raises(UserError, match=r"no 'test' split \(it has: train\)"):
        load_split(str(path), "test")


def test_head_takes_the_first_rows():
    split = Split("train", ["a", "b", "c"], [0, 1, 2], "memory")
    assert split.head(2) == Split("train", ["a", "b"], [0, 1], "memory")
    assert split.head(None) is split
    assert len(split.head(10)) == 3


# --- labels: ids or names; anything else names its line and the accepted labels -----------------------------


def test_csv_with_label_names_in_any_case(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nawful,Negative\nok, NEUTRAL \nyay,positive\n")
    assert load_data(str(path))["train"].labels == [0, 1, 2]


def test_jsonl_with_label_names(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"text": "boo", "label": "negative"}])
    assert load_data(str(path))["test"].labels == [0]


def test_parquet_with_label_names(tmp_path):
    path = tmp_path / "test.parquet"
    pd.DataFrame({"text": ["up", "flat"], "label": ["positive", "neutral"]}).to_parquet(path)
    assert load_data(str(path))["test"].labels == [2, 1]


def test_unknown_label_shows_value_line_and_accepted_labels(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nok,1\nhmm,meh\n")
    expected = r"train\.csv:3: unknown label 'meh'; accepted: 0, 1, 2, negative, neutral, positive"
    with pytest.raises(UserError, match=expected):
        load_data(str(path))


def test_tweeteval_label_out_of_range_names_file_and_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\n", "0\n7\n")})
    with pytest.raises(UserError, match=r"train_labels\.txt:2: unknown label '7'"):
        load_data(str(folder))


def test_jsonl_label_out_of_range_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}])
    with pytest.raises(UserError, match=r"train\.jsonl:2: unknown label 3; accepted: 0, 1, 2, negative"):
        load_data(str(path))


def test_parquet_label_out_of_range_names_the_row(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["a", "b"], "label": [0, -1]}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet row 2: unknown label -1; accepted: "):
        load_data(str(path))


def test_fractional_label_is_not_rounded(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1.5}])
    with pytest.raises(UserError, match=r"train\.jsonl:1: unknown label 1\.5"):
        load_data(str(path))


def test_csv_row_with_a_missing_field_reports_the_missing_label(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nfine,0\nno label here\n")
    with pytest.raises(UserError, match=r"train\.csv:3: missing label"):
        load_data(str(path))


# --- texts: an empty or whitespace-only text, and a text longer than MAX_TEXT_CHARS (a 1 MB "tweet") --------


def test_tweeteval_blank_tweet_names_file_and_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"val": ("ok\n   \n", "0\n1\n")})
    with pytest.raises(UserError, match=r"val_text\.txt:2: empty text"):
        load_data(str(folder))


def test_empty_csv_text_names_the_line(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nok,1\n  ,2\n")
    with pytest.raises(UserError, match=r"train\.csv:3: empty text"):
        load_data(str(path))


def test_null_parquet_text_names_the_row(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["ok", None], "label": [1, 2]}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet row 2: empty text"):
        load_data(str(path))


def test_jsonl_whitespace_text_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok", "label": 0}, {"text": " \t ", "label": 1}])
    with pytest.raises(UserError, match=r"train\.jsonl:2: empty text; fix the row or pass --skip-bad-rows"):
        load_data(str(path))


def test_jsonl_row_without_the_text_field_is_an_empty_text(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok", "label": 0}, {"label": 1}])
    with pytest.raises(UserError, match=r"train\.jsonl:2: empty text"):
        load_data(str(path))


def test_parquet_whitespace_text_names_the_row(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["ok", "   "], "label": [0, 1]}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet row 2: empty text"):
        load_data(str(path))


def test_max_text_chars_is_far_above_a_tweet():
    assert 280 < MAX_TEXT_CHARS == 5_000


def test_one_megabyte_csv_text_is_rejected_naming_file_and_line(tmp_path):
    path = write_csv(tmp_path / "train.csv", f"text,label\nok,0\n{'x' * 1_000_000},1\n")
    expected = (
        r"train\.csv:3: text is 1,000,000 characters, over the 5,000 allowed \(a tweet has at most 280\); "
        r"shorten it or pass --skip-bad-rows to drop bad rows$"
    )
    with pytest.raises(UserError, match=expected):
        load_data(str(path))


def test_one_megabyte_tweeteval_text_names_the_text_file_and_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": (f"ok\n{'y' * 1_000_000}\n", "0\n1\n")})
    with pytest.raises(UserError, match=r"train_text\.txt:2: text is 1,000,000 characters"):
        load_data(str(folder))


def test_one_megabyte_jsonl_text_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "z" * 1_000_000, "label": 2}])
    with pytest.raises(UserError, match=r"train\.jsonl:1: text is 1,000,000 characters"):
        load_data(str(path))


def test_one_megabyte_parquet_text_names_the_row(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["ok", "w" * 1_000_000], "label": [0, 1]}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet row 2: text is 1,000,000 characters"):
        load_data(str(path))


def test_a_text_of_exactly_max_text_chars_is_kept_and_padding_does_not_count(tmp_path):
    longest = "a" * MAX_TEXT_CHARS
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"  {longest}  ", "label": 1}])
    assert load_data(str(path))["train"].texts == [longest]


# --- duplicate ids in a table's id column -------------------------------------------------------------------


def test_csv_duplicate_id_names_both_lines_and_the_fix(tmp_path):
    path = write_csv(tmp_path / "train.csv", "id,text,label\n1,a,0\n2,b,1\n1,c,2\n")
    message = raised_message(path)
    assert message.startswith(f"{path}:4: duplicate id '1', first used on {path}:2; ")
    assert message.endswith("give each row its own id or pass --skip-bad-rows to drop bad rows")


def test_jsonl_duplicate_id_compares_numbers_and_strings_as_text(tmp_path):
    records = [{"id": 7, "text": "a", "label": 0}, {"id": "7", "text": "b", "label": 1}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(UserError, match=r"train\.jsonl:2: duplicate id '7', first used on .*train\.jsonl:1"):
        load_data(str(path))


def test_parquet_duplicate_id_names_both_rows(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"id": [10, 11, 10], "text": ["a", "b", "c"], "label": [0, 1, 2]}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet row 3: duplicate id 10, first used on .*train\.parquet row 1"):
        load_data(str(path))


def test_skip_bad_rows_keeps_the_first_row_of_each_id(tmp_path, caplog):
    path = write_csv(tmp_path / "train.csv", "id,text,label\n1,a,0\n2,b,1\n1,c,2\n2,d,2\n3,e,0\n")
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        split = load_data(str(path), skip_bad_rows=True)["train"]
    assert (split.texts, split.labels) == (["a", "b", "e"], [0, 1, 0])
    assert "skipped 2 bad rows in train (first: " in caplog.text
    assert "train.csv:4: duplicate id '1'" in caplog.text


def test_a_skipped_bad_row_does_not_claim_its_id(tmp_path):
    path = write_csv(tmp_path / "train.csv", "id,text,label\n1,,0\n1,b,1\n")
    split = load_data(str(path), skip_bad_rows=True)["train"]
    assert (split.texts, split.labels) == (["b"], [1])


def test_blank_ids_are_not_duplicates(tmp_path):
    path = write_csv(tmp_path / "train.csv", "id,text,label\n,a,0\n,b,1\n")
    assert load_data(str(path))["train"].texts == ["a", "b"]


def test_id_column_can_be_renamed_or_turned_off(tmp_path):
    path = write_csv(tmp_path / "train.csv", "tweet_id,text,label\n5,a,0\n5,b,1\n")
    assert load_data(str(path))["train"].texts == ["a", "b"]  # no "id" column: nothing to check
    with pytest.raises(UserError, match=r"train\.csv:3: duplicate id '5'"):
        load_data(str(path), id_column="tweet_id")
    assert len(load_data(str(path), id_column=None)["train"]) == 2


def test_tweeteval_line_numbers_are_not_ids(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("same\nsame\n", "0\n0\n")})
    assert load_data(str(folder))["train"].texts == ["same", "same"]


# --- bad rows: one line each; --skip-bad-rows drops and counts them, never a whole-file problem -------------


def test_errors_are_one_line(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nhmm,meh\n")
    with pytest.raises(UserError) as raised:
        load_data(str(path))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "name, content",
    [
        ("train.csv", b""),
        ("train.csv", b"text,label\nx,0\n" + b"y" * 200_000 + b",1\n"),
        ("train.csv", b'text,label\n"open,0\nmore\n'),
        ("train.csv", b"id,text,label\n1,a,0\n1,b,1\n"),
        ("train.csv", b"text,label\r\nok,1\r\nbad,\r\n"),
        ("train.jsonl", b'{"text": "a\\nb", "label": "bad\\nlabel"}\n'),
        ("train.jsonl", b"\xef\xbb\xbf\xff\n"),
    ],
)
def test_messy_file_errors_are_one_line(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    message = raised_message(path)
    assert "\n" not in message and "\r" not in message
    assert name in message


def test_skip_bad_rows_drops_them_and_logs_one_count(tmp_path, caplog):
    path = write_csv(tmp_path / "train.csv", "text,label\nok,1\n,2\nhmm,meh\nfine,positive\nx,9\n")
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        split = load_data(str(path), skip_bad_rows=True)["train"]
    assert split.texts == ["ok", "fine"]
    assert split.labels == [1, 2]
    warnings = [record for record in caplog.records if record.name == "doratweet.data"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage().startswith("skipped 3 bad rows in train (first: ")
    assert "train.csv:3: empty text" in warnings[0].getMessage()


def test_skip_bad_rows_counts_malformed_json_lines(tmp_path, caplog):
    path = tmp_path / "test.jsonl"
    path.write_text('{"text": "ok", "label": 1}\nnot json\n{"text": "bad", "label": "meh"}\n')
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        split = load_data(str(path), skip_bad_rows=True)["test"]
    assert split.texts == ["ok"]
    assert "skipped 2 bad rows in test" in caplog.text


def test_skip_bad_rows_keeps_tweeteval_text_and_label_aligned(tmp_path, caplog):
    folder = write_tweeteval(tmp_path, {"train": ("a\n\nc\nd\n", "0\n1\nx\n2\n")})
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        split = load_data(str(folder), skip_bad_rows=True)["train"]
    assert (split.texts, split.labels) == (["a", "d"], [0, 2])
    assert "skipped 2 bad rows in train" in caplog.text


def test_skip_bad_rows_drops_csv_rows_with_extra_fields(tmp_path, caplog):
    path = write_csv(tmp_path / "train.csv", "text,label\nfine,0\nwell, ok,2\ngood,2\n")
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        split = load_data(str(path), skip_bad_rows=True)["train"]
    assert (split.texts, split.labels) == (["fine", "good"], [0, 2])
    assert "skipped 1 bad row in train (first: " in caplog.text


def test_skip_bad_rows_drops_a_one_megabyte_csv_text(tmp_path, caplog):
    path = write_csv(tmp_path / "train.csv", f'text,label\nok,0\n"{"x" * 1_000_000}",1\nfine,2\n')
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        split = load_data(str(path), skip_bad_rows=True)["train"]
    assert (split.texts, split.labels) == (["ok", "fine"], [0, 2])
    assert "skipped 1 bad row in train (first: " in caplog.text
    assert "train.csv:3: text is 1,000,000 characters" in caplog.text


def test_no_warning_when_nothing_is_skipped(tmp_path, caplog):
    path = write_csv(tmp_path / "train.csv", "text,label\nok,1\n")
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        load_data(str(path), skip_bad_rows=True)
    assert caplog.records == []


def test_undecodable_bytes_are_an_error_even_with_skip_bad_rows(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nok,1\ncaf\xe9,2\n")
    with pytest.raises(UserError, match=r"train\.csv:3: not valid UTF-8"):
        load_data(str(path), skip_bad_rows=True)


# --- reading files (tables.py, shared with predict --input): missing and empty files ------------------------


def test_read_texts_missing_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"missing\.txt: no such file"):
        read_texts(tmp_path / "missing.txt")


def test_tweeteval_empty_text_and_label_files_are_an_error(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\n", "0\n"), "test": ("", "")})
    with pytest.raises(UserError, match=r"test_text\.txt: the file is empty .*; fill it, or pass the file you meant"):
        load_data(str(folder))


def test_tweeteval_empty_labels_file_is_an_error(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\n", "")})
    with pytest.raises(UserError, match=r"train_labels\.txt: the file is empty"):
        load_data(str(folder))


def test_empty_mapping_file_is_an_error(tmp_path):
    folder = write_tweeteval(tmp_path, {"test": ("ok\n", "0\n")}, mapping="")
    with pytest.raises(UserError, match=r"mapping\.txt: the file is empty"):
        load_data(str(folder))


def test_zero_byte_csv_is_an_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", "")
    with pytest.raises(UserError, match=r"train\.csv: the file is empty"):
        load_data(str(path))


def test_csv_with_only_a_header_is_an_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\n")
    with pytest.raises(UserError, match=r"train\.csv: no rows in the train split; give it at least one labelled text"):
        load_data(str(path))


def test_jsonl_of_only_blank_lines_is_an_empty_file(tmp_path):
    path = write_csv(tmp_path / "train.jsonl", "\n  \n")
    with pytest.raises(UserError, match=r"train\.jsonl: the file is empty \(or holds only whitespace\)"):
        load_data(str(path))


def test_zero_byte_parquet_is_an_error(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"train\.parquet: the file is empty"):
        load_data(str(path))


def test_parquet_without_rows_is_an_error(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet: no rows in the train split"):
        load_data(str(path))


def test_empty_file_in_a_folder_of_split_files_is_an_error(tmp_path):
    write_csv(tmp_path / "train.csv", "text,label\na,0\n")
    write_csv(tmp_path / "test.csv", "")
    with pytest.raises(UserError, match=r"test\.csv: the file is empty"):
        load_data(str(tmp_path))


def test_read_texts_empty_txt_is_an_error(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"in\.txt: no texts to classify"):
        read_texts(path)


def test_read_texts_csv_with_only_a_header_is_an_error(tmp_path):
    path = write_csv(tmp_path / "in.csv", "text\n")
    with pytest.raises(UserError, match=r"in\.csv: no texts to classify"):
        read_texts(path)


# --- reading files: columns ---------------------------------------------------------------------------------


def test_missing_text_column_lists_available_columns_and_option(tmp_path):
    path = write_csv(tmp_path / "train.csv", "tweet,label\nhi,0\n")
    expected = r"no column 'text' \(columns: 'tweet', 'label'\); choose one with --text-column"
    with pytest.raises(UserError, match=expected):
        load_data(str(path))


def test_missing_label_column_names_the_label_option(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "hi", "y": 0}])
    with pytest.raises(UserError, match=r"no column 'label' \(columns: 'text', 'y'\); choose one with --label-column"):
        load_data(str(path))


def test_parquet_missing_text_column_lists_available_columns(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"tweet": ["hi"], "label": [0]}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet: no column 'text' \(columns: 'tweet', 'label'\); choose one"):
        load_data(str(path))


def test_read_texts_missing_column_lists_available(tmp_path):
    path = write_csv(tmp_path / "in.csv", "tweet\nhi\n")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: 'tweet'\); choose one with --text-column"):
        read_texts(path)


def test_read_texts_jsonl_missing_column_lists_available(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"tweet": "a"}])
    expected = r"in\.jsonl:1: no field 'text' \(fields: 'tweet'\); choose one with --text-column"
    with pytest.raises(UserError, match=expected):
        read_texts(path)


def test_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label,text\na,0,b\n")
    with pytest.raises(UserError, match=r"train\.csv:1: column 'text' appears twice in the header; rename or remove"):
        load_data(str(path))


# --- reading files: CSV and JSON Lines syntax ---------------------------------------------------------------


def test_csv_keeps_text_that_pandas_would_read_as_missing(tmp_path):
    path = write_csv(tmp_path / "test.csv", "text,label\nNA,1\nnull,0\n")
    assert load_data(str(path))["test"].texts == ["NA", "null"]


def test_csv_row_with_an_unquoted_comma_is_an_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nwell, ok,1\n")
    with pytest.raises(UserError, match=r"train\.csv:2: more fields than the header"):
        load_data(str(path))


def test_csv_row_with_an_extra_field_names_its_own_line(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nfine,0\nalso fine,1\nwell, ok,2\n")
    expected = r"train\.csv:4: more fields than the header has columns \(3, not 2\); quote texts that contain commas"
    with pytest.raises(UserError, match=expected):
        load_data(str(path))


def test_csv_quote_never_closed_names_the_line_it_opens_on(tmp_path):
    path = write_csv(tmp_path / "train.csv", 'text,label\nfine,0\n"never closed,1\nmore,2\n')
    with pytest.raises(UserError, match=r"train\.csv:3: not valid CSV \(.*\); check the quotes"):
        load_data(str(path))


def test_csv_line_numbers_count_line_breaks_inside_quoted_texts(tmp_path):
    path = write_csv(tmp_path / "train.csv", 'text,label\n"one\ntwo\nthree",1\nbad,9\n')
    with pytest.raises(UserError, match=r"train\.csv:5: unknown label '9'"):
        load_data(str(path))


def test_csv_blank_lines_are_ignored_but_still_counted(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\n\nok,1\n\nbad,9\n")
    with pytest.raises(UserError, match=r"train\.csv:5: unknown label '9'"):
        load_data(str(path))


def test_malformed_json_line_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n{"text": "broken", \n')
    with pytest.raises(UserError, match=r"train\.jsonl:2: malformed JSON"):
        load_data(str(path))


# --- reading files: encodings (not UTF-8 is an error at its line; UTF-16 is named; a BOM is ignored) --------


def test_tweeteval_undecodable_bytes_name_file_and_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"test": ("ok\nok\n", "0\n1\n")})
    (folder / "test_text.txt").write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"test_text\.txt:2: not valid UTF-8 \(byte 0xe9\)"):
        load_data(str(folder))


def test_undecodable_csv_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nok,1\n\xff\xfe,2\n")
    with pytest.raises(UserError, match=r"train\.csv:3: not valid UTF-8"):
        load_data(str(path))


def test_undecodable_label_file_names_the_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\n", "0\n1\n")})
    (folder / "train_labels.txt").write_bytes(b"0\n\xb1\n")
    expected = r"train_labels\.txt:2: not valid UTF-8 \(byte 0xb1\); re-save the file as UTF-8"
    with pytest.raises(UserError, match=expected):
        load_data(str(folder))


def test_undecodable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 0}\r\n{"text": "caf\xe9", "label": 1}\r\n')
    with pytest.raises(UserError, match=r"train\.jsonl:2: not valid UTF-8 \(byte 0xe9\)"):
        load_data(str(path))


def test_read_texts_undecodable_txt_names_the_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"fine\nalso fine\n\x80oops\n")
    with pytest.raises(UserError, match=r"in\.txt:3: not valid UTF-8 \(byte 0x80\)"):
        read_texts(path)


@pytest.mark.parametrize("name", ["train.csv", "train.jsonl", "train_text.txt"])
def test_a_utf16_data_file_is_named_as_utf16(tmp_path, name):
    if name == "train_text.txt":
        (tmp_path / "train_labels.txt").write_text("2\n0\n")
    content = {"train.csv": "text,label\nI love it,2\n", "train.jsonl": '{"text": "I love it", "label": 2}\n',
               "train_text.txt": "I love it\nhate this\n"}[name]
    (tmp_path / name).write_bytes(content.encode("utf-16"))
    with pytest.raises(UserError, match=rf"{name}: the file is UTF-16, not UTF-8; re-save it as UTF-8"):
        load_data(str(tmp_path / name) if name != "train_text.txt" else str(tmp_path))


def test_tweeteval_files_with_a_bom_are_read_without_it(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("\ufeffhello\nbye\n", "\ufeff2\n0\n")}, mapping="\ufeff" + MAPPING)
    split = load_data(str(folder))["train"]
    assert split.texts == ["hello", "bye"]
    assert split.labels == [2, 0]


def test_csv_with_a_bom_finds_its_first_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nhi,1\n", encoding="utf-8-sig")
    split = load_data(str(path))["train"]
    assert (split.texts, split.labels) == (["hi"], [1])


def test_jsonl_with_a_bom_reads_its_first_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "hi", "label": 1}\n', encoding="utf-8-sig")
    assert load_data(str(path))["train"].texts == ["hi"]


def test_read_texts_with_a_bom_reads_the_first_text_without_it(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("first\nsecond\n", encoding="utf-8-sig")
    assert read_texts(path) == ["first", "second"]


def test_read_texts_csv_with_a_bom_finds_the_text_column(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("text,id\nfirst,1\n", encoding="utf-8-sig")
    assert read_texts(path) == ["first"]


# --- reading files: line endings ('\r\n' reads as '\n'; a lone '\r' is text in .txt/JSONL, a row end in CSV) ---


def test_tweeteval_folder_splits_only_on_newline(tmp_path):
    # '\r' and U+2028 inside a tweet must not start a new row (str.splitlines would split there).
    folder = write_tweeteval(tmp_path, {"test": ("one\rstill one\nsecond\u2028line\n", "0\n1\n")})
    split = load_data(str(folder))["test"]
    assert split.texts == ["one\rstill one", "second\u2028line"]
    assert split.labels == [0, 1]


def test_tweeteval_mixed_line_endings_keep_text_and_labels_aligned(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("first\r\nsecond\nthird\r\n", "2\n0\r\n1")})
    split = load_data(str(folder))["train"]
    assert split.texts == ["first", "second", "third"]
    assert split.labels == [2, 0, 1]


def test_tweeteval_crlf_error_line_numbers_match_an_editor(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\r\nb\r\nc\r\n", "0\r\n1\r\n5\r\n")})
    with pytest.raises(UserError, match=r"train_labels\.txt:3: unknown label '5'"):
        load_data(str(folder))


def test_tweeteval_file_with_lone_cr_line_endings_says_how_to_fix_it(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\rb\rc\r", "0\n1\n2\n")})
    expected = r"train_text\.txt holds lone \\r characters: if they end lines, save it with \\n line endings$"
    with pytest.raises(UserError, match=expected):
        load_data(str(folder))


def test_mapping_with_crlf_is_accepted(tmp_path):
    mapping = MAPPING.replace("\n", "\r\n")
    folder = write_tweeteval(tmp_path, {"test": ("ok\n", "2\n")}, mapping=mapping)
    assert load_data(str(folder))["test"].labels == [2]


def test_csv_crlf_reads_like_lf_even_inside_quoted_texts(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'text,label\r\n"two\r\nlines",1\r\nplain,2\nlast,0\r\n')
    split = load_data(str(path))["train"]
    assert split.texts == ["two\nlines", "plain", "last"]
    assert split.labels == [1, 2, 0]


def test_csv_lone_cr_ends_a_row_outside_quotes_and_stays_inside_them(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'text,label\rfirst,0\rsecond,2\n"kept\rinside",1\n')
    split = load_data(str(path))["train"]
    assert split.texts == ["first", "second", "kept\rinside"]
    assert split.labels == [0, 2, 1]


def test_jsonl_crlf_reads_like_lf(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a", "label": 0}\r\n{"text": "b", "label": 2}\n{"text": "c", "label": 1}\r\n')
    split = load_data(str(path))["train"]
    assert (split.texts, split.labels) == (["a", "b", "c"], [0, 2, 1])


def test_read_texts_crlf_txt_has_no_stray_cr(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"first\r\nsecond\nthird\r\n")
    assert read_texts(path) == ["first", "second", "third"]


# --- reading files: prediction input, the texts `doratweet predict --input FILE` labels ---------------------


def test_read_texts_from_txt_strips_each_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(" first \nsecond\rpart\n")
    assert read_texts(path) == ["first", "second\rpart"]


def test_read_texts_blank_line_is_an_empty_text(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("first\n\nthird\n")
    assert read_texts(path) == ["first", "", "third"]


def test_read_texts_from_csv(tmp_path):
    path = write_csv(tmp_path / "in.csv", "id,text\n1, hi \n2,there\n")
    assert read_texts(path) == ["hi", "there"]


def test_read_texts_from_jsonl_with_custom_column(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"tweet": "a"}, {"tweet": "b"}])
    assert read_texts(path, text_column="tweet") == ["a", "b"]


def test_read_texts_from_parquet(tmp_path):
    path = tmp_path / "in.parquet"
    pd.DataFrame({"text": ["x", "y"]}).to_parquet(path)
    assert read_texts(str(path)) == ["x", "y"]


def test_read_texts_empty_csv_cell_is_an_empty_text(tmp_path):
    path = write_csv(tmp_path / "in.csv", "id,text\n1,hi\n2,  \n")
    assert read_texts(path) == ["hi", ""]


def test_read_texts_rejects_a_one_megabyte_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(f"short\n{'q' * 1_000_000}\n")
    with pytest.raises(UserError, match=r"in\.txt:2: text is 1,000,000 characters, .*; shorten it or remove that row$"):
        read_texts(path)
