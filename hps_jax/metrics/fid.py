"""Fréchet (Inception) distance between Gaussian fits of feature sets, and streaming feature statistics.

The Fréchet distance between N(mu1, S1) and N(mu2, S2) is

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

pytorch-fid evaluates the last term with `scipy.linalg.sqrtm` of the (non-symmetric) product S1 S2, which runs a
complex Schur decomposition and can return spurious imaginary parts for near-singular inputs. Here the trace is taken
from the similar *symmetric* matrix M = S1^(1/2) S2 S1^(1/2): S1 S2 = S1^(1/2) M S1^(-1/2) has the same eigenvalues as
M, which are real and non-negative, so tr((S1 S2)^(1/2)) = sum_i sqrt(max(lambda_i(M), 0)). S1^(1/2) comes from
`eigh(S1)` with its eigenvalues clamped at zero (so rank-deficient covariances are fine), and only the eigenvalues of
M are needed (`eigvalsh`). Both decompositions are symmetric ones, cheaper and better conditioned than `sqrtm`.

Precision: JAX computes in float32 unless `jax_enable_x64` is set, and float32 is not enough here: the result is a
difference of traces of order tr(S) (~100s for Inception pool features) that is often far smaller, and the
eigenvalues of 2048-d covariances span many decades, so float32 loses the 1e-6 relative accuracy expected of an FID
implementation. The JAX backend therefore runs its jitted kernel inside a local `jax.enable_x64(True)` scope: inputs
are converted to float64 and the computation is traced in float64 without touching the process-wide flag (the jit
cache keys on the flag, so float32 callers elsewhere are unaffected). The NumPy backend is a plain float64 fallback.

`FeatureStats` accumulates the count, sum and sum of outer products (X^T X) of feature batches in float64, so
statistics can be built batch by batch, merged across shards, and saved as the `.npz` files that pytorch-fid reads
(`mu`, `sigma`, plus the sample count `n`). The one-pass covariance (sum_outer - n mu mu^T) / (n - 1) loses about
log10(|mu|^2 / var) digits to cancellation; for Inception features (mean and spread of similar size) that costs
under one digit of float64's sixteen.

Untrusted statistics files: `load_stats` / `FeatureStats.load` read the `.npz` member by member with
`allow_pickle=False`, after checking each `.npy` header (a numeric dtype, no object arrays, a declared size the
archive actually holds), so a hostile file can neither run code nor make numpy allocate what its header claims.
Then the contents are checked: `mu` (D,), `sigma` (D, D) (and a matching D when the caller knows it), all finite,
sigma symmetric to `SYMMETRY_RTOL` of its largest entry and positive semi-definite (no eigenvalue below
-`PSD_RTOL` x its largest absolute eigenvalue). Every problem is an `InputError` naming the file.

The result: d^2 of positive semi-definite inputs is >= 0, but rounding can push a zero distance slightly below. A
negative value down to -`NEGATIVE_RTOL` x (|mu1 - mu2|^2 + |tr S1| + |tr S2|) is reported as 0; a more negative or a
non-finite one raises `InputError` (the inputs are not valid Gaussian fits) instead of being returned.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from hps_jax import files
from hps_jax.errors import InputError

__all__ = [
  "FeatureStats",
  "FewSamplesWarning",
  "fid_from_features",
  "frechet_distance",
  "load_stats",
]


# Tolerances of the checks on statistics files and on the result (see the module docstring).
SYMMETRY_RTOL = 1e-5  # |S - S^T| <= this x max|S|: float32-saved covariances are symmetric to rounding
PSD_RTOL = 1e-4  # min eig(S) >= -this x max|eig(S)|: far beyond float32 rounding of a 2048-d covariance
NEGATIVE_RTOL = 1e-4  # d^2 >= -this x scale is rounding of a zero distance (reported as 0): singular
# covariances (fewer samples than dimensions) give rounding of up to ~2e-6 x scale in float64
_MAX_DIM = 1 << 15  # feature dimension of a statistics file (Inception pool3: 2048)


class FewSamplesWarning(UserWarning):
  """Fewer samples than feature dimensions: the covariance estimate is singular and the FID biased / unstable."""


def _warn_few_samples(n: int, dim: int, what: str = "features"):
  if n < dim:
    warnings.warn(
      f"{what}: only {n} samples for {dim}-dimensional features; the covariance is singular (rank <= {n - 1}) and "
      f"the Fréchet distance is strongly biased and unstable. Use at least {dim} (ideally >= 10k) samples.",
      FewSamplesWarning,
      stacklevel=3,
    )


# ------------------------------------------------------------------------------------------------ Fréchet distance


def _check_gaussians(mu1, sigma1, mu2, sigma2):
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f"means must be 1-D vectors of the same length, got shapes {mu1.shape} and {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} and {sigma2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} contains non-finite values")
  return mu1, sigma1, mu2, sigma2


def _trace_sqrt_product_np(s1: np.ndarray, s2: np.ndarray) -> float:
  """tr((s1 s2)^(1/2)) for symmetric PSD s1, s2 via the symmetric similar matrix s1^(1/2) s2 s1^(1/2)."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
  m = root1 @ s2 @ root1
  m = 0.5 * (m + m.T)
  return float(np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh(m), 0.0))))


