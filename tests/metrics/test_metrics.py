"""FID / IS / KID / CLIP score against the reference implementations (pytorch-fid 0.3.0, torch-fidelity 0.4.0).

Tolerances: on full-rank covariances our symmetric-eigendecomposition Fréchet distance and scipy's `sqrtm` agree to
~1e-14 relative. For singular covariances (fewer samples than dimensions) every float64 method, scipy's included,
is only accurate to ~sqrt(machine eps) ~ 1e-8 relative: the zero eigenvalues of S1 S2 come out as +-1e-16 ||S||
and their square roots as ~1e-8 sqrt(||S||) each. The 1e-6 relative bound asked of an FID implementation still holds
with two digits of margin; at d=16 both are also checked against a 40-digit mpmath evaluation of the same inputs.
"""

import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.metrics.fid import FeatureStats, FewSamplesWarning, fid_from_features, frechet_distance, load_stats
from hps_jax.metrics.scores import clip_score, inception_score, kernel_inception_distance

torch = pytest.importorskip("torch")
fid_score = pytest.importorskip("pytorch_fid.fid_score")
metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
metric_kid = pytest.importorskip("torch_fidelity.metric_kid")


def ref_fid(mu1, s1, mu2, s2):
  """pytorch-fid's scipy-sqrtm Fréchet distance (its `disp` argument is deprecated in SciPy >= 1.16)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return float(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))


def inception_like(rng, n, d, shift=0.0, scale=1.0):
  """Non-negative, correlated features with mean and spread of similar size, like Inception pool3 activations."""
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  return np.maximum(scale * rng.standard_normal((n, d)) @ mix + 0.3 + shift, 0.0)


def gaussians(case, d, seed):
  """(mu1, S1, mu2, S2), covariances made exactly symmetric so that every method sees the same input."""
  rng = np.random.default_rng(seed)
  n = {"full": 4 * d, "n<d": d // 2, "n<d+eps": d // 2}[case]
  a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
  b = rng.standard_normal((3 * d, d)) * 0.7 + 0.1
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
  if case == "n<d+eps":
    s1 = s1 + 1e-10 * np.eye(d)
  return a.mean(0), s1, b.mean(0), s2


def mp_fid(mu1, s1, mu2, s2, dps=40):
  """High-precision reference: sum of sqrt(eig(S1 S2)) in mpmath on the exact float64 inputs."""
  mpmath = pytest.importorskip("mpmath")
  with mpmath.workdps(dps):
    w = mpmath.eig(mpmath.matrix(s1.tolist()) * mpmath.matrix(s2.tolist()), left=False, right=False)
    tr_covmean = mpmath.fsum(mpmath.sqrt(max(mpmath.re(x), 0)) for x in w)
    exact = lambda xs: mpmath.fsum(mpmath.mpf(float(x)) for x in xs)  # noqa: E731
    diff = [mpmath.mpf(float(x)) - mpmath.mpf(float(y)) for x, y in zip(mu1, mu2)]
    return float(mpmath.fsum(x * x for x in diff) + exact(np.diag(s1)) + exact(np.diag(s2)) - 2 * tr_covmean)


def rel(a, b):
  return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("case", ["full", "n<d", "n<d+eps"])
@pytest.mark.parametrize("d", [16, 64])
def test_frechet_matches_pytorch_fid(d, case, parity):
  mu1, s1, mu2, s2 = gaussians(case, d, seed=d)
  ref = ref_fid(mu1, s1, mu2, s2)
  for backend in ("jax", "numpy"):
    got = frechet_distance(mu1, s1, mu2, s2, backend=backend)
    parity(f"frechet d={d} {case} {backend} vs pytorch-fid (rel)", rel(got, ref), 1e-6)
  if d == 16:  # the singular cases' own float64 accuracy, against 40 digits
    truth = mp_fid(mu1, s1, mu2, s2)
    parity(f"frechet d=16 {case} jax vs mpmath (rel)", rel(frechet_distance(mu1, s1, mu2, s2), truth), 1e-6)
    parity(f"frechet d=16 {case} pytorch-fid vs mpmath (rel)", rel(ref, truth), 1e-6)


def test_frechet_2048_matches_pytorch_fid(parity):
  rng = np.random.default_rng(2048)
  f1 = inception_like(rng, 2560, 2048)
  f2 = inception_like(rng, 2560, 2048, shift=0.05, scale=1.1)
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  t0 = time.perf_counter()
  got = frechet_distance(mu1, s1, mu2, s2, backend="jax")
  t1 = time.perf_counter()
  ref = ref_fid(mu1, s1, mu2, s2)
  t2 = time.perf_counter()
  print(f"2048-d Fréchet: jax {t1 - t0:.1f} s (incl. compile), pytorch-fid/scipy {t2 - t1:.1f} s")
  parity("frechet d=2048 jax vs pytorch-fid (rel)", rel(got, ref), 1e-6)


def test_frechet_identities_and_x64_scope():
  mu1, s1, mu2, s2 = gaussians("full", 16, seed=0)
  assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-10
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-12)
  # commuting covariances: tr sqrt(S1 S2) = sum sqrt(a b) exactly
  a, b = np.linspace(0.5, 3.0, 16), np.linspace(2.0, 0.1, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a) + np.sum(b) - 2 * np.sum(np.sqrt(a * b))
  assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-13)
  # the float64 computation ran in a local scope: the process-wide default dtype is untouched
  assert jnp.ones(1).dtype == jnp.float32
  with pytest.raises(ValueError, match="backend"):
    frechet_distance(mu1, s1, mu2, s2, backend="torch")
  with pytest.raises(ValueError, match="covariances"):
    frechet_distance(mu1, s1, mu2, s2[:8, :8])


def test_fid_from_features_matches_pytorch_fid(parity):
  rng = np.random.default_rng(1)
  f1 = inception_like(rng, 600, 128).astype(np.float32)
  f2 = inception_like(rng, 500, 128, shift=0.1).astype(np.float32)
  ref = ref_fid(np.mean(f1, axis=0), np.cov(f1, rowvar=False), np.mean(f2, axis=0), np.cov(f2, rowvar=False))
  parity("fid_from_features vs pytorch-fid on np.mean/np.cov (abs)", abs(fid_from_features(f1, f2) - ref), 1e-3)


# ------------------------------------------------------------------------------------------------ streaming stats


def _stream(features, sizes):
  stats, start = FeatureStats(), 0
  for size in sizes:
    stats.update(features[start : start + size])
    start += size
  assert start == len(features)
  return stats


def test_feature_stats_streaming(parity):
  rng = np.random.default_rng(2)
  f = inception_like(rng, 1000, 64).astype(np.float32)
  stats = _stream(f, [1, 13, 200, 7, 379, 0, 400])
  ref_mu, ref_cov = np.mean(f.astype(np.float64), axis=0), np.cov(f.astype(np.float64), rowvar=False)
  assert stats.n == 1000 and stats.dim == 64
  parity("FeatureStats mean vs np.mean (rel)", np.abs(stats.mean() - ref_mu).max() / np.abs(ref_mu).max(), 1e-10)
  parity("FeatureStats cov vs np.cov (rel)", np.abs(stats.cov() - ref_cov).max() / np.abs(ref_cov).max(), 1e-10)

  merged = _stream(f[:300], [100, 200]).merge(_stream(f[300:], [700]))
  assert merged.n == 1000
  np.testing.assert_allclose(merged.cov(), ref_cov, rtol=0, atol=1e-10 * np.abs(ref_cov).max())
  np.testing.assert_allclose(FeatureStats().merge(merged).mean(), ref_mu, rtol=1e-12)

  other = FeatureStats().update(inception_like(rng, 800, 64, shift=0.1))
  fid7 = _stream(f, [7] * 142 + [6]).fid(other)
  fid64 = _stream(f[rng.permutation(1000)], [64] * 15 + [40]).fid(other)
  parity("FeatureStats FID batch 7 vs batch 64 shuffled (rel)", rel(fid7, fid64), 1e-6)

  with pytest.raises(ValueError, match="dimension"):
    stats.update(np.zeros((3, 32)))
  with pytest.raises(ValueError, match="2 samples"):
    FeatureStats().update(np.zeros((1, 4))).cov()


def test_npz_round_trip_and_pytorch_fid_files(tmp_path):
  rng = np.random.default_rng(3)
  f = rng.standard_normal((300, 32))
  stats = FeatureStats().update(f)
  path = tmp_path / "stats.npz"
  stats.save(path)
  with np.load(path) as z:
    assert set(z.files) == {"mu", "sigma", "n"} and z["mu"].dtype == np.float64 and int(z["n"]) == 300
  mu, sigma = load_stats(path)
  np.testing.assert_array_equal(mu, stats.mean())
  np.testing.assert_array_equal(sigma, stats.cov())
  # pytorch-fid reads our file ...
  m, s = fid_score.compute_statistics_of_path(str(path), None, 1, 32, "cpu")
  np.testing.assert_array_equal(m, mu)
  np.testing.assert_array_equal(s, sigma)
  # ... and the restored accumulator keeps streaming as if never saved
  restored = FeatureStats.load(path).update(f[:50])
  full = FeatureStats().update(f).update(f[:50])
  assert restored.n == 350
  np.testing.assert_allclose(restored.cov(), full.cov(), rtol=0, atol=1e-12)

  # a pytorch-fid file (savez_compressed, mu and sigma only, float32 here)
  pf = tmp_path / "pytorch_fid.npz"
  np.savez_compressed(pf, mu=np.mean(f, 0).astype(np.float32), sigma=np.cov(f, rowvar=False).astype(np.float32))
  mu, sigma = load_stats(pf)
  assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (32,) and sigma.shape == (32, 32)
  assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="pytorch_fid.npz.*'n'"):
    FeatureStats.load(pf)

  bad = tmp_path / "bad.npz"
  np.savez(bad, mu=np.zeros(4))
  with pytest.raises(ValueError, match=r"bad\.npz.*missing key.*sigma"):
    load_stats(bad)
  np.savez(bad, mu=np.zeros(4), sigma=np.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"bad\.npz.*bad shapes"):
    load_stats(bad)


def test_few_samples_warning():
  rng = np.random.default_rng(4)
  with pytest.warns(FewSamplesWarning, match="only 20 samples for 32"):
    fid_from_features(rng.standard_normal((20, 32)), rng.standard_normal((40, 32)))
  with pytest.warns(FewSamplesWarning):
    FeatureStats().update(rng.standard_normal((10, 32))).cov()
  with warnings.catch_warnings():
    warnings.simplefilter("error", FewSamplesWarning)
    fid_from_features(rng.standard_normal((40, 32)), rng.standard_normal((32, 32)), backend="numpy")


# ------------------------------------------------------------------------------------------------ IS / KID / CLIP


def test_inception_score_matches_torch_fidelity(parity):
  logits = torch.from_numpy(np.random.default_rng(5).standard_normal((1003, 1008)).astype(np.float32) * 3)
  # torch-fidelity defaults: 10 splits, samples_shuffle=True, rng_seed=2020
  ref = metric_isc.isc_featuresdict_to_metric({"logits_unbiased": logits}, "logits_unbiased", verbose=False)
  mean, std = inception_score(logits.numpy(), shuffle=True, seed=2020)
  parity("IS mean vs torch-fidelity defaults (rel)", rel(mean, ref["inception_score_mean"]), 1e-6)
  parity("IS std vs torch-fidelity defaults (rel)", rel(std, ref["inception_score_std"]), 1e-6)
  ref = metric_isc.isc_features_to_metric(logits, splits=7, shuffle=False)
  mean, std = inception_score(logits.numpy(), splits=7)
  parity("IS mean, no shuffle, 7 splits vs torch-fidelity (rel)", rel(mean, ref["inception_score_mean"]), 1e-6)
  parity("IS std, no shuffle, 7 splits vs torch-fidelity (rel)", rel(std, ref["inception_score_std"]), 1e-6)
  # one-hot predictions spread evenly over k classes reach the maximum, IS = k
  assert inception_score(np.eye(10)[np.arange(100) % 10] * 100.0, splits=1)[0] == pytest.approx(10.0, rel=1e-9)
  with pytest.raises(ValueError, match="splits"):
    inception_score(np.zeros((5, 10)), splits=10)


def test_kid_matches_torch_fidelity(parity):
  rng = np.random.default_rng(6)
  f1 = inception_like(rng, 400, 256)
  f2 = inception_like(rng, 350, 256, shift=0.03)
  kw = dict(kid_subsets=50, kid_subset_size=200, verbose=False)  # other settings: torch-fidelity defaults
  ref = metric_kid.kid_featuresdict_to_metric({"f": torch.from_numpy(f1)}, {"f": torch.from_numpy(f2)}, "f", **kw)
  mean, std = kernel_inception_distance(f1, f2, subsets=50, subset_size=200)
  parity("KID mean vs torch-fidelity (rel)", rel(mean, ref["kernel_inception_distance_mean"]), 1e-6)
  parity("KID std vs torch-fidelity (rel)", rel(std, ref["kernel_inception_distance_std"]), 1e-6)
  # another seed and kernel
  kw.update(rng_seed=7, kid_kernel_poly_degree=2, kid_kernel_poly_gamma=0.01, kid_kernel_poly_coef0=0.5)
  ref = metric_kid.kid_featuresdict_to_metric({"f": torch.from_numpy(f1)}, {"f": torch.from_numpy(f2)}, "f", **kw)
  mean, _ = kernel_inception_distance(f1, f2, subsets=50, subset_size=200, degree=2, gamma=0.01, coef0=0.5, seed=7)
  parity("KID mean, seed 7, degree 2 vs torch-fidelity (rel)", rel(mean, ref["kernel_inception_distance_mean"]), 1e-6)

  with pytest.raises(ValueError, match="subset_size=351 is larger than the number of samples"):
    kernel_inception_distance(f1, f2, subset_size=351)
  with pytest.raises(ValueError):  # the reference refuses too
    metric_kid.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subset_size=351, verbose=False)


def test_clip_score():
  cos = np.array([0.3, -0.2, 0.25, 0.0])
  assert clip_score(cos) == pytest.approx(100 * (0.3 + 0 + 0.25 + 0) / 4)  # 13.75
  assert clip_score(cos, clamp="mean") == pytest.approx(100 * 0.35 / 4)  # torchmetrics' code: clamp the mean
  assert clip_score([-0.1, -0.3], clamp="mean") == 0.0
  assert clip_score([0.31], scale=2.5) == pytest.approx(0.775)  # Hessel et al.'s w = 2.5


def test_metrics_command_reports_clip_score_and_hps_on_both_scales(tmp_path, capsys):
  """`hps-jax metrics --metrics clip,hps`: each similarity as {"cosine", "x100"} (x100 exactly 100 * cosine), the CLIP
  score clamped at 0 per image and HPS not, the old keys (`clip_score`, `hps_mean`) equal to the x100 values."""
  import json

  from flax import nnx
  from PIL import Image

  from hps_jax.cli import main
  from hps_jax.convert.clip import save_hf
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.preference.scorer import Scorer

  model = CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(4))
  model.text.proj.set_value(-model.text.proj[...])  # every cosine of this random model turns negative
  ckpt = save_hf(model, tmp_path / "clip")
  rng = np.random.default_rng(0)
  rows = []
  for i in range(5):
    path = tmp_path / f"{i}.png"
    Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 32, 3), dtype=np.uint8)).save(path)
    rows.append({"image": str(path), "prompt": f"a photo of thing {i}"})
  (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = ["metrics", "--images", str(tmp_path / "set.jsonl"), "--metrics", "clip,hps"]
  args += ["--clip-checkpoint", str(ckpt), "--checkpoint", str(ckpt)]
  assert main(args + ["--output", str(tmp_path / "m.json")]) == 0
  m = json.loads((tmp_path / "m.json").read_text())
  images, prompts = [r["image"] for r in rows], [r["prompt"] for r in rows]
  clip_cos = Scorer.from_checkpoint(ckpt, preprocess="clip").cosine(images, prompts)
  hps_cos = Scorer.from_checkpoint(ckpt, preprocess="pad").cosine(images, prompts)
  assert (clip_cos < 0).all() and (hps_cos < 0).all()  # the CLIP score's clamp makes it 0, HPS stays negative
  assert m["clip"]["cosine"] == 0.0 and m["hps"]["cosine"] < 0
  assert m["clip"]["cosine"] == pytest.approx(float(np.mean(np.maximum(clip_cos, 0))), rel=1e-5, abs=1e-7)
  assert m["hps"]["cosine"] == pytest.approx(float(np.mean(hps_cos)), rel=1e-5, abs=1e-7)
  for k, clamp, old in (("clip", "per_image", "clip_score"), ("hps", "none", "hps_mean")):
    assert m[k]["x100"] == 100 * m[k]["cosine"] and m[k]["clamp"] == clamp and m[k]["num_images"] == 5
    assert m[old] == m[k]["x100"]
  assert m["clip_score"] == pytest.approx(clip_score(clip_cos), rel=1e-5, abs=1e-5)  # scores.clip_score: the x100
  capsys.readouterr()
  assert main(args) == 0  # no --output: the same JSON on stdout
  assert json.loads(capsys.readouterr().out)["hps"] == m["hps"]


def test_metrics_clip_score_with_a_resnet_clip(tmp_path):
  """`metrics --clip-checkpoint` takes a ModifiedResNet CLIP (Table 2's RN50x64 family; OpenAI layout, here a 64 px
  tiny one): its CLIP score is the mean clamped cosine of `Scorer(..., preprocess='clip')` at the model's size."""
  import json

  from flax import nnx
  from PIL import Image

  from hps_jax.cli import main
  from hps_jax.convert.clip import model_params, params_to_openai
  from hps_jax.convert.io import save_safetensors
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.preference.scorer import Scorer

  cfg = CLIPConfig.tiny_resnet()
  ckpt = tmp_path / "RN50x64.safetensors"
  save_safetensors(params_to_openai(model_params(CLIP(cfg, rngs=nnx.Rngs(5))), cfg), ckpt)
  rng = np.random.default_rng(1)
  rows = []
  for i in range(4):
    path = tmp_path / f"{i}.png"
    Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 80, 3), dtype=np.uint8)).save(path)
    rows.append({"image": str(path), "prompt": f"a photo of thing {i}"})
  (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = ["metrics", "--images", str(tmp_path / "set.jsonl"), "--metrics", "clip", "--clip-checkpoint", str(ckpt)]
  assert main(args + ["--output", str(tmp_path / "m.json")]) == 0
  m = json.loads((tmp_path / "m.json").read_text())
  cos = Scorer.from_checkpoint(ckpt, preprocess="clip").cosine([r["image"] for r in rows], [r["prompt"] for r in rows])
  assert m["clip"]["num_images"] == 4
  assert m["clip"]["cosine"] == pytest.approx(float(np.mean(np.maximum(cos, 0))), rel=1e-5, abs=1e-7)
