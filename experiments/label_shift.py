"""Label-shift experiment (issue 5): can prior correction of the scored probabilities close TweetEval's
train/test class shift (train 15/45/39 % neg/neu/pos, test 32/48/19 %)? Result: no (docs/experiments.md, run 5).

1. `python experiments/label_shift.py score`    scored probabilities of the shipped adapter on validation and test
2. `python experiments/label_shift.py choose`   the method, chosen on validation only: resample held-out halves of
                                                validation to 500 random class priors and compare methods
3. `python experiments/label_shift.py test`     the chosen method, read once on the test split
"""

import sys

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, f1_score, recall_score

DATA = "../shared/data/tweeteval/sentiment"
OUT = "runs/label_shift"


def adapt_to_label_shift(probabilities: np.ndarray, train_prior: np.ndarray, max_iterations: int = 1000,
                         tolerance: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Re-weight scored probabilities for a new set of tweets whose class balance differs from training's.

    The EM procedure of Saerens, Latinne & Decaestecker (2002, "Adjusting the outputs of a classifier to new a
    priori probabilities"): the new prior is estimated from the unlabelled tweets alone (their mean adjusted
    probability), and each probability is multiplied by new/train prior and renormalised, until the prior settles.
    Returns the adjusted probabilities [n, labels] and the estimated prior [labels]. No label is used.
    """
    train_prior = np.asarray(train_prior, dtype=np.float64)
    prior = train_prior.copy()
    for _ in range(max_iterations):
        weighted = probabilities * (prior / train_prior)
        adjusted = weighted / weighted.sum(axis=1, keepdims=True)
        new_prior = adjusted.mean(axis=0)
        if np.abs(new_prior - prior).max() < tolerance:
            break
        prior = new_prior
    return adjusted, new_prior


def fit_calibration(logp: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Bias-corrected temperature scaling: p' proportional to exp(log p / T + b), b[0] = 0, by NLL."""
    def nll(theta):
        return -log_softmax(logp / theta[0] + np.r_[0, theta[1:]], axis=1)[np.arange(len(labels)), labels].mean()
    return minimize(nll, np.r_[1.0, 0, 0], method="Nelder-Mead").x


def calibrated(theta: np.ndarray, logp: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logp / theta[0] + np.r_[0, theta[1:]], axis=1))


def macro_f1(labels, probabilities) -> float:
    return f1_score(labels, probabilities.argmax(1), average="macro")


def score() -> None:
    from pathlib import Path

    from doratweet.data import load_split
    from doratweet.evaluate import predict
    from doratweet.predict import SentimentClassifier

    Path(OUT).mkdir(parents=True, exist_ok=True)
    classifier = SentimentClassifier.load()
    for split in ("validation", "test"):
        tweets = load_split(DATA, split)
        probabilities = predict(classifier.model, classifier.prompt_format, tweets.texts, "score", 32).probabilities
        np.save(f"{OUT}/{split}_probs.npy", probabilities)
        np.save(f"{OUT}/{split}_labels.npy", np.array(tweets.labels))


def choose() -> None:
    p, y = np.load(f"{OUT}/validation_probs.npy"), np.load(f"{OUT}/validation_labels.npy")
    logp = np.log(np.clip(p, 1e-12, 1))
    rng = np.random.default_rng(0)
    results = {"raw": [], "em": [], "calibrated": [], "calibrated+em": []}
    for split_seed in range(5):
        order = np.random.default_rng(100 + split_seed).permutation(len(y))
        fit, held = order[:1000], order[1000:]
        theta = fit_calibration(logp[fit], y[fit])
        fit_prior = np.bincount(y[fit], minlength=3) / len(fit)
        for _ in range(100):
            prior = rng.dirichlet([2, 2, 2])
            idx = np.concatenate([rng.choice(held[y[held] == k], size=int(round(1000 * prior[k])), replace=True)
                                  for k in range(3)])
            raw, cal = p[idx], calibrated(theta, logp[idx])
            results["raw"].append(macro_f1(y[idx], raw))
            results["em"].append(macro_f1(y[idx], adapt_to_label_shift(raw, fit_prior)[0]))
            results["calibrated"].append(macro_f1(y[idx], cal))
            results["calibrated+em"].append(macro_f1(y[idx], adapt_to_label_shift(cal, fit_prior)[0]))
    base = np.array(results["raw"])
    for name, values in results.items():
        values = np.array(values)
        print(f"{name:14s} mean macro-F1 {values.mean():.4f}  vs raw {np.mean(values - base):+.4f}  "
              f"better in {(values > base).mean():.0%}")


def test() -> None:
    pv, yv = np.load(f"{OUT}/validation_probs.npy"), np.load(f"{OUT}/validation_labels.npy")
    pt, yt = np.load(f"{OUT}/test_probs.npy"), np.load(f"{OUT}/test_labels.npy")
    theta = fit_calibration(np.log(np.clip(pv, 1e-12, 1)), yv)
    adapted, prior = adapt_to_label_shift(calibrated(theta, np.log(np.clip(pt, 1e-12, 1))),
                                          np.bincount(yv, minlength=3) / len(yv))
    print("calibration", theta.round(4), "estimated test prior", prior.round(3))
    for name, p in (("scored (as shipped)", pt), ("calibrated + EM prior", adapted)):
        yhat = p.argmax(1)
        print(f"{name:24s} macro-F1 {f1_score(yt, yhat, average='macro'):.4f}  "
              f"macro-recall {recall_score(yt, yhat, average='macro'):.4f}  accuracy {accuracy_score(yt, yhat):.4f}")


if __name__ == "__main__":
    {"score": score, "choose": choose, "test": test}[sys.argv[1]]()
