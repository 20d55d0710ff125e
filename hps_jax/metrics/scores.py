"""Inception Score, Kernel Inception Distance and CLIP score from precomputed network outputs.

IS and KID follow torch-fidelity 0.4.0 (`metric_isc.isc_features_to_metric`, `metric_kid.kid_features_to_metric`)
number for number when given the same inputs and seed; both are computed in float64 here. Notes on that reference:

* IS: torch-fidelity shuffles the samples by default (`samples_shuffle=True`, permutation from
  `np.random.RandomState(rng_seed=2020)`) before cutting them into `isc_splits=10` contiguous chunks of sizes
  `(i+1)*N//splits - i*N//splits`. Here the default is *no* shuffle (the original OpenAI split order); pass
  `shuffle=True, seed=2020` to reproduce torch-fidelity's default. The reported std is np.std, i.e. ddof=0.
* KID: for each of `subsets` rounds it draws `subset_size` indices without replacement from set 1, then from set 2,
  alternating, from a single `np.random.RandomState(seed)` stream (seed 2020 by default), and reports the mean and
  np.std (ddof=0) of the unbiased MMD^2 estimates with the polynomial kernel (gamma x.y + coef0)^degree,
  gamma = 1/D by default. torch-fidelity computes in the features' dtype (float32 for its Inception); this module
  always uses float64, which matters because MMD^2 is a small difference of large kernel sums.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clip_score", "inception_score", "kernel_inception_distance"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
  m = x.max(axis=1, keepdims=True)
  z = x - m
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits, splits: int = 10, *, shuffle: bool = False, seed: int = 2020) -> tuple[float, float]:
  """Inception Score (mean, std over splits) from classifier logits (N, C), e.g. torch-fidelity's 1008-way
  "logits_unbiased" Inception output.

  p(y|x) = softmax(logits); the samples are cut into `splits` contiguous chunks (after a
  `RandomState(seed).permutation` when `shuffle`); per chunk IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the chunk's
  mean prediction. Returns (mean, np.std with ddof=0) over the chunks, as torch-fidelity does.
  """
  x = np.asarray(logits, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"logits must be (N, C), got shape {x.shape}")
  n = x.shape[0]
  if splits < 1 or n < splits:
    raise ValueError(f"need 1 <= splits <= N, got splits={splits} for N={n} samples")
  if not np.all(np.isfinite(x)):
    raise ValueError("logits contain non-finite values")
  if shuffle:
    x = x[np.random.RandomState(seed).permutation(n)]
  log_p = _log_softmax(x)
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    pc, log_pc = p[lo:hi], log_p[lo:hi]
    log_q = np.log(pc.mean(axis=0, keepdims=True))
    # 0 * log 0 := 0 (a class whose probability underflows everywhere in the chunk)
    kl = np.where(pc > 0, pc * (log_pc - log_q), 0.0).sum(axis=1)
    scores.append(float(np.exp(kl.mean())))
  return float(np.mean(scores)), float(np.std(scores))


def _poly_kernel_sums(x, y, gamma, coef0, degree):
  """(sum of off-diagonal k(x_i, x_j), same for y, sum of k(x_i, y_j)) for the polynomial kernel."""
  kxx = (x @ x.T * gamma + coef0) ** degree
  kyy = (y @ y.T * gamma + coef0) ** degree
  kxy = (x @ y.T * gamma + coef0) ** degree
  return kxx.sum() - np.trace(kxx), kyy.sum() - np.trace(kyy), kxy.sum()


def kernel_inception_distance(
  features1,
  features2,
  subsets: int = 100,
  subset_size: int = 1000,
  degree: int = 3,
  gamma: float | None = None,
  coef0: float = 1.0,
  seed: int = 2020,
) -> tuple[float, float]:
  """Kernel Inception Distance (mean, std over subsets) between (N1, D) and (N2, D) features.

  Per subset: `subset_size` rows of each set drawn without replacement (`RandomState(seed).choice`, set 1 then set 2,
  one stream for all subsets), polynomial kernel k(a, b) = (gamma a.b + coef0)^degree with gamma = 1/D by default,
  and the unbiased MMD^2 estimate

      sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2.

  Returns (mean, np.std with ddof=0), identical to torch-fidelity's `kid_features_to_metric` for the same seed.
  Small negative values are valid (the estimate is unbiased) and mean the distributions are very close.
  """
  f1 = np.asarray(features1, dtype=np.float64)
  f2 = np.asarray(features2, dtype=np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"features must be (N1, D) and (N2, D) with the same D, got {f1.shape} and {f2.shape}")
  n1, n2 = f1.shape[0], f2.shape[0]
  if subset_size < 2:
    raise ValueError(f"subset_size must be >= 2 for the unbiased estimate, got {subset_size}")
  if subset_size > n1 or subset_size > n2:
    raise ValueError(
      f"KID subset_size={subset_size} is larger than the number of samples (features1: {n1}, "
      f"features2: {n2}); subsets are drawn without replacement, so pass subset_size <= "
      f"{min(n1, n2)}"
    )
  if subsets < 1:
    raise ValueError(f"subsets must be >= 1, got {subsets}")
  if gamma is None:
    gamma = 1.0 / f1.shape[1]
  m = subset_size
  rng = np.random.RandomState(seed)
  mmds = np.empty(subsets)
  for i in range(subsets):
    x = f1[rng.choice(n1, m, replace=False)]
    y = f2[rng.choice(n2, m, replace=False)]
    sxx, syy, sxy = _poly_kernel_sums(x, y, gamma, coef0, degree)
    mmds[i] = (sxx + syy) / (m * (m - 1)) - 2.0 * sxy / (m * m)
  return float(mmds.mean()), float(mmds.std())


def clip_score(cosines, *, clamp: str = "per_image", scale: float = 100.0) -> float:
  """CLIP score from per-image cosine similarities between image and caption embeddings.

  clamp="per_image" (default): mean_i scale * max(cos_i, 0), the per-pair definition of CLIPScore (Hessel et al.
  2021, with torchmetrics' scale of 100 instead of the paper's w = 2.5) as torchmetrics documents it.
  clamp="mean": max(scale * mean_i cos_i, 0), what torchmetrics' `clip_score` / `CLIPScore.compute` actually
  evaluate (they average first, then clamp). The two agree whenever no cosine is negative, the usual case for real
  CLIP image-caption pairs.
  """
  c = np.asarray(cosines, dtype=np.float64).reshape(-1)
  if c.size == 0:
    raise ValueError("no cosines given")
  if clamp == "per_image":
    return float(np.mean(scale * np.maximum(c, 0.0)))
  if clamp == "mean":
    return float(max(scale * c.mean(), 0.0))
  raise ValueError(f"clamp must be 'per_image' or 'mean', got {clamp!r}")
