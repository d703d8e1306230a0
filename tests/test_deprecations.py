"""doratweet calls no API its dependencies have deprecated: such a call breaks on the release that removes it.

pyproject's filterwarnings hides DeprecationWarning and FutureWarning from the other tests (third-party imports
raise them), so these tests set their own filter and keep only the warnings raised under doratweet's frames.
"""

from __future__ import annotations

import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from helpers import TWEETS, build_tiny_model

import doratweet
from doratweet.cli import main
from doratweet.data import Split
from doratweet.evaluate import predict
from doratweet.predict import SentimentClassifier
from doratweet.prompts import make_prompt_format
from doratweet.adapters import AdapterConfig
from doratweet.config import TrainConfig
from doratweet.train import train

PACKAGE = str(Path(doratweet.__file__).parent)


@contextmanager
def deprecations_raised_by_doratweet():
    """Yields the list of (category, message, where) of every DeprecationWarning and FutureWarning raised while a
    doratweet function was on the stack inside the block, however often it was raised before."""
    found: list[tuple[str, str, str]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, (DeprecationWarning, FutureWarning)):
            return
        ours = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
        if ours:
            found.append((category.__name__, str(message), f"{ours[-1].filename}:{ours[-1].lineno}"))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        yield found


def test_training_with_validation_calls_nothing_deprecated(tmp_path):
    model, tokenizer = build_tiny_model()
    train_split = Split("train", [t for t, _ in TWEETS], [y for _, y in TWEETS], "test")
    val_split = Split("validation", [t for t, _ in TWEETS[:6]], [y for _, y in TWEETS[:6]], "test")
    config = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.05), batch_size=4, max_steps=2, eval_every=1)
    with deprecations_raised_by_doratweet() as found:
        train(model, make_prompt_format(tokenizer), train_split, val_split, config, tmp_path / "run", progress=False)
    assert found == []


def test_scoring_and_generating_call_nothing_deprecated():
    model, tokenizer = build_tiny_model()
    fmt = make_prompt_format(tokenizer)
    texts = [t for t, _ in TWEETS[:5]]
    with deprecations_raised_by_doratweet() as found:
        predict(model, fmt, texts, "score", batch_size=2)
        predict(model, fmt, texts, "generate", batch_size=2)
    assert found == []


def test_the_run_command_and_the_python_api_call_nothing_deprecated(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    with deprecations_raised_by_doratweet() as found:
        assert main(["--quiet", "run", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out",
                     str(out), "--max-steps", "2", "--rank", "4", "--alpha", "8", "--batch-size", "4",
                     "--generate-limit", "2"]) == 0
        classifier = SentimentClassifier.load(out, model=str(tiny_model_dir))
        assert len(classifier.predict(["what a lovely day", "awful"])) == 2
    assert found == []
