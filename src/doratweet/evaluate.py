"""Label scoring, generation + parsing, and metrics.

`score` mode asks the model how likely each label's full answer is after the prompt (never unparseable);
`generate` mode lets it answer freely and reads the first label word in what it wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import LABELS
from .errors import UserError
from .prompts import PromptFormat

UNPARSED = len(LABELS)  # the label id given to generated answers that name no label
_LABEL_WORD = re.compile(r"\b(" + "|".join(LABELS) + r")\b", re.IGNORECASE)


@dataclass
class Predictions:
    mode: str  # "score" | "generate"
    labels: np.ndarray  # [n] ids 0..2, or UNPARSED in generate mode
    probabilities: np.ndarray | None  # [n, 3] in score mode
    answers: list[str] | None  # raw generated text in generate mode


def split_model(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the vocabulary projection, so the projection runs only where needed."""
    return model.get_decoder(), model.get_output_embeddings()


def batches_by_length(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first), so padding is small and memory peaks early."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding (so every prompt ends at the last column), the mask, and positions that skip the pads."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def common_prefix(fmt: PromptFormat, sequences: list[list[int]]) -> list[int]:
    """The shared prompt prefix when every sequence starts with it (and goes on after it), else []."""
    prefix = fmt.shared_prefix_ids()
    n = len(prefix)
    if all(len(s) > n and s[:n] == prefix for s in sequences):
        return prefix
    return []


def prefix_cache(decoder, prefix: list[int], batch: int, device):
    """Keys/values of the shared prefix, computed once and repeated for the batch (differentiably, so in
    training the gradients of all tweets flow back into the one prefix computation)."""
    if not prefix:
        return None
    cache = decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
    cache.batch_repeat_interleave(batch)
    return cache


