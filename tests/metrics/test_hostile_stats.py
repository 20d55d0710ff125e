"""Untrusted FID statistics files (hps_jax/metrics/fid.py, compute.py): random, truncated, pickled, lying and
numerically invalid `.npz` files are one `InputError` naming the file (never numpy's allow_pickle hint, never a
huge allocation); the Fréchet distance is never negative or non-finite; statistics are saved atomically."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from hps_jax.data.skips import Skips
from hps_jax.errors import InputError
from hps_jax.metrics import compute
from hps_jax.metrics import fid as F
from hps_jax.metrics.fid import FeatureStats, frechet_distance, load_stats, load_stats_meta

D = 8


def _valid(rng=None):
  rng = rng or np.random.default_rng(0)
  x = rng.standard_normal((50, D))
  return x.mean(0), np.cov(x, rowvar=False)


def _npy(array) -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array(buf, np.asarray(array), allow_pickle=True)
  return buf.getvalue()


def _zip(path, members: dict[str, bytes]):
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  return path


def _lying_header(shape, data: bytes = b"\0" * 64) -> bytes:
  """An .npy whose header declares `shape` (float64) but which holds only `data`."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
  return buf.getvalue() + data


def _cases(tmp_path):
  mu, sigma = _valid()
  good = tmp_path / "good.npz"
  np.savez(good, mu=mu, sigma=sigma)
  raw = good.read_bytes()
  asym = sigma.copy()
  asym[0, 1] += 1.0
  nan_mu = mu.copy()
  nan_mu[3] = np.nan
  inf_sigma = sigma.copy()
  inf_sigma[2, 2] = np.inf
  files = {
    # (content writer, expected message)
    "random": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)), "not a zip archive"),
    "truncated": (lambda p: p.write_bytes(raw[: len(raw) // 2]), "not a zip archive"),
    "truncated-tail": (lambda p: p.write_bytes(raw[:-30]), "not a zip archive|cannot be read"),
    "pickle": (lambda p: p.write_bytes(pickle.dumps({"mu": mu, "sigma": sigma})), "not a zip archive"),
    "npy": (lambda p: p.write_bytes(_npy(mu)), "not a zip archive"),
    "object": (
      lambda p: _zip(p, {"mu.npy": _npy(np.array([{"a": 1}], dtype=object)), "sigma.npy": _npy(sigma)}),
      r"mu: holds pickled Python objects \(never loaded\)",
    ),
    "strings": (lambda p: np.savez(p, mu=np.array(["a", "b"]), sigma=sigma), "mu: holds dtype <U1; expected numbers"),
    "huge-header": (
      lambda p: _zip(p, {"mu.npy": _npy(mu), "sigma.npy": _lying_header((10**6, 10**6))}),
      r"sigma: its header declares shape \(1000000, 1000000\) .* more than the file holds",
    ),
    "short-data": (
      lambda p: _zip(p, {"mu.npy": _npy(mu), "sigma.npy": _lying_header((D, D), b"\0" * 16)}),
      "sigma: its header declares shape",
    ),
    "missing": (lambda p: np.savez(p, mu=mu), r"missing key\(s\) \['sigma'\]"),
    "not-square": (lambda p: np.savez(p, mu=mu, sigma=sigma[:, :5]), r"bad shapes mu \(8,\), sigma \(8, 5\)"),
    "dims": (lambda p: np.savez(p, mu=mu[:5], sigma=sigma), r"bad shapes mu \(5,\), sigma \(8, 8\)"),
    "nan": (lambda p: np.savez(p, mu=nan_mu, sigma=sigma), "mu holds 1 NaN / infinite entries"),
    "inf": (lambda p: np.savez(p, mu=mu, sigma=inf_sigma), "sigma holds 1 NaN / infinite entries"),
    "asymmetric": (lambda p: np.savez(p, mu=mu, sigma=asym), "sigma is not symmetric"),
    "not-psd": (lambda p: np.savez(p, mu=mu, sigma=-np.eye(D)), "sigma is not positive semi-definite"),
    "bad-n": (
      lambda p: np.savez(p, mu=mu, sigma=sigma, n=np.float64(2.5)),
      "sample count n .* is not a positive whole",
    ),
    "many-n": (lambda p: np.savez(p, mu=mu, sigma=sigma, n=np.arange(5)), "sample count n .* is not a positive whole"),
  }
  return files


def test_hostile_stats_files(tmp_path):
  for name, (write, match) in _cases(tmp_path).items():
    path = tmp_path / f"{name}.npz"
    write(path)
    with pytest.raises(InputError, match=match) as e:
      load_stats(path)
    msg = str(e.value)
    assert str(path) in msg and "allow_pickle" not in msg and "\n" not in msg, name
  with pytest.raises(InputError, match="no such file"):
    load_stats(tmp_path / "absent.npz")
  with pytest.raises(InputError, match="is a directory"):
    load_stats(tmp_path)


def test_valid_stats_and_feature_dimension(tmp_path):
  mu, sigma = _valid()
  path = tmp_path / "ok.npz"
  np.savez_compressed(path, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))  # pytorch-fid's layout
  got_mu, got_sigma = load_stats(path)
  assert got_mu.dtype == np.float64 and got_sigma.shape == (D, D)
  # a singular (n < D) but valid covariance is accepted
  x = np.random.default_rng(1).standard_normal((3, D))
  np.savez(tmp_path / "singular.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
  load_stats(tmp_path / "singular.npz")
  with pytest.raises(InputError, match=r"ok\.npz: statistics of 8-dimensional features; these features are 2048"):
    load_stats(path, dim=2048)
  # FeatureStats.load validates the same way (and needs n)
  with pytest.raises(InputError, match="not-psd.npz: sigma is not positive semi-definite"):
    np.savez(tmp_path / "not-psd.npz", mu=mu, sigma=-np.eye(D), n=np.int64(10))
    FeatureStats.load(tmp_path / "not-psd.npz")


def test_meta_is_read_safely(tmp_path):
  mu, sigma = _valid()
  path = tmp_path / "m.npz"
  _zip(path, {"mu.npy": _npy(mu), "sigma.npy": _npy(sigma), "meta.npy": _npy(np.array([{"resize": "tf1"}], object))})
  with pytest.raises(InputError, match=r"m\.npz: meta: holds pickled Python objects"):
    load_stats_meta(path)
  np.savez(path, mu=mu, sigma=sigma, meta=np.asarray("not json {"))
  assert load_stats_meta(path) is None
  np.savez(path, mu=mu, sigma=sigma, meta=np.asarray('{"resize": "tf1"}'))
  assert load_stats_meta(path) == {"resize": "tf1"}


def test_frechet_distance_is_never_negative_or_non_finite():
  mu, sigma = _valid()
  for backend in ("jax", "numpy"):
    # the non-PSD file that printed FID -2047.9998: an error now, not a number
    with pytest.raises(InputError, match="came out negative .* not positive semi-definite"):
      frechet_distance(mu, sigma, mu, -np.eye(D) * 256, backend=backend)
    with pytest.raises(InputError, match="not finite"):
      frechet_distance(mu * 1e200, sigma, -mu * 1e200, sigma, backend=backend)
    # identical singular statistics: rounding below zero is reported as exactly 0
    x = np.random.default_rng(2).standard_normal((3, 64)) * 5
    m, s = x.mean(0), np.cov(x, rowvar=False)
    d = frechet_distance(m, s, m, s, backend=backend)
    assert d >= 0.0 and d < 1e-6 * np.trace(s)
  assert F.NEGATIVE_RTOL <= 1e-4  # the documented tolerance


def test_save_is_atomic(tmp_path, monkeypatch):
  stats = FeatureStats().update(np.random.default_rng(3).standard_normal((40, D)))
  path = tmp_path / "stats.npz"
  stats.save(path)
  before = path.read_bytes()
  assert sorted(os.listdir(tmp_path)) == ["stats.npz"]

  def broken(f, **kw):
    f.write(b"PK partial")
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", broken)
  with pytest.raises(OSError, match="disk full"):
    stats.save(path)
  assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["stats.npz"]


def test_bad_reference_fails_before_the_inception_pass(tmp_path):
  bad = tmp_path / "ref.npz"
  np.savez(bad, mu=np.zeros(D), sigma=-np.eye(D))

  class NoModel:  # the Inception pass must not start
    def __getattr__(self, name):
      raise AssertionError("the Inception model was used before the reference was checked")

  with pytest.raises(InputError, match="ref.npz: sigma is not positive semi-definite"):
    compute.generator_metrics([("a.png", None)], ["fid"], Skips(), reference=bad, inception=NoModel())
  mu, sigma = _valid()
  np.savez(bad, mu=mu, sigma=sigma)
  with pytest.raises(InputError, match="statistics of 8-dimensional features; these features are 2048"):
    compute.generator_metrics([("a.png", None)], ["fid"], Skips(), reference=bad, inception=NoModel())
