"""doratweet: fine-tune small chat LLMs with DoRA to classify tweet sentiment."""

__version__ = "0.1.0"

LABELS = ("negative", "neutral", "positive")