@torch.no_grad()
def score_labels(
    model, fmt: PromptFormat, prompts: list[list[int]], batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Log-likelihood of each label's full answer (label tokens + end-of-turn) after each prompt: [n, 3].

    The prompt runs once; its KV cache is then repeated for the three answers, so scoring costs little
    more than one forward pass over the prompt, and the vocabulary projection runs only at answer positions.
    """
    decoder, head = split_model(model)
    device = next(model.parameters()).device
    answers = fmt.answer_ids
    n_labels = len(answers)
    # Answer inputs (all but the last token) and the tokens they predict, padded to one width.
    width = max(len(a) for a in answers) - 1
    cont_ids = torch.tensor([a[:-1] + [0] * (width - len(a) + 1) for a in answers], device=device)
    cont_targets = torch.tensor([a[1:] + [0] * (width - len(a) + 1) for a in answers], device=device)
    cont_mask = torch.tensor([[1] * (len(a) - 1) + [0] * (width - len(a) + 1) for a in answers], device=device)
    first_tokens = torch.tensor([a[0] for a in answers], device=device)

    prefix = common_prefix(fmt, prompts)
    rests = [p[len(prefix) :] for p in prompts]
    scores = np.zeros((len(prompts), n_labels), dtype=np.float64)
    batches = batches_by_length(rests, batch_size)
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        # [shared prefix][left padding][rest of the prompt]: pads sit between the two and are masked out.
        ids, rest_mask, rest_positions = left_pad([rests[i] for i in batch], fmt.tokenizer.pad_token_id, device)
        cache = prefix_cache(decoder, prefix, len(batch), device)
        mask = torch.cat([torch.ones(len(batch), len(prefix), dtype=torch.long, device=device), rest_mask], dim=1)
        positions = rest_positions + len(prefix)
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=width > 0 or cache is not None)
        logp_first = torch.log_softmax(head(out.last_hidden_state[:, -1]).float(), dim=-1)
        batch_scores = logp_first[:, first_tokens]  # [B, labels]
        if width > 0:
            b = len(batch)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_labels)
            rows_mask = torch.cat([mask.repeat_interleave(n_labels, 0), cont_mask.repeat(b, 1)], dim=1)
            rows_pos = positions[:, -1:].repeat_interleave(n_labels, 0) + 1 + torch.arange(width, device=device)
            hidden = decoder(
                input_ids=cont_ids.repeat(b, 1), attention_mask=rows_mask, position_ids=rows_pos, past_key_values=cache
            ).last_hidden_state
            logp = torch.log_softmax(head(hidden).float(), dim=-1)  # [B*labels, width, V]
            token_logp = logp.gather(-1, cont_targets.repeat(b, 1).unsqueeze(-1)).squeeze(-1)
            rest = (token_logp * cont_mask.repeat(b, 1)).sum(-1).view(b, n_labels)
            batch_scores = batch_scores + rest
        scores[batch] = batch_scores.double().cpu().numpy()
    broken = int((~np.isfinite(scores)).any(axis=1).sum())
    if broken:  # fp16 (and, rarely, bf16) activations can overflow; a NaN label would be silently wrong
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        raise UserError(f"scoring: {broken} of {len(prompts)} tweets got non-finite scores with {dtype} weights "
                        "(a numerical overflow); use --precision fp32")
    return scores


def probabilities_from_scores(scores: np.ndarray) -> np.ndarray:
    """Softmax over the labels' answer log-likelihoods."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


@torch.no_grad()
def generate_answers(
    model, fmt: PromptFormat, prompts: list[list[int]], batch_size: int = 32, max_new_tokens: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy answers, stopping at the template's end-of-turn token as well as the model's EOS."""
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    batches = batches_by_length(prompts, batch_size)
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress, leave=False):
        ids, mask, _ = left_pad([prompts[i] for i in batch], fmt.tokenizer.pad_token_id, device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=fmt.stop_ids(), pad_token_id=fmt.tokenizer.pad_token_id,
            temperature=None, top_p=None, top_k=None,
        )
        for row, i in enumerate(batch):
            answers[i] = fmt.tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True)
    return answers


def parse_label(answer: str) -> int:
    """The first label word in a generated answer, or UNPARSED when it names none."""
    match = _LABEL_WORD.search(answer)
    return LABELS.index(match.group(1).lower()) if match else UNPARSED


def predict(
    model, fmt: PromptFormat, texts: list[str], mode: str = "score", batch_size: int = 32, progress: bool = False
) -> Predictions:
    prompts = fmt.prompt_ids(texts)
    if mode == "score":
        probabilities = probabilities_from_scores(score_labels(model, fmt, prompts, batch_size, progress))
        return Predictions("score", probabilities.argmax(axis=1), probabilities, None)
    if mode == "generate":
        answers = generate_answers(model, fmt, prompts, batch_size, progress=progress)
        return Predictions("generate", np.array([parse_label(a) for a in answers]), None, answers)
    raise ValueError(f"unknown mode {mode!r}")


def classification_metrics(y_true, y_pred) -> dict:
    """Macro-F1 and macro-recall over the 3 classes (unparsed counts as wrong), accuracy, per-class figures,
    the confusion matrix (rows true, columns predicted, plus an `unparsed` column), and the course's
    4-class macro-F1 in which `unparsed` is a 4th class (whose F1 is 0 as no tweet truly has it)."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    k = len(LABELS)
    confusion = np.zeros((k, k + 1), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_counts = confusion.sum(axis=1)
    predicted_counts = confusion[:, :k].sum(axis=0)
    hits = np.diag(confusion[:, :k])
    precision = np.divide(hits, predicted_counts, out=np.zeros(k), where=predicted_counts > 0)
    recall = np.divide(hits, true_counts, out=np.zeros(k), where=true_counts > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {
        "n": int(len(y_true)),
        "macro_f1": float(f1.mean()),
        "macro_recall": float(recall.mean()),
        "accuracy": float(hits.sum() / max(len(y_true), 1)),
        "unparsed": int(confusion[:, k].sum()),
        "macro_f1_4class": float(f1.sum() / (k + 1)),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(true_counts[i])}
            for i, label in enumerate(LABELS)
        },
        "confusion": confusion.tolist(),
        "confusion_columns": list(LABELS) + ["unparsed"],
    }
