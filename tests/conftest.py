"""Fixtures: tiny offline models, data and a run folder the tests build themselves (tests/helpers.py); nothing
here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import TWEETS, build_tiny_model  # noqa: E402  (after the offline switches)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random LLaMA with a ChatML tokenizer, loadable by `--model PATH`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build_tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """TweetEval's official layout with a handful of tweets per split."""
    folder = tmp_path_factory.mktemp("tiny-tweeteval")
    (folder / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    for split, rows in (("train", TWEETS), ("val", TWEETS[:6]), ("test", TWEETS[6:])):
        (folder / f"{split}_text.txt").write_text("".join(t + "\n" for t, _ in rows))
        (folder / f"{split}_labels.txt").write_text("".join(f"{y}\n" for _, y in rows))
    return folder


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """A run folder made by `doratweet run` on the tiny model (2 steps): for tests of what uses a run."""
    from doratweet.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert main(["--quiet", "run", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
                 "--max-steps", "2", "--rank", "4", "--alpha", "8", "--batch-size", "4"]) == 0
    return out
