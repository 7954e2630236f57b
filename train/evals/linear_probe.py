"""Linear probe: a logistic regression on frozen image features, fit on train, scored on test.

Features are the image tower's embeddings, L2-normalised (clip_benchmark's `normalize=True`),
of every sample of the train split (`train_data`) and the test split (`data`): shards, a folder
in clip_benchmark's webdataset layout (`DIR/train/`, `DIR/test/`) or an image-folder tree
(`DIR/train/<class>/`, `DIR/test/<class>/`); with `train_data` unset, `data` must be such a folder
and its train split is used.

The regularisation is chosen as clip_benchmark's `linear_probe.evaluate` chooses its weight
decay: a held-out `val_proportion` of train (a random split), a coarse sweep of 7 values over a
97-point log grid, then a search around the best of step 8, 4, 2, 1 grid points, the first best
validation accuracy winning. Then the final probe is fit on train + validation (full) or on the
k-shot subset alone (few-shot: adding the validation samples would give it more than k per
class), and scored on test. Unlike clip_benchmark (AdamW on an `nn.Linear`, 10 epochs, CUDA
only), the probe is scikit-learn's `LogisticRegression` (L-BFGS, multinomial), as in CLIP's
paper (appendix A.3); the grid is over its inverse regularisation strength C from 1e-6 to 1e6.

k-shot: k samples per class drawn (seeded) from the train part; a class with fewer is an error,
as clip_benchmark refuses it. Metrics per setting: `linear_probe_top1` (full) and
`linear_probe_top1@{k}shot`, with `top5`, `mean_per_class_recall` and the chosen `C`.

Distributed: every rank featurises its share; the features are all-gathered and every rank fits
the same (deterministic) probe, so none waits on rank 0.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field, field_validator

from vlp.core.errors import ConfigError
from vlp.data_pipelines.errors import DataError
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.common import image_features
from vlp.train.evals.harness import EvalSource, resolve_eval_source

# clip_benchmark's sweep: 97 log-spaced values, 7 of them (every 16th) for the coarse pass.
GRID_POINTS, COARSE_EVERY = 97, 16


class LinearProbeConfig(EvalConfig):
    type: Literal["linear_probe"] = "linear_probe"
    # The train split; None: `data` is a folder with a train split (clip_benchmark / image folder).
    train_data: Optional[str] = None
    # Settings to report: -1 the full train split, k > 0 k samples per class.
    fewshot_k: list[int] = Field(default_factory=lambda: [-1])
    # Share of train held out to choose C (clip_benchmark's --val_proportion).
    val_proportion: float = Field(0.2, gt=0, lt=1)
    # The C grid: 97 log-spaced values in [10^c_min_log10, 10^c_max_log10].
    c_min_log10: float = -6.0
    c_max_log10: float = 6.0
    max_iter: int = Field(1000, ge=1)
    seed: int = 0
    normalize: bool = True
    prefix: str = "linear_probe_"

    @field_validator("fewshot_k")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value or any(k == 0 or k < -1 for k in value):
            raise ValueError("fewshot_k: -1 (the full train split) or positive shot counts, e.g. [-1, 1, 5]")
        return value


def fit_probe(features: np.ndarray, labels: np.ndarray, c_value: float, max_iter: int, seed: int) -> Any:
    """scikit-learn's multinomial logistic regression (L-BFGS) on (N, E) features, (N,) labels."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=c_value, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # At the grid's weakly regularised end L-BFGS may stop at max_iter; the sweep judges it
        # by its validation accuracy like any other point.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return probe.fit(features, labels)


def choose_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], grid: np.ndarray,
             max_iter: int, seed: int) -> float:
    """clip_benchmark's `find_peak` search over `grid` (97 values): the coarse 7, then around
    the best with step 8, 4, 2, 1; the first value with the best validation accuracy wins."""
    scored: dict[int, float] = {}

    def accuracy(index: int) -> float:
        if index not in scored:
            probe = fit_probe(*train, float(grid[index]), max_iter, seed)
            scored[index] = float((probe.predict(val[0]) == val[1]).mean())
        return scored[index]

    def peak(indices: list[int]) -> int:
        best, best_accuracy = indices[0], -1.0
        for index in indices:
            if accuracy(index) > best_accuracy:
                best, best_accuracy = index, accuracy(index)
        return best

    best = peak(list(range(0, len(grid), COARSE_EVERY)))
    step = COARSE_EVERY // 2
    while step > 0:
        best = peak([max(best - step, 0), best, min(best + step, len(grid) - 1)])
        step //= 2
    return float(grid[best])