@functools.cache
def _jax_kernel():
  """The jitted float64 kernel (built on first use)."""

  @jax.jit
  def kernel(mu1, s1, mu2, s2):
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    w, v = jnp.linalg.eigh(s1)
    root1 = (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T
    m = root1 @ s2 @ root1
    m = 0.5 * (m + m.T)
    tr_covmean = jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(m), 0.0)))
    diff = mu1 - mu2
    d2 = diff @ diff + jnp.trace(s1) + jnp.trace(s2) - 2.0 * tr_covmean
    return d2, diff @ diff + jnp.abs(jnp.trace(s1)) + jnp.abs(jnp.trace(s2))

  return kernel


def _checked_distance(d2: float, scale: float) -> float:
  """d^2, with a rounding-level negative reported as 0; non-finite or clearly negative values raise."""
  if not (math.isfinite(d2) and math.isfinite(scale)):
    raise InputError(
      f"the Fréchet distance is not finite ({d2}): the statistics overflow float64 or are not valid Gaussian fits"
    )
  if d2 < 0:
    if d2 < -NEGATIVE_RTOL * scale:
      raise InputError(
        f"the Fréchet distance came out negative ({d2:.6g}, below -{NEGATIVE_RTOL:g} x {scale:.6g}): a covariance is "
        "not positive semi-definite, so the statistics are not valid Gaussian fits"
      )
    return 0.0
  return d2


def _x64_scope():
  """A context in which JAX creates and computes float64 arrays (`jax.enable_x64`, or the older experimental one)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.5

  return enable_x64()


def frechet_distance(mu1, sigma1, mu2, sigma2, *, backend: str = "jax") -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

  Covariances are symmetrized ((S + S^T) / 2) and may be singular. `backend` is "jax" (jitted, float64 in a local x64
  scope) or "numpy". Equals pytorch-fid's `calculate_frechet_distance` up to rounding, without its complex-valued
  `sqrtm` (see the module docstring). Never returns a negative or non-finite value: a rounding-level negative is 0,
  anything else raises `InputError` (see `NEGATIVE_RTOL`).
  """
  if backend not in ("jax", "numpy"):
    raise ValueError(f"backend must be 'jax' or 'numpy', got {backend!r}")
  mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
  with np.errstate(all="ignore"):
    if backend == "numpy":
      s1 = 0.5 * (sigma1 + sigma1.T)
      s2 = 0.5 * (sigma2 + sigma2.T)
      diff = mu1 - mu2
      d2 = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product_np(s1, s2))
      scale = float(diff @ diff + abs(np.trace(s1)) + abs(np.trace(s2)))
      return _checked_distance(d2, scale)
  with _x64_scope():
    args = [jnp.asarray(a, dtype=jnp.float64) for a in (mu1, sigma1, mu2, sigma2)]
    d2, scale = _jax_kernel()(*args)
    assert d2.dtype == jnp.float64, d2.dtype
    return _checked_distance(float(jax.device_get(d2)), float(jax.device_get(scale)))


