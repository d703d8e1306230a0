"""Label scoring, generation + parsing, and metrics.

`score` mode asks the model how likely each label's full answer is after the prompt (never unparseable);
`generate` mode lets it answer freely and reads the first label word in what it wrote.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import LABELS
from .errors import UserError
from .adapters import merge_adapters
from .hardware import bf16_is_fast, fp32_or_wider
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


def batch_copy(cache, batch: int):
    """A fresh cache holding `cache`'s keys/values repeated for a batch (the forward pass appends to it, so each batch
    needs its own); only for caches computed without gradients."""
    if cache is None:
        return None
    fresh = copy.deepcopy(cache)
    fresh.batch_repeat_interleave(batch)
    return fresh


@dataclass
class AnswerBranches:
    """The labels' answers laid out to follow a prompt in one forward pass: every answer's tokens but the last are
    appended after the prompt as a separate branch (same positions, attending to the prompt and to earlier tokens
    of the same answer only), so each token's log-probability is read where it is predicted."""

    first_tokens: torch.Tensor  # [labels] each answer's first token, predicted at the prompt's last position
    fed: torch.Tensor  # [S] tokens appended after the prompt, all branches one after another
    depth: torch.Tensor  # [S] position of each fed token within its answer (0 = right after the prompt)
    label: torch.Tensor  # [S] whose answer each fed token belongs to
    targets: torch.Tensor  # [S] the token each fed token predicts
    sees: torch.Tensor  # [S, S] fed token i may attend to fed token j (same answer, not later)

    @classmethod
    def of(cls, answers: list[list[int]], device) -> "AnswerBranches":
        fed = [(k, j, a[j], a[j + 1]) for k, a in enumerate(answers) for j in range(len(a) - 1)]
        label = torch.tensor([f[0] for f in fed], dtype=torch.long)
        depth = torch.tensor([f[1] for f in fed], dtype=torch.long)
        sees = (label[:, None] == label[None, :]) & (depth[:, None] >= depth[None, :])
        return cls(torch.tensor([a[0] for a in answers], device=device), torch.tensor([f[2] for f in fed], device=device,
                   dtype=torch.long), depth.to(device), label.to(device),
                   torch.tensor([f[3] for f in fed], device=device, dtype=torch.long), sees.to(device))