def split_train(labels: np.ndarray, val_proportion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): a seeded random split, as clip_benchmark's
    `random_split(train, [1 - p, p])`."""
    order = np.random.default_rng(seed).permutation(len(labels))
    num_val = int(round(val_proportion * len(labels)))
    if num_val < 1 or num_val >= len(labels):
        raise DataError(f"linear_probe: {len(labels)} train samples cannot hold out val_proportion={val_proportion}")
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def k_shot(labels: np.ndarray, indices: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k indices per class from `indices`, drawn in a seeded random order (clip_benchmark's rule)."""
    chosen: dict[int, list[int]] = {}
    for index in np.random.default_rng(seed).permutation(indices):
        bucket = chosen.setdefault(int(labels[index]), [])
        if len(bucket) < k:
            bucket.append(int(index))
    short = {label: len(bucket) for label, bucket in chosen.items() if len(bucket) < k}
    if short:
        raise DataError(f"linear_probe: {k}-shot needs {k} train samples per class; classes {short} have fewer")
    return np.sort(np.concatenate([np.asarray(bucket) for bucket in chosen.values()]))


def linear_probe(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], config: LinearProbeConfig,
) -> dict[str, float]:
    """Every `fewshot_k` setting on (features (N, E), labels (N,)) of train and test -> metrics."""
    from sklearn.metrics import balanced_accuracy_score

    features, labels = train
    grid = np.logspace(config.c_min_log10, config.c_max_log10, GRID_POINTS)
    fit_part, val_part = split_train(labels, config.val_proportion, config.seed)
    results: dict[str, float] = {}
    for k in config.fewshot_k:
        subset = fit_part if k < 0 else k_shot(labels, fit_part, k, config.seed)
        c_value = choose_c((features[subset], labels[subset]), (features[val_part], labels[val_part]), grid,
                           config.max_iter, config.seed)
        final = np.sort(np.concatenate([subset, val_part])) if k < 0 else subset
        probe = fit_probe(features[final], labels[final], c_value, config.max_iter, config.seed)
        scores = probe.predict_proba(test[0])  # (N_test, C_seen): columns are probe.classes_
        ranked = probe.classes_[np.argsort(-scores, axis=1)]
        suffix = "" if k < 0 else f"@{k}shot"
        results[f"{config.prefix}top1{suffix}"] = float((ranked[:, 0] == test[1]).mean())
        if ranked.shape[1] >= 5:
            results[f"{config.prefix}top5{suffix}"] = float((ranked[:, :5] == test[1][:, None]).any(axis=1).mean())
        results[f"{config.prefix}mean_per_class_recall{suffix}"] = float(balanced_accuracy_score(test[1], ranked[:, 0]))
        results[f"{config.prefix}C{suffix}"] = c_value
    results[f"{config.prefix}train_samples"] = int(len(labels))
    results[f"{config.prefix}test_samples"] = int(len(test[1]))
    return results


def probe_sources(config: LinearProbeConfig) -> tuple[EvalSource, EvalSource]:
    """(train, test) sources of the config."""
    if config.data is None:
        raise ConfigError("linear_probe: needs `data` (the test split)")
    return resolve_eval_source(config.train_data or config.data, "train"), resolve_eval_source(config.data, "test")


@EVALUATORS.register_by_type
class LinearProbe(Evaluator):
    config_class = LinearProbeConfig
    config: LinearProbeConfig
    example = EvalExample(source="digits", build=(("shard_size", 200),), split="test",
                          options=(("batch_size", 64), ("train_data", "{dir}/digits-train-000000.tar")))

    def run(self, model: Any, context: EvalContext) -> dict[str, float]:
        """Two reads through the harness (`image_features`: train, then test), then the probe,
        the same on every rank."""
        train_source, test_source = probe_sources(self.config)
        if train_source.spec == test_source.spec:
            raise ConfigError(f"linear_probe: train and test are both {test_source.spec}; set `train_data`")
        splits = []
        for source in (train_source, test_source):
            features, labels, _ = image_features(model, source, context, batch_size=self.config.batch_size,
                                              workers=self.config.workers, normalize=self.config.normalize)
            if len(labels) == 0:
                raise DataError(f"linear_probe: {source.spec}: no samples")
            splits.append((features.double().numpy(), labels.numpy()))
        if train_source.classnames and test_source.classnames and train_source.classnames != test_source.classnames:
            raise DataError(f"linear_probe: train classes {train_source.classnames} differ from test's {test_source.classnames}")
        return linear_probe(splits[0], splits[1], self.config)