def fid_from_features(features1, features2, *, backend: str = "jax") -> float:
  """FID between two (N, D) feature arrays: Gaussian fits by np.mean / np.cov(rowvar=False) in float64, then
  `frechet_distance`. Warns (`FewSamplesWarning`) when a set has fewer samples than dimensions."""
  stats = []
  for name, f in (("features1", features1), ("features2", features2)):
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
      raise ValueError(f"{name} must be (N, D) with N >= 2, got shape {f.shape}")
    _warn_few_samples(f.shape[0], f.shape[1], name)
    stats.append((f.mean(axis=0), np.cov(f, rowvar=False)))
  return frechet_distance(*stats[0], *stats[1], backend=backend)


# ------------------------------------------------------------------------------------------------ streaming stats


class FeatureStats:
  """Streaming mean / covariance of D-dimensional features, accumulated in float64.

  State: `n` (samples seen), `sum` (D,) and `sum_outer` (D, D) = sum of x x^T (X^T X per batch). `update` takes
  (N, D) batches of any size; `merge` adds another accumulator (e.g. from another data shard or host). `mean()` and
  `cov()` (unbiased, ddof=1, like np.cov(rowvar=False)) give the Gaussian fit; `save` writes a pytorch-fid-compatible
  `.npz` (`mu`, `sigma`, and `n`).
  """

  def __init__(self, dim: int | None = None):
    self.n = 0
    self.sum = None if dim is None else np.zeros(dim, np.float64)
    self.sum_outer = None if dim is None else np.zeros((dim, dim), np.float64)

  @property
  def dim(self) -> int | None:
    return None if self.sum is None else self.sum.shape[0]

  def _ensure_dim(self, dim: int):
    if self.sum is None:
      self.sum = np.zeros(dim, np.float64)
      self.sum_outer = np.zeros((dim, dim), np.float64)
    elif dim != self.dim:
      raise ValueError(f"feature dimension {dim} does not match the accumulated statistics' {self.dim}")

  def update(self, features) -> "FeatureStats":
    """Adds an (N, D) batch (any float dtype; accumulated in float64). Returns self."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
      raise ValueError("features contain non-finite values")
    self._ensure_dim(x.shape[1])
    self.n += x.shape[0]
    self.sum += x.sum(axis=0)
    self.sum_outer += x.T @ x
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds another accumulator's samples into this one (in place). Returns self."""
    if other.n == 0:
      return self
    self._ensure_dim(other.dim)
    self.n += other.n
    self.sum += other.sum
    self.sum_outer += other.sum_outer
    return self

  def mean(self) -> np.ndarray:
    if self.n < 1:
      raise ValueError("no features accumulated")
    return self.sum / self.n

  def cov(self) -> np.ndarray:
    """Unbiased (ddof=1) covariance; warns when there are fewer samples than dimensions."""
    if self.n < 2:
      raise ValueError(f"the covariance needs at least 2 samples, have {self.n}")
    _warn_few_samples(self.n, self.dim, "FeatureStats")
    mu = self.sum / self.n
    c = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return 0.5 * (c + c.T)

  def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
    return self.mean(), self.cov()

  def fid(self, other: "FeatureStats", *, backend: str = "jax") -> float:
    """Fréchet distance between this accumulator's Gaussian fit and another's."""
    return frechet_distance(*self.mu_sigma(), *other.mu_sigma(), backend=backend)

  def save(self, path: str | os.PathLike, meta: dict | None = None):
    """Writes `mu`, `sigma` (float64, pytorch-fid layout), `n` and, when given, `meta` (how the statistics were made:
    a JSON string, e.g. the resize and the Inception weights' sha256) to an `.npz` at exactly `path`."""
    mu, sigma = self.mu_sigma()
    extra = {"meta": np.asarray(json.dumps(meta, sort_keys=True))} if meta else {}
    # atomic: a temporary file in the target's folder, renamed over `path` only once complete
    with files.atomic_write(path, "wb") as f:
      np.savez(f, mu=mu, sigma=sigma, n=np.int64(self.n), **extra)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FeatureStats":
    """Restores an accumulator saved by `save` (needs `n`; pytorch-fid files lack it, read those with `load_stats`).
    The restored state continues to accept `update` / `merge`."""
    mu, sigma, n = _read_stats(path, need_n=True)
    stats = cls(mu.shape[0])
    stats.n = n
    stats.sum = n * mu
    stats.sum_outer = (n - 1) * sigma + n * np.outer(mu, mu)
    return stats


