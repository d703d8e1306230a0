"""data.py: every --data source becomes validated (text, label) splits; user mistakes are one-line errors."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from doratweet.data import DEFAULT_DATA, Split, load_data, load_split, read_texts, resolve_data_spec
from doratweet.errors import UserError

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


# --- the official TweetEval folder layout --------------------------------------------------------------


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


def test_tweeteval_folder_splits_only_on_newline(tmp_path):
    # '\r' and U+2028 inside a tweet must not start a new row (str.splitlines would split there).
    folder = write_tweeteval(tmp_path, {"test": ("one\rstill one\nsecond\u2028line\n", "0\n1\n")})
    split = load_data(str(folder))["test"]
    assert split.texts == ["one\rstill one", "second\u2028line"]
    assert split.labels == [0, 1]


def test_tweeteval_folder_with_only_some_splits_has_only_those(tmp_path):
    folder = write_tweeteval(tmp_path, {"test": ("fine\n", "2\n")}, mapping=None)
    assert list(load_data(str(folder))) == ["test"]


def test_tweeteval_count_mismatch_names_both_files_and_counts(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\nc\n", "0\n1\n")})
    with pytest.raises(UserError, match=r"train_text\.txt has 3 lines but .*train_labels\.txt has 2"):
        load_data(str(folder))


def test_tweeteval_label_out_of_range_names_file_and_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"train": ("a\nb\n", "0\n7\n")})
    with pytest.raises(UserError, match=r"train_labels\.txt:2: unknown label '7'"):
        load_data(str(folder))


def test_tweeteval_blank_tweet_names_file_and_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"val": ("ok\n   \n", "0\n1\n")})
    with pytest.raises(UserError, match=r"val_text\.txt:2: empty text"):
        load_data(str(folder))


def test_tweeteval_undecodable_bytes_name_file_and_line(tmp_path):
    folder = write_tweeteval(tmp_path, {"test": ("ok\nok\n", "0\n1\n")})
    (folder / "test_text.txt").write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"test_text\.txt:2: not valid UTF-8 \(byte 0xe9\)"):
        load_data(str(folder))


def test_tweeteval_mapping_must_be_negative_neutral_positive(tmp_path):
    folder = write_tweeteval(tmp_path, {"test": ("ok\n", "0\n")}, mapping="0\tanger\n1\tjoy\n")
    with pytest.raises(UserError, match=r"mapping\.txt: maps 0 anger, 1 joy"):
        load_data(str(folder))


def test_tweeteval_text_file_without_labels_file_is_an_error(tmp_path):
    (tmp_path / "train_text.txt").write_text("a\n")
    with pytest.raises(UserError, match=r"train_text\.txt has no partner train_labels\.txt"):
        load_data(str(tmp_path))


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


# --- single csv / jsonl / parquet files ----------------------------------------------------------------


def test_csv_with_label_ids(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\n great ,2\n\"so, so\",1\n")
    splits = load_data(str(path))
    assert list(splits) == ["train"]
    assert splits["train"].texts == ["great", "so, so"]
    assert splits["train"].labels == [2, 1]
    assert splits["train"].source == str(path)


def test_csv_with_label_names_in_any_case(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nawful,Negative\nok, NEUTRAL \nyay,positive\n")
    assert load_data(str(path))["train"].labels == [0, 1, 2]


def test_csv_keeps_text_that_pandas_would_read_as_missing(tmp_path):
    path = write_csv(tmp_path / "test.csv", "text,label\nNA,1\nnull,0\n")
    assert load_data(str(path))["test"].texts == ["NA", "null"]


def test_jsonl_with_label_ids(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"text": "meh", "label": 1}, {"text": "yay", "label": "2"}])
    split = load_data(str(path))["validation"]
    assert split.texts == ["meh", "yay"]
    assert split.labels == [1, 2]


def test_jsonl_with_label_names(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"text": "boo", "label": "negative"}])
    assert load_data(str(path))["test"].labels == [0]


def test_json_suffix_is_read_as_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "test.json", [{"text": "boo", "label": 0}])
    assert load_data(str(path))["test"].texts == ["boo"]


def test_parquet_with_label_ids(tmp_path):
    path = tmp_path / "val.parquet"
    pd.DataFrame({"text": [" up ", "down"], "label": [2, 0]}).to_parquet(path)
    split = load_data(str(path))["validation"]
    assert split.texts == ["up", "down"]
    assert split.labels == [2, 0]


def test_parquet_with_label_names(tmp_path):
    path = tmp_path / "test.parquet"
    pd.DataFrame({"text": ["up", "flat"], "label": ["positive", "neutral"]}).to_parquet(path)
    assert load_data(str(path))["test"].labels == [2, 1]


def test_custom_column_names(tmp_path):
    path = write_csv(tmp_path / "test.csv", "tweet,sentiment\nhello,neutral\n")
    split = load_data(str(path), text_column="tweet", label_column="sentiment")["test"]
    assert (split.texts, split.labels) == (["hello"], [1])


def test_single_file_with_other_stem_becomes_the_test_split(tmp_path):
    path = write_csv(tmp_path / "my_tweets.csv", "text,label\nhi,1\n")
    assert list(load_data(str(path))) == ["test"]


# --- folders of split files and split=path mappings ----------------------------------------------------


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


# --- choosing the source -------------------------------------------------------------------------------


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


# --- user errors ---------------------------------------------------------------------------------------


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"--data .*nope\.csv: no such file or folder"):
        load_data(str(tmp_path / "nope.csv"))


def test_missing_path_from_env_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DORATWEET_DATA", str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"^DORATWEET_DATA .*gone: no such file or folder"):
        load_data()


def test_unsupported_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "train.xlsx"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"unsupported file type '\.xlsx'; use \.csv, \.jsonl, \.json, \.parquet"):
        load_data(str(path))


def test_missing_text_column_lists_available_columns_and_option(tmp_path):
    path = write_csv(tmp_path / "train.csv", "tweet,label\nhi,0\n")
    expected = r"no column 'text' \(columns: 'tweet', 'label'\); choose one with --text-column"
    with pytest.raises(UserError, match=expected):
        load_data(str(path))


def test_missing_label_column_names_the_label_option(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "hi", "y": 0}])
    with pytest.raises(UserError, match=r"no column 'label' \(columns: 'text', 'y'\); choose one with --label-column"):
        load_data(str(path))


def test_unknown_label_shows_value_line_and_accepted_labels(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nok,1\nhmm,meh\n")
    expected = r"train\.csv:3: unknown label 'meh'; accepted: 0, 1, 2, negative, neutral, positive"
    with pytest.raises(UserError, match=expected):
        load_data(str(path))


def test_empty_csv_text_names_the_line(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nok,1\n  ,2\n")
    with pytest.raises(UserError, match=r"train\.csv:3: empty text"):
        load_data(str(path))


def test_null_parquet_text_names_the_row(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["ok", None], "label": [1, 2]}).to_parquet(path)
    with pytest.raises(UserError, match=r"train\.parquet row 2: empty text"):
        load_data(str(path))


def test_undecodable_csv_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nok,1\n\xff\xfe,2\n")
    with pytest.raises(UserError, match=r"train\.csv:3: not valid UTF-8"):
        load_data(str(path))


def test_csv_row_with_an_unquoted_comma_is_an_error(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nwell, ok,1\n")
    with pytest.raises(UserError, match=r"train\.csv:2: more fields than the header"):
        load_data(str(path))


def test_malformed_json_line_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n{"text": "broken", \n')
    with pytest.raises(UserError, match=r"train\.jsonl:2: malformed JSON"):
        load_data(str(path))


def test_errors_are_one_line(tmp_path):
    path = write_csv(tmp_path / "train.csv", "text,label\nhmm,meh\n")
    with pytest.raises(UserError) as raised:
        load_data(str(path))
    assert "\n" not in str(raised.value)


# --- skip_bad_rows -------------------------------------------------------------------------------------


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


def test_no_warning_when_nothing_is_skipped(tmp_path, caplog):
    path = write_csv(tmp_path / "train.csv", "text,label\nok,1\n")
    with caplog.at_level(logging.WARNING, logger="doratweet.data"):
        load_data(str(path), skip_bad_rows=True)
    assert caplog.records == []


# --- the Hugging Face Hub (never the network: load_dataset is replaced) ---------------------------------


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


# --- read_texts (prediction input) ---------------------------------------------------------------------


def test_read_texts_from_txt_strips_each_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(" first \nsecond\rpart\n")
    assert read_texts(path) == ["first", "second\rpart"]


def test_read_texts_blank_line_is_an_error(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("first\n\nthird\n")
    with pytest.raises(UserError, match=r"in\.txt:2: blank line"):
        read_texts(path)


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


def test_read_texts_missing_column_lists_available(tmp_path):
    path = write_csv(tmp_path / "in.csv", "tweet\nhi\n")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: 'tweet'\); choose one with --text-column"):
        read_texts(path)


def test_read_texts_missing_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"missing\.txt: no such file"):
        read_texts(tmp_path / "missing.txt")