def branch_attention_mask(rest_mask: torch.Tensor, prefix_len: int, branches: AnswerBranches, dtype) -> torch.Tensor:
    """Additive [B, 1, R+S, P+R+S] mask for [shared prefix (cached)][left-padded prompt R][answer branches S]."""
    b, r = rest_mask.shape
    s = len(branches.fed)
    real = rest_mask.bool()
    allowed = torch.zeros(b, r + s, prefix_len + r + s, dtype=torch.bool, device=rest_mask.device)
    allowed[:, :, :prefix_len] = True
    causal = torch.ones(r, r, dtype=torch.bool, device=rest_mask.device).tril()
    allowed[:, :r, prefix_len : prefix_len + r] = causal & real[:, None, :]
    allowed[:, r:, prefix_len : prefix_len + r] = real[:, None, :]
    allowed[:, r:, prefix_len + r :] = branches.sees
    # A pad query attending to nothing would give NaN rows; let it see itself (its output is never read).
    allowed[:, :r, prefix_len : prefix_len + r] |= torch.eye(r, dtype=torch.bool, device=rest_mask.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=rest_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class ScoringBatch:
    """One batch of `score_labels`, laid out for a single forward pass of the transformer body after the cached
    shared prefix: [left padding][rest of the prompt][answer branches], with the mask and positions that make it
    equal to scoring each answer after each whole prompt."""

    rows: list[int]  # the batch's prompts, as indices into the prompts scored
    input_ids: torch.Tensor  # [B, R+S]
    attention_mask: torch.Tensor  # [B, 1, R+S, P+R+S] additive (P: the cached prefix's length)
    position_ids: torch.Tensor  # [B, R+S]
    prompt_width: int  # R: the last prompt token is at column R-1, the answer branches start at column R


def scoring_batches(fmt: PromptFormat, rests: list[list[int]], prefix_len: int, branches: AnswerBranches,
                    batch_size: int, dtype, device):
    """The batches of `score_labels` for the prompts' `rests` (each prompt without the shared prefix); also what
    other engines than torch (benchmarks/cpu_engines.py) feed their own copy of the body."""
    for batch in batches_by_length(rests, batch_size):
        ids, rest_mask, rest_positions = left_pad([rests[i] for i in batch], fmt.tokenizer.pad_token_id, device)
        b, r = ids.shape
        last = rest_positions[:, -1:] + prefix_len
        yield ScoringBatch(batch, torch.cat([ids, branches.fed.expand(b, -1)], dim=1),
                           branch_attention_mask(rest_mask, prefix_len, branches, dtype),
                           torch.cat([rest_positions + prefix_len, last + 1 + branches.depth], dim=1), r)


def answer_log_likelihoods(head, hidden: torch.Tensor, batch: ScoringBatch, branches: AnswerBranches) -> torch.Tensor:
    """[B, labels]: each answer's log-likelihood, read from the body's output for `batch`; the vocabulary
    projection runs only at the positions that predict an answer token."""
    b, r = hidden.shape[0], batch.prompt_width
    logp_first = torch.log_softmax(fp32_or_wider(head(hidden[:, r - 1])), dim=-1)  # [B, V]
    scores = logp_first[:, branches.first_tokens]  # [B, labels]
    if len(branches.fed):
        # 2-D input: a strided 3-D slice makes the projection a batched matmul over B copies of the head.
        fed_hidden = hidden[:, r:].reshape(-1, hidden.shape[-1])
        logp = torch.log_softmax(fp32_or_wider(head(fed_hidden)), dim=-1).view(b, -1, logp_first.shape[-1])  # [B, S, V]
        token_logp = logp.gather(-1, branches.targets.expand(b, -1).unsqueeze(-1)).squeeze(-1)  # [B, S]
        scores = scores.index_add(1, branches.label, token_logp)
    return scores


@torch.no_grad()
def score_labels(
    model, fmt: PromptFormat, prompts: list[list[int]], batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Log-likelihood of each label's full answer (label tokens + end-of-turn) after each prompt: [n, 3].

    One forward pass per batch: the shared system-prompt prefix comes from a cache computed once per call, the
    answers follow the prompt as branches (see `AnswerBranches`), and the vocabulary projection runs only at the
    positions that predict an answer token.
    """
    decoder, head = split_model(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    branches = AnswerBranches.of(fmt.answer_ids, device)
    prefix = common_prefix(fmt, prompts)
    prefix_keys_values = prefix_cache(decoder, prefix, 1, device)  # the same for every batch: computed once
    rests = [p[len(prefix) :] for p in prompts]
    scores = np.zeros((len(prompts), len(fmt.answer_ids)), dtype=np.float64)
    batches = scoring_batches(fmt, rests, len(prefix), branches, batch_size, dtype, device)
    total = -(-len(rests) // batch_size)
    for batch in tqdm(batches, total=total, desc="scoring", unit="batch", disable=not progress, leave=False):
        cache = batch_copy(prefix_keys_values, len(batch.rows))
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, past_key_values=cache,
                         use_cache=cache is not None).last_hidden_state
        scores[batch.rows] = answer_log_likelihoods(head, hidden, batch, branches).double().cpu().numpy()
    return finite_or_error(scores, model)


def finite_or_error(scores: np.ndarray, model) -> np.ndarray:
    broken = int((~np.isfinite(scores)).any(axis=1).sum())
    if broken:  # fp16 (and, rarely, bf16) activations can overflow; a NaN label would be silently wrong
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        raise UserError(f"scoring: {broken} of {len(scores)} tweets got non-finite scores with {dtype} weights "
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


def timed_predictions(model, fmt, split, mode: str, batch_size: int, progress: bool = True
                      ) -> tuple[Predictions, dict]:
    """Predictions for `split` in `mode`, and their metrics with the precision and speed they ran at."""
    started = time.perf_counter()
    predictions = predict(model, fmt, split.texts, mode, batch_size, progress=progress)
    seconds = time.perf_counter() - started
    metrics = classification_metrics(split.labels, predictions.labels)
    metrics.update(mode=mode, precision=str(next(model.parameters()).dtype).replace("torch.", ""), split=split.name,
                   seconds=round(seconds, 2), tweets_per_s=round(len(split) / max(seconds, 1e-9), 1))
    return predictions, metrics


# --- the model that evaluation runs ------------------------------------------------------------------------------

def inference_model(model, device: torch.device, bf16: bool | None = None, copy: bool = True):
    """The model for evaluation: adapters merged into the weights (no adapter cost per token), in bf16 where
    that is fast. bf16 weights beat bf16 autocast, which re-casts every weight on every call. `copy=True`
    leaves `model` as it is (training goes on with it); `copy=False` converts it in place, saving a copy."""
    if bf16 is None:  # an fp64 model was asked for exactness over speed (the tests compare runs with one)
        bf16 = bf16_is_fast(device) and next(model.parameters()).dtype != torch.float64
    merged = merge_adapters(_deepcopy(model) if copy else model).eval()
    if not bf16:
        return merged
    head = Float32Head(merged.get_output_embeddings().weight)
    merged.to(torch.bfloat16)
    merged.config.tie_word_embeddings = False  # the embeddings go bf16, the head keeps its own fp32 copy
    merged.set_output_embeddings(head)
    return merged


class Float32Head(torch.nn.Module):
    """The output projection in fp32 for a bf16 model. Label scores are differences of log-probabilities over a
    49k-word vocabulary; with bf16 head weights they moved enough to change 2.6% of the labels and macro-F1 by
    0.009 (quick adapter, 1,000 test tweets), with this head 0.6% and 0.0002. It costs one fp32 copy of the
    head and fp32 matmuls at the few positions scored or generated."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float().clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight)


_deepcopy = copy.deepcopy  # `inference_model`'s argument `copy` hides the module there
