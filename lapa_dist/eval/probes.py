"""Probes of whether latent actions carry the true action, each with its chance level (numpy only).

A pair (x_t, x_{t+H}) has a latent action (codes, int [s]), a true action over the same H steps (float [d]) and
the clip it comes from. Every random choice takes a numpy Generator.

Cluster purity: the true actions are quantised into ``bins`` bins by k-means on per-dimension z-scores; each
distinct latent action is a cluster, and purity is the fraction of pairs whose bin is the most common bin of their
cluster (1 when the latent action determines the bin). Small clusters are pure whatever they hold, so the chance
level is the purity of a random assignment with the same cluster sizes: latent actions permuted across pairs.

Linear probe: ridge regression from the per-position one-hot of the codes (s·|C| features) to the true action,
fitted on the pairs of 80 % of the clips and scored by R² per action dimension on the pairs of the other clips
(split by clip: pairs of one clip share a scene and overlap in time, so a split by pair would leak). The chance
level is the same probe with the codes permuted across pairs; it sits at or just below R² = 0.
"""

from __future__ import annotations

import numpy as np

CHANCE_MARGIN = 0.05
"""A probe is clearly above chance when it beats the chance mean by this much and by 3 chance std."""


def chance_summary(values: list[float]) -> dict[str, float]:
    """Mean, std and max of a probe's value over the shuffled repeats."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "max": float(array.max())}


def clearly_above_chance(value: float, chance: dict[str, float]) -> bool:
    return bool(value - chance["mean"] > max(CHANCE_MARGIN, 3 * chance["std"]))


def standardise(values: np.ndarray) -> np.ndarray:
    """[N, d] -> [N, d] with zero mean and unit std per dimension (constant dimensions become 0)."""
    values = values.astype(np.float64)
    std = values.std(axis=0)
    return (values - values.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: [N, d] -> centres [k, d], each drawn with probability ∝ squared distance to the chosen."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distance = ((points[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(axis=1)  # [N]
        centres.append(points[rng.choice(len(points), p=distance / distance.sum())])
    return np.asarray(centres)


def _lloyd(points: np.ndarray, centres: np.ndarray, iterations: int) -> tuple[np.ndarray, float]:
    """Lloyd iterations from ``centres`` [k, d]: (labels [N], inertia). An emptied cluster keeps its centre."""
    for _ in range(iterations):
        distance = ((points[:, None] - centres[None]) ** 2).sum(-1)  # [N, k]
        labels = distance.argmin(axis=1)
        new_centres = centres.copy()
        for cluster in np.unique(labels):
            new_centres[cluster] = points[labels == cluster].mean(axis=0)
        if np.allclose(new_centres, centres):
            break
        centres = new_centres
    distance = ((points[:, None] - centres[None]) ** 2).sum(-1)
    return distance.argmin(axis=1), float(distance.min(axis=1).sum())


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 4,
           iterations: int = 100) -> np.ndarray:
    """Bin of each point [N, d] -> [N] in [0, k'), k' = min(k, distinct points); best of ``restarts`` by inertia."""
    k = min(k, len(np.unique(points, axis=0)))
    best_labels, best_inertia = np.zeros(len(points), np.int64), np.inf
    for _ in range(restarts):
        labels, inertia = _lloyd(points, _kmeans_plus_plus(points, k, rng), iterations)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def latent_action_ids(codes: np.ndarray) -> np.ndarray:
    """codes [N, s] -> [N]: one id per distinct latent action (row)."""
    return np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)


def cluster_purity(clusters: np.ndarray, classes: np.ndarray) -> float:
    """Fraction of items [N] whose class is the most common class of their cluster."""
    _, cluster_index = np.unique(clusters, return_inverse=True)
    _, class_index = np.unique(classes, return_inverse=True)
    table = np.zeros((cluster_index.max() + 1, class_index.max() + 1), np.int64)  # [clusters, classes]
    np.add.at(table, (cluster_index.reshape(-1), class_index.reshape(-1)), 1)
    return float(table.max(axis=1).sum() / len(clusters))


def purity_probe(codes: np.ndarray, actions: np.ndarray, bins: int, rng: np.random.Generator,
                 repeats: int = 20) -> dict:
    """Purity of the latent-action clusters w.r.t. k-means bins of the true action; codes [N, s], actions [N, d]."""
    action_bins = kmeans(standardise(actions), bins, rng)
    clusters = latent_action_ids(codes)
    purity = cluster_purity(clusters, action_bins)
    chance = chance_summary([cluster_purity(rng.permutation(clusters), action_bins) for _ in range(repeats)])
    return {
        "purity": purity,
        "chance": chance,
        "gain_over_chance": (purity - chance["mean"]) / max(1 - chance["mean"], 1e-12),
        "bins": int(action_bins.max() + 1),
        "clusters": int(clusters.max() + 1),
        "above_chance": clearly_above_chance(purity, chance),
    }


def one_hot_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """codes [N, s] -> [N, s·|C|]: the one-hot of each position's code, positions side by side."""
    n, s = codes.shape
    features = np.zeros((n, s, codebook_size), np.float64)
    features[np.arange(n)[:, None], np.arange(s)[None], codes] = 1
    return features.reshape(n, s * codebook_size)


def ridge_fit(features: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept: features [N, F], targets [N, d] -> (weights [F, d], bias [d])."""
    feature_mean, target_mean = features.mean(axis=0), targets.mean(axis=0)
    centred = features - feature_mean
    gram = centred.T @ centred + alpha * np.eye(features.shape[1])  # [F, F]
    weights = np.linalg.solve(gram, centred.T @ (targets - target_mean))
    return weights, target_mean - feature_mean @ weights


def r_squared(targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """R² per dimension of [N, d]; NaN where the targets are constant."""
    residual = ((targets - predictions) ** 2).sum(axis=0)
    total = ((targets - targets.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1 - residual / total, np.nan)


def split_by_clip(clip_ids: np.ndarray, train_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Training mask [N] holding whole clips: ``train_fraction`` of the clips (at least one out, one in)."""
    clips = rng.permutation(np.unique(clip_ids))
    if len(clips) < 2:
        raise ValueError("the linear probe needs pairs from at least 2 clips to split by clip")
    train_count = min(max(round(train_fraction * len(clips)), 1), len(clips) - 1)
    return np.isin(clip_ids, clips[:train_count])


def _probe_r_squared(features: np.ndarray, actions: np.ndarray, train: np.ndarray, alpha: float) -> np.ndarray:
    weights, bias = ridge_fit(features[train], actions[train], alpha)
    return r_squared(actions[~train], features[~train] @ weights + bias)


def linear_probe(codes: np.ndarray, actions: np.ndarray, clip_ids: np.ndarray, codebook_size: int,
                 rng: np.random.Generator, alpha: float = 1.0, train_fraction: float = 0.8,
                 repeats: int = 5) -> dict:
    """Held-out R² of ridge(one-hot codes -> true action); codes [N, s], actions [N, d], clip_ids [N]."""
    features, actions = one_hot_codes(codes, codebook_size), actions.astype(np.float64)
    train = split_by_clip(clip_ids, train_fraction, rng)
    r2 = _probe_r_squared(features, actions, train, alpha)  # [d]
    shuffled = np.stack([_probe_r_squared(features[rng.permutation(len(features))], actions, train, alpha)
                         for _ in range(repeats)])  # [repeats, d]
    chance = chance_summary(np.nanmean(shuffled, axis=1).tolist())
    mean_r2 = float(np.nanmean(r2))
    return {
        "r2_per_dim": r2.tolist(),
        "r2_mean": mean_r2,
        "chance_r2_per_dim": np.nanmean(shuffled, axis=0).tolist(),
        "chance": chance,
        "train_pairs": int(train.sum()),
        "test_pairs": int((~train).sum()),
        "alpha": alpha,
        "above_chance": clearly_above_chance(mean_r2, chance),
    }
