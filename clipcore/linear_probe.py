"""Linear probe on frozen image features: the CLIP paper's protocol.

L2-regularised multinomial logistic regression (L-BFGS) on frozen features; the regularisation
strength is swept on a held-out validation slice of the training set, then the classifier is
refit on the whole training set with the best value and scored on the test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipcore.metrics import require_finite

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))


@dataclass
class ProbeResult:
    top1: float
    mean_per_class_recall: float
    best_c: float
    val_top1: float
    num_train: int
    num_test: int
    sweep: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def _balanced(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    classes = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes]))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    c_grid: tuple[float, ...] = DEFAULT_C_GRID,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> ProbeResult:
    """Sweep C on a validation split of the training features, refit, and score on test."""
    if len(train_x) < 2 or len(test_x) < 1:
        raise ValueError(f"linear probe needs >=2 train and >=1 test features, got {len(train_x)}/{len(test_x)}")
    require_finite("linear probe train features", train_x)
    require_finite("linear probe test features", test_x)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature sizes differ: train {train_x.shape[1]}, test {test_x.shape[1]}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_x))
    n_val = max(1, int(round(len(order) * val_fraction)))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    sweep = {}
    for c in c_grid:
        clf = _fit(train_x[fit_idx], train_y[fit_idx], c, max_iter)
        sweep[f"{c:g}"] = float((clf.predict(train_x[val_idx]) == train_y[val_idx]).mean())
    best_key = max(sweep, key=lambda k: (sweep[k], -abs(np.log10(float(k)))))
    best_c = float(best_key)
    pred = _fit(train_x, train_y, best_c, max_iter).predict(test_x)
    return ProbeResult(
        top1=float((pred == test_y).mean()),
        mean_per_class_recall=_balanced(test_y, pred),
        best_c=best_c,
        val_top1=sweep[best_key],
        num_train=len(train_x),
        num_test=len(test_x),
        sweep=sweep,
    )
