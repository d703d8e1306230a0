"""`SentimentClassifier`: the Python API for a trained adapter, and file-to-file prediction."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import LABELS
from .adapters import AdapterRecord, load_adapter, read_adapter_record
from .adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from .errors import UserError
from .evaluate import inference_model
from .evaluate import predict as predict_with_model
from .hardware import default_device
from .models import EMBEDDED_NAME, EMBEDDED_UPSTREAM_ID, load_base_model
from .prompts import DEFAULT_SYSTEM_PROMPT, make_prompt_format
from .run_folder import ADAPTER_DIR
from .texts import checked_texts


# The run folder (adapter, card, metrics, plots) that ships inside the package, so `doratweet predict "text"`
# and `doratweet serve` work right after installing, without training.
SHIPPED_RUN = Path(__file__).parent / "pretrained" / "smollm2-135m-tweeteval"
SHIPPED_ADAPTER = SHIPPED_RUN / ADAPTER_DIR


def adapter_folder(path: str | os.PathLike | None) -> Path:
    """Accept a run folder (with adapter/) or an adapter folder; None means the shipped adapter."""
    if path is None:
        if not (SHIPPED_ADAPTER / CONFIG_FILE).is_file():
            raise UserError("no adapter given and none ships with this install; pass --run or --adapter")
        return SHIPPED_ADAPTER
    path = Path(path)
    if (path / ADAPTER_DIR / CONFIG_FILE).is_file():
        return path / ADAPTER_DIR
    if (path / CONFIG_FILE).is_file():
        return path
    raise UserError(f"{path}: neither an adapter folder (adapter_config.json) nor a run folder (adapter/)")


class SentimentClassifier:
    """Labels tweets negative / neutral / positive with a base model and a trained adapter."""

    def __init__(self, model, prompt_format, base_model_id: str, batch_size: int = 32):
        self.model = model
        self.prompt_format = prompt_format
        self.base_model_id = base_model_id
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        *,
        model: str | None = None,
        device: str | torch.device | None = None,
        merge: bool = True,
        bf16: bool | None = None,
        trust_remote_code: bool = False,
    ) -> "SentimentClassifier":
        """`path` is a run folder or an adapter folder (default: the adapter shipped with doratweet);
        `model` overrides the base model it names.

        The adapter is merged into the weights by default: prediction then costs what the base model costs.
        Merged weights are bf16 where bf16 is fast (`bf16=None`), or as chosen.
        """
        folder = adapter_folder(path)
        record = read_adapter_record(folder)
        spec = model or base_model_spec(record)
        device = torch.device(device) if device else default_device()
        base = load_base_model(spec, device=device, trust_remote_code=trust_remote_code)
        load_adapter(base.model, folder)
        if merge:
            inference_model(base.model, device, bf16, copy=False)
        base.model.eval()
        system_prompt = DEFAULT_SYSTEM_PROMPT if record.notes.system_prompt is None else record.notes.system_prompt
        return cls(base.model, make_prompt_format(base.tokenizer, system_prompt), record.base_model_id or spec)

    def predict_proba(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """The probability of each label, for each text in order: `[{"negative": p, "neutral": p, "positive": p}]`.

        `texts` is a list (or any sequence) of strings; `[]` gives `[]`. A single string is a TypeError, not one
        text: iterating it would label each character, so pass `[text]`. The rule is the CLI's and the
        server's (doratweet/texts.py): whitespace around a text is stripped, an empty text is labelled like
        any other, an item that is not a string is a TypeError and a text over 5,000 characters a ValueError,
        each naming the index (`texts[2]: ...`).
        """
        texts = checked_texts(texts)
        if not texts:
            return []
        probabilities = predict_with_model(self.model, self.prompt_format, texts, "score", self.batch_size)
        return [dict(zip(LABELS, map(float, row))) for row in probabilities.probabilities]

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most probable label of each text, in order; `texts` as for `predict_proba`."""
        return [max(p, key=p.get) for p in self.predict_proba(texts)]


def adapter_sha256(folder: Path) -> str:
    """One hash of the files that decide an adapter's labels, so a resumed output can tell it is the same one."""
    hasher = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = Path(folder) / name
        hasher.update(f"{name}\0{path.stat().st_size if path.is_file() else -1}\0".encode())
        if path.is_file():
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
    return hasher.hexdigest()


def base_model_spec(record: AdapterRecord) -> str:
    """The model an adapter was trained on: the spec recorded at training time, else its base model id.
    An adapter for SmolLM2-135M-Instruct made by doratweet was trained on the embedded GGUF's weights."""
    spec = record.notes.model_spec or record.base_model_id
    if spec is None:
        raise UserError("the adapter's config names no base model; pass --model")
    if spec == EMBEDDED_UPSTREAM_ID and record.notes.model_spec == EMBEDDED_NAME:
        return EMBEDDED_NAME
    return spec


def read_prediction_input(path: str | None, texts: list[str], text_column: str = "text") -> list[str]:
    """Texts from arguments, a file (.txt one per line, .csv, .jsonl, .parquet) or stdin ('-' or nothing; one
    per line, as in a .txt file), each checked by the rule of texts.py and stripped, before any model loads."""
    from .batch_predict import iter_input_rows
    from .tables import decoded_lines

    if texts:
        return [_checked(f"TEXT {number}", text) for number, text in enumerate(texts, start=1)]
    if path and path != "-":
        found = [row.text for row in iter_input_rows(path, text_column, id_column=None)]
        if not found:
            raise UserError(f"--input {path}: no texts to classify; put one text per line (.txt) or one per row")
        return found
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("predict: give texts as arguments, --input FILE, or pipe them on stdin")
    raw = getattr(sys.stdin, "buffer", None)
    if raw is not None:  # the bytes, so stdin's encoding is checked as a file's is (UTF-16, not UTF-8 at line N)
        lines = [line.removesuffix("\n") for _, line in decoded_lines("<stdin>", io.BytesIO(raw.read()))]
    else:  # a text stream with no bytes under it (a program that replaced sys.stdin): already decoded
        lines = sys.stdin.read().split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line
    return [_checked(f"<stdin>:{number}", line) for number, line in enumerate(lines, start=1)]


def _checked(where: str, text: str) -> str:
    from .batch_predict import checked_text

    return checked_text(where, text, in_a_file=False)  # an argument or a line of stdin: fixed, not removed


def format_predictions(texts: list[str], probabilities: list[dict[str, float]], fmt: str) -> str:
    """Rows of text, label and the three probabilities as jsonl, csv or an aligned table, written as streamed
    rows are (tables.format_rows): CSV cells a spreadsheet would run as a formula are neutralised."""
    from .tables import format_rows, prediction_columns, prediction_row

    rows = [prediction_row(text, p) for text, p in zip(texts, probabilities)]
    return format_rows(rows, fmt, prediction_columns())
