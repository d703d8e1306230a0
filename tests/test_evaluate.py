"""Scoring is the exact answer likelihood; parsing and metrics match their definitions and scikit-learn."""

import numpy as np
import pytest
import torch
from helpers import TWEETS, build_tiny_model
from helpers import norms_in_the_models_dtype
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, recall_score

from doratweet.evaluate import UNPARSED, classification_metrics, parse_label, predict, score_labels
from doratweet.prompts import make_prompt_format


@pytest.mark.parametrize("arch, shared_prefix", [("llama", True), ("mistral", True), ("llama", False)])
def test_batched_scores_equal_full_sequence_log_likelihoods(arch, shared_prefix):
    """In float64: batching, padding, the prefix cache and the answer branches add in other orders than one
    full sequence does, ~1e-16 relative on any CPU; 1e-9 on log-probabilities of magnitude ~10 leaves 1e5 times
    that, while a position off by one or an answer token dropped changes a score by more than 1e-2."""
    model, tokenizer = build_tiny_model(arch, dtype=torch.float64)
    fmt = make_prompt_format(tokenizer)
    prompts = fmt.prompt_ids([t for t, _ in TWEETS])
    if not shared_prefix:  # prompts without the template's prefix: no prefix cache, the pass starts from scratch
        prompts = [p[len(fmt.shared_prefix_ids()) - 2 :] for p in prompts]
    with norms_in_the_models_dtype():
        scores = score_labels(model, fmt, prompts, batch_size=5)  # uneven lengths, padding, a partial batch
        for row, prompt in enumerate(prompts):
            for k, answer in enumerate(fmt.answer_ids):
                logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0], dim=-1)
                expected = sum(logp[len(prompt) - 1 + j, answer[j]].item() for j in range(len(answer)))
                assert scores[row, k] == pytest.approx(expected, abs=1e-9)


def test_score_mode_gives_probabilities_that_sum_to_one_and_never_unparsed():
    model, tokenizer = build_tiny_model()
    result = predict(model, make_prompt_format(tokenizer), [t for t, _ in TWEETS], "score")
    assert np.allclose(result.probabilities.sum(axis=1), 1.0)
    assert (result.labels == result.probabilities.argmax(axis=1)).all() and (result.labels < 3).all()


def test_generate_mode_counts_answers_without_a_label_as_unparsed():
    model, tokenizer = build_tiny_model()  # random weights: answers are junk, hence unparsed
    result = predict(model, make_prompt_format(tokenizer), [t for t, _ in TWEETS[:3]], "generate")
    assert len(result.answers) == 3
    assert all(y == parse_label(a) for y, a in zip(result.labels, result.answers))


@pytest.mark.parametrize("answer, expected", [
    ("positive", 2), ("Negative.", 0), (" neutral\n", 1), ("I think it is positive, not negative", 2),
    ("POSITIVE!", 2), ("positively", UNPARSED), ("", UNPARSED), ("no idea", UNPARSED),
])
def test_parse_label_takes_the_first_label_word(answer, expected):
    assert parse_label(answer) == expected


def test_metrics_equal_scikit_learn_including_unparsed_answers():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))  # some UNPARSED (3)
    m = classification_metrics(y_true, y_pred)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))
    assert m["macro_recall"] == pytest.approx(recall_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1_4class"] == pytest.approx(
        f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    for i, label in enumerate(["negative", "neutral", "positive"]):
        assert m["per_class"][label]["precision"] == pytest.approx(p[i])
        assert m["per_class"][label]["recall"] == pytest.approx(r[i])
        assert m["per_class"][label]["f1"] == pytest.approx(f[i])
        assert m["per_class"][label]["support"] == s[i]
    assert m["unparsed"] == int((y_pred == 3).sum())
    assert np.array(m["confusion"]).sum() == 200 and len(m["confusion"][0]) == 4


def test_metrics_of_a_known_small_case():
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, UNPARSED])
    assert m["accuracy"] == 0.5
    assert m["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert m["per_class"]["positive"]["f1"] == 0.0


def test_scores_that_overflow_in_half_precision_are_an_error_not_a_label():
    from doratweet.errors import UserError

    model, tokenizer = build_tiny_model()
    fmt = make_prompt_format(tokenizer)
    model = model.half()
    with torch.no_grad():  # weights large enough that fp16 activations pass 65,504
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(30)
    with pytest.raises(UserError, match=r"2 of 2 tweets got non-finite scores with float16 weights.*--precision fp32"):
        score_labels(model, fmt, fmt.prompt_ids(["hello there", "bad day"]))


def test_bf16_inference_keeps_the_output_head_in_fp32_and_both_modes_work():
    from doratweet.evaluate import inference_model

    model, tokenizer = build_tiny_model()
    fmt = make_prompt_format(tokenizer)
    texts = [t for t, _ in TWEETS]
    exact = score_labels(model, fmt, fmt.prompt_ids(texts))
    bf16 = inference_model(model, torch.device("cpu"), bf16=True)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    assert bf16.get_output_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32  # the original is left as it was
    hidden = torch.randn(4, 64).to(torch.bfloat16)
    logits = bf16.get_output_embeddings()(hidden)  # fp32 weights, fp32 arithmetic, on bf16 hidden states
    assert logits.dtype == torch.float32
    weight = model.get_output_embeddings().weight.detach()
    in_float64 = hidden.double() @ weight.double().T
    # fp32 rounding bound of a 64-term dot product, 64 * 2^-24 * sum|h w|, holds for any order of summation
    bound = 64 * 2.0**-24 * (hidden.double().abs() @ weight.double().abs().T)
    assert ((logits.double() - in_float64).abs() <= bound).all()
    scores = score_labels(bf16, fmt, fmt.prompt_ids(texts))
    # bf16 weights move a random model's scores by ~1e-2, which can swap two near-tied labels: at most 1 in 12
    assert (scores.argmax(axis=1) == exact.argmax(axis=1)).mean() >= 0.9
    assert len(predict(bf16, fmt, texts[:2], "generate").answers) == 2