_NPZ_EXPECTED = "a statistics .npz (a zip of .npy arrays: mu (D,), sigma (D, D), as pytorch-fid or --save-stats write)"


def _npz_arrays(path, names: dict[str, str], max_bytes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
  """The arrays `names` ({name: allowed dtype kinds}) present in the `.npz` at `path`, read safely: every `.npy`
  header is checked (numeric kinds only, never an object array; a declared size the archive holds) before numpy
  reads the data with allow_pickle=False. Any problem: InputError naming the file, never numpy's hint to pass
  allow_pickle=True."""
  p = os.fspath(path)
  try:
    zf = zipfile.ZipFile(p)
  except FileNotFoundError:
    raise InputError(f"{p}: no such file; expected {_NPZ_EXPECTED}") from None
  except IsADirectoryError:
    raise InputError(f"{p}: is a directory; expected {_NPZ_EXPECTED}") from None
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    why = "not a zip archive (a pickle or other file?)" if isinstance(e, zipfile.BadZipFile) else str(e)[:100]
    raise InputError(f"{p}: {why}; expected {_NPZ_EXPECTED}") from e
  size = os.path.getsize(p)
  out = {}
  with zf:
    for name, kinds in names.items():
      try:
        info = zf.getinfo(name + ".npy")
      except KeyError:
        continue
      try:
        out[name] = _npy_member(zf, info, kinds, size, (max_bytes or {}).get(name))
      except InputError as e:
        raise InputError(f"{p}: {name}: {e}") from None
      except Exception as e:  # BadZipFile (CRC), zlib.error, ValueError / EOFError (truncated data), MemoryError
        raise InputError(f"{p}: {name} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from e
  return out


def _npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, kinds: str, archive_size: int, max_bytes) -> np.ndarray:
  if info.header_offset + info.compress_size > archive_size:
    raise InputError("reaches past the end of the archive (truncated?)")
  if info.compress_type == zipfile.ZIP_STORED:
    ok = info.compress_size == info.file_size
  else:
    ok = info.compress_type == zipfile.ZIP_DEFLATED and info.file_size <= 1032 * info.compress_size + 64
  if not ok:
    raise InputError(f"declares {info.file_size} bytes from {info.compress_size} stored; not what numpy writes")
  with zf.open(info) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise InputError(f"unsupported .npy format version {version}")
  if dtype.hasobject or dtype.kind not in kinds:
    what = "pickled Python objects (never loaded)" if dtype.hasobject else f"dtype {dtype}"
    raise InputError(f"holds {what}; expected {'text' if kinds == 'U' else 'numbers'}")
  nbytes = math.prod(shape) * dtype.itemsize
  if nbytes > info.file_size:
    raise InputError(f"its header declares shape {shape} ({nbytes} bytes), more than the file holds")
  if max_bytes is not None and nbytes > max_bytes:
    raise InputError(f"its header declares shape {shape} ({nbytes} bytes); at most {max_bytes} expected")
  with zf.open(info) as f:
    return np.lib.format.read_array(f, allow_pickle=False)


def check_stats(path, mu: np.ndarray, sigma: np.ndarray, dim: int | None = None) -> None:
  """InputError naming `path` unless mu (D,) and sigma (D, D) are a valid Gaussian fit: matching shapes (D = `dim`
  when given), finite, sigma symmetric (`SYMMETRY_RTOL`) and positive semi-definite (`PSD_RTOL`)."""
  p = os.fspath(path)
  if mu.ndim != 1 or not 1 <= mu.shape[0] <= _MAX_DIM or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise InputError(f"{p}: bad shapes mu {mu.shape}, sigma {sigma.shape}; expected (D,) and (D, D)")
  for name, a in (("mu", mu), ("sigma", sigma)):
    if not np.all(np.isfinite(a)):
      raise InputError(f"{p}: {name} holds {int(np.size(a) - np.isfinite(a).sum())} NaN / infinite entries")
  top = float(np.max(np.abs(sigma)))
  asym = float(np.max(np.abs(sigma - sigma.T)))
  if asym > SYMMETRY_RTOL * top:
    raise InputError(f"{p}: sigma is not symmetric (max |sigma - sigma^T| = {asym:.3g}, max |sigma| = {top:.3g})")
  eig = np.linalg.eigvalsh(0.5 * (sigma + sigma.T))
  lo, big = float(eig[0]), float(np.max(np.abs(eig)))
  if lo < -PSD_RTOL * big:
    raise InputError(
      f"{p}: sigma is not positive semi-definite (smallest eigenvalue {lo:.6g}, largest magnitude {big:.6g}): not a "
      "covariance matrix"
    )
  if dim is not None and mu.shape[0] != dim:
    raise InputError(
      f"{p}: statistics of {mu.shape[0]}-dimensional features; these features are {dim}-dimensional (statistics of "
      "another feature extractor?)"
    )


def _read_stats(path, need_n: bool, dim: int | None = None):
  p = os.fspath(path)
  arrays = _npz_arrays(path, {"mu": "fiu", "sigma": "fiu", "n": "fiu"}, {"n": 64})
  keys = set(arrays)
  missing = {"mu", "sigma"} - keys
  if need_n and "n" not in keys:
    raise InputError(
      f"{p}: no sample count 'n' (a pytorch-fid statistics file?); FeatureStats.load "
      f"needs it to resume accumulation, use load_stats() to read only mu and sigma"
    )
  if missing:
    raise InputError(
      f"{p}: missing key(s) {sorted(missing)} (found {sorted(keys)}); expected a pytorch-fid style .npz with 'mu' "
      "(D,) and 'sigma' (D, D)"
    )
  mu = np.asarray(arrays["mu"], dtype=np.float64)
  sigma = np.asarray(arrays["sigma"], dtype=np.float64)
  check_stats(path, mu, sigma, dim)
  n = None
  if "n" in keys:
    raw = arrays["n"]
    value = float(raw.reshape(-1)[0]) if raw.size == 1 else float("nan")
    if not (math.isfinite(value) and value.is_integer() and 1 <= value <= 2**53):
      raise InputError(f"{p}: sample count n {raw.ravel()[:3]!r:.60} is not a positive whole number")
    n = int(value)
  if need_n and n < 2:
    raise InputError(f"{p}: sample count n={n} < 2")
  return mu, sigma, n


def load_stats_meta(path: str | os.PathLike) -> dict | None:
  """The `meta` a statistics file records (None for pytorch-fid files and older ones, or unreadable meta)."""
  arrays = _npz_arrays(path, {"meta": "U"}, {"meta": 1 << 20})
  if "meta" not in arrays or arrays["meta"].shape != ():
    return None
  try:
    meta = json.loads(str(arrays["meta"]))
  except (ValueError, RecursionError):
    return None
  return meta if isinstance(meta, dict) else None


def load_stats(path: str | os.PathLike, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) as float64 from an `.npz` written by `FeatureStats.save` or by pytorch-fid (`--save-stats`),
  validated (see `check_stats`; `dim`: the feature dimension they must have). InputError naming the file."""
  mu, sigma, _ = _read_stats(path, need_n=False, dim=dim)
  return mu, sigma
