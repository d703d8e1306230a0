"""The one rule for a text to label, on every path: `predict` arguments, stdin and --input files (streamed to
--output or printed), the Python API (`SentimentClassifier.predict`) and the server (`POST /v1/classify`).

A text to label is a string. Whitespace around it is stripped before the model sees it (training strips
its texts too), and what is left may be at most MAX_TEXT_CHARS characters. An empty or whitespace-only text
is labelled like any other, so that every input row gets its output row. Not a text: a missing value (null,
NaN), anything that is not a string, a string holding a lone surrogate (half of a UTF-16 pair, which no
file and no tokenizer can hold). Each path names the row, argument or index of a text it refuses.
"""

from __future__ import annotations

import math

# A tweet has at most 280 characters. A text far longer is a broken row (an unclosed quote, a document
# pasted into one cell) and would become one giant sequence for the model.
MAX_TEXT_CHARS = 5_000


def text_problem(value: object) -> str | None:
    """Why `value` cannot be labelled, or None when it can; the caller adds where it came from."""
    if not isinstance(value, str):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "no text (null)"
        return f"not a string but {type(value).__name__}"
    length = len(value.strip())
    if length > MAX_TEXT_CHARS:
        return f"text is {length:,} characters, over the {MAX_TEXT_CHARS:,} allowed (a tweet has at most 280)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"text holds a lone surrogate (U+{ord(value[error.start]):04X}), which is not a character"
    return None


def checked_texts(texts) -> list[str]:
    """The texts of a Python API call, stripped; TypeError or ValueError naming the index of the first bad one."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts must be a list of strings, not a {type(texts).__name__}; pass [text] for one text")
    cleaned = []
    for index, text in enumerate(texts):
        problem = text_problem(text)
        if problem:
            raise (ValueError if isinstance(text, str) else TypeError)(f"texts[{index}]: {problem}")
        cleaned.append(text.strip())
    return cleaned
