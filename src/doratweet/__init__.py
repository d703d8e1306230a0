"""doratweet: fine-tune small chat LLMs with DoRA to classify tweet sentiment."""

__version__ = "0.1.0"

LABELS = ("negative", "neutral", "positive")


def __getattr__(name):
    # Imported lazily so `import doratweet` (and the CLI's start) stays fast.
    if name == "SentimentClassifier":
        from .predict import SentimentClassifier

        return SentimentClassifier
    raise AttributeError(f"module 'doratweet' has no attribute {name!r}")
