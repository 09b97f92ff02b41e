"""Sample-quality metrics on feature vectors: Fréchet distance, Inception Score, precision/recall.

The formulas follow the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``),
which VAR and HMAR report with, and torch-fidelity, which MAR and CASMAR report with:
- Fréchet distance in float64 with ``scipy.linalg.sqrtm``; a non-finite square root is retried
  with ``eps`` added to both diagonals, and an imaginary part larger than 1e-3 on the diagonal
  is an error (numerical trouble, not a result).
- Inception Score over splits of 5,000 samples (the ADM split size); logits have no bias term.
- Improved precision/recall (Kynkäänniemi et al. 2019): each point's radius is the distance to
  its 3rd nearest neighbour in its own set (k = 3).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def _scipy_linalg():
    try:
        import scipy.linalg
    except ImportError as err:  # scipy is an optional dependency of maskar
        raise ImportError("the Fréchet distance needs scipy (pip install scipy)") from err
    return scipy.linalg


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, both float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats: expected (N, D) features with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians, in float64."""
    linalg = _scipy_linalg()
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"frechet_distance: mismatched statistics mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape} (are both sets from the same feature network?)"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): regularise both covariances.
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm has an imaginary diagonal component of {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of ``split_size`` rows; returns (mean, std) over splits.

    ``logits`` (N, K) are pre-softmax scores (the ADM evaluator multiplies the pool features by
    the classifier weights without the bias). With N <= split_size there is one split (std 0).
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"inception_score: expected (N, K) logits, got shape {x.shape}")
    log_p = x - x.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax
    scores = []
    for start in range(0, len(x), split_size):
        part = log_p[start : start + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        kl = (p * (part - log_marginal)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Na, Nb) = |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def knn_radii(
    features: torch.Tensor, k: int = 3, batch_size: int = 10000, desc: str | None = None
) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (N,)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall: need more than k={k} points in each set, got {n}")
    out = torch.empty(n, dtype=features.dtype, device=features.device)
    bar = tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=desc is None or n <= batch_size)
    for start in bar:
        d = _sq_dists(features[start : start + batch_size], features)
        # The smallest entry is the point itself (0), so the k-th neighbour is at sorted index k.
        out[start : start + batch_size] = d.kthvalue(k + 1, dim=1).values
    return out


def _coverage(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int, desc: str | None
) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius); distances squared."""
    inside = 0
    bar = tqdm(range(0, len(points), batch_size), desc=desc, unit="batch", disable=desc is None)
    for start in bar:
        hit = torch.zeros(len(points[start : start + batch_size]), dtype=torch.bool, device=points.device)
        for c0 in range(0, len(centres), batch_size):
            d = _sq_dists(points[start : start + batch_size], centres[c0 : c0 + batch_size])
            hit |= (d <= radii[None, c0 : c0 + batch_size]).any(dim=1)
        inside += int(hit.sum())
    return inside / len(points)


def precision_recall(
    ref_features: np.ndarray | torch.Tensor,
    sample_features: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 10000,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019).

    precision: fraction of samples inside the reference manifold (a union of balls around the
    reference points, radius = distance to the k-th nearest reference point); recall: fraction
    of reference points inside the sample manifold.
    """
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(
            f"precision_recall: expected (N, D) feature sets of equal D, got {tuple(ref.shape)} "
            f"and {tuple(smp.shape)}"
        )
    label = (lambda s: s) if progress else (lambda s: None)
    ref_radii = knn_radii(ref, k, batch_size, label("pr: reference radii"))
    smp_radii = knn_radii(smp, k, batch_size, label("pr: sample radii"))
    precision = _coverage(smp, ref, ref_radii, batch_size, label("pr: precision"))
    recall = _coverage(ref, smp, smp_radii, batch_size, label("pr: recall"))
    return precision, recall
