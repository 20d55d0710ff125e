"""`hps-jax fid` / `hps-jax metrics` and the streaming Inception pass: batch-size independence, saved statistics,
corrupt inputs counted, and the command's numbers equal the library functions on the same features."""

import json

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main as cli
from hps_jax.data.skips import Skips
from hps_jax.metrics import compute
from hps_jax.metrics.fid import fid_from_features
from hps_jax.metrics.inception_features import features
from hps_jax.metrics.scores import inception_score, kernel_inception_distance


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
  from flax import nnx

  from hps_jax.convert.inception import load_inception, save_inception_torch
  from hps_jax.models.inception import FIDInception

  path = save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("inc") / "inception.safetensors")
  return load_inception(path), path


def _write_set(d, seed, n, sizes=((40, 48), (32, 32))):
  d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = []
  for i in range(n):
    h, w = sizes[i % len(sizes)]
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(d / f"img_{i:02d}.png")
    arrays.append(a)
  return arrays


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sets")
  a = _write_set(root / "a", 0, 7)
  b = _write_set(root / "b", 1, 6, sizes=((36, 36),))
  return root, a, b


_FEATS = {}


def _feats(model, arrays, key="pool3"):
  """Features of an image set computed in one go per image size (batch 4, like the commands below: one compile)."""
  cache_key = (id(arrays), key)
  if cache_key not in _FEATS:
    by_shape = {}
    for x in arrays:
      by_shape.setdefault(x.shape, []).append(x)
    out = [
      features(model, np.stack(v), "tf1", batch_size=4, keys=("pool3", "logits_unbiased")) for v in by_shape.values()
    ]
    for k in ("pool3", "logits_unbiased"):
      _FEATS[(id(arrays), k)] = np.concatenate([o[k] for o in out])
  return _FEATS[cache_key]


def test_streaming_pass_is_batch_size_independent(inception, sets):
  model, _ = inception
  root, a, b = sets
  skipped = Skips()
  runs = [
    compute.inception_pass(
      model, compute.list_images(root / "a"), skipped, resize="tf1", batch_size=bs, progress=False, keep=("pool3",)
    )
    for bs in (4, 3)
  ]
  ref = compute.inception_pass(
    model, compute.list_images(root / "b"), skipped, resize="tf1", batch_size=4, progress=False
  )
  fids = [r.stats.fid(ref.stats) for r in runs]
  assert abs(fids[0] - fids[1]) <= 1e-6 * abs(fids[0])
  # and equal to FID on the features computed image-set-wise in one go
  want = fid_from_features(_feats(model, a), _feats(model, b))
  assert abs(fids[0] - want) <= 1e-6 * abs(want)
  assert not skipped.items and runs[0].count == 7


def test_fid_command_stats_and_corrupt_input(inception, sets, tmp_path, capsys):
  model, weights = inception
  root, a, b = sets
  rc = cli(
    [
      "fid",
      str(root / "a"),
      str(root / "b"),
      "--inception-weights",
      str(weights),
      "--batch-size",
      "4",
      "--save-stats",
      str(tmp_path / "a.npz"),
    ]
  )
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rc == 0 and out["num_a"] == 7 and out["num_b"] == 6
  want = fid_from_features(_feats(model, a), _feats(model, b))
  assert abs(out["fid"] - want) <= 1e-6 * abs(want)
  # B against A's saved statistics (pytorch-fid layout) gives the same number
  npz = np.load(tmp_path / "a.npz")
  assert set(npz.files) >= {"mu", "sigma"}
  rc = cli(["fid", str(root / "b"), str(tmp_path / "a.npz"), "--inception-weights", str(weights), "--batch-size", "4"])
  again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rc == 0 and abs(again["fid"] - want) <= 1e-6 * abs(want)
  # the file records how it was made; statistics made another way are compared with a warning, never silently
  meta = json.loads(str(npz["meta"]))
  assert meta == {"resize": "tf1", "inception_sha256": compute.file_sha256(weights), "num_images": 7}
  with pytest.warns(compute.StatsMismatchWarning, match="--resize tf1, this run uses torch"):
    rc = cli(
      ["fid", str(root / "b"), str(tmp_path / "a.npz"), "--inception-weights", str(weights), "--resize", "torch"]
    )
  assert rc == 0
  capsys.readouterr()
  # a corrupt and an empty file are named and counted; the exit code says so
  bad = tmp_path / "bad"
  _write_set(bad, 3, 3)
  (bad / "zero.png").write_bytes(b"")
  (bad / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
  rc = cli(["fid", str(bad), str(tmp_path / "a.npz"), "--inception-weights", str(weights), "--batch-size", "4"])
  captured = capsys.readouterr()
  assert rc == 1 and json.loads(captured.out.strip().splitlines()[-1])["num_a"] == 3
  assert "zero.png" in captured.err and "trunc.jpg" in captured.err and "2 skipped" in captured.err


def test_metrics_command(inception, sets, tmp_path, capsys):
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.preference.scorer import Scorer

  model, weights = inception
  root, a, b = sets
  clip = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(3)), tmp_path / "clip")
  rows = [{"image": str(p), "prompt": f"prompt {i}"} for i, p in enumerate(sorted((root / "a").glob("*.png")))]
  (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  rc = cli(
    [
      "metrics",
      "--images",
      str(tmp_path / "set.jsonl"),
      "--metrics",
      "fid,is,kid,clip,hps",
      "--reference",
      str(root / "b"),
      "--inception-weights",
      str(weights),
      "--is-splits",
      "2",
      "--batch-size",
      "4",
      "--kid-subsets",
      "5",
      "--kid-subset-size",
      "4",
      "--clip-checkpoint",
      str(clip),
      "--checkpoint",
      str(clip),
      "--output",
      str(tmp_path / "m.json"),
    ]
  )
  assert rc == 0, capsys.readouterr().err
  m = json.loads((tmp_path / "m.json").read_text())
  # IS splits and KID subsets follow the images' input order (set a alternates two sizes; _feats groups by size)
  by_size = [i for i in range(len(a)) if i % 2 == 0] + [i for i in range(len(a)) if i % 2 == 1]
  order = np.argsort(by_size)
  fa, fb = _feats(model, a)[order], _feats(model, b)
  assert abs(m["fid"] - fid_from_features(fa, fb)) <= 1e-6 * m["fid"]
  is_mean, is_std = inception_score(_feats(model, a, "logits_unbiased")[order], splits=2)
  assert m["is_mean"] == pytest.approx(is_mean, rel=1e-5) and m["is_std"] == pytest.approx(is_std, rel=1e-3, abs=1e-6)
  kid = kernel_inception_distance(fa, fb, subsets=5, subset_size=4)
  assert m["kid_mean"] == pytest.approx(kid[0], rel=1e-4, abs=1e-7)
  cos = Scorer.from_checkpoint(clip, preprocess="clip").cosine([r["image"] for r in rows], [r["prompt"] for r in rows])
  assert m["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cos, 0))), rel=1e-5)
  hps = Scorer.from_checkpoint(clip, preprocess="pad").score([r["image"] for r in rows], [r["prompt"] for r in rows])
  assert m["hps_mean"] == pytest.approx(float(hps.mean()), rel=1e-5, abs=1e-5)
  assert m["num_images"] == 7 and m["skipped"] == 0


def test_metrics_usage_errors(sets, capsys):
  root, _, _ = sets
  assert cli(["metrics", "--images", str(root / "a"), "--metrics", "fid"]) == 2
  assert "need --reference" in capsys.readouterr().err
  assert cli(["metrics", "--images", str(root / "a"), "--metrics", "clip", "--clip-checkpoint", "x"]) == 2
  assert "prompt per image" in capsys.readouterr().err
  assert cli(["metrics", "--images", str(root / "a"), "--metrics", "bogus"]) == 2
  assert cli(["fid", str(root / "a")]) == 2


def test_kid_subset_larger_than_the_sets_fails_before_feature_extraction(sets, inception, tmp_path, capsys):
  """The default KID subset (1000 images) with 7- and 6-image sets: exit 2 at once, naming both set sizes, and no Inception
  pass runs (it would take minutes at real sizes)."""
  import time

  from hps_jax.cli import main as cli_main

  root = sets[0]
  t0 = time.perf_counter()
  argv = ["metrics", "--images", str(root / "a"), "--metrics", "kid", "--reference", str(root / "b")]
  argv += ["--inception-weights", str(inception[1])]
  assert cli_main(argv) == 2
  elapsed = time.perf_counter() - t0
  err = capsys.readouterr().err
  assert "--kid-subset-size 1000 is larger than the image sets" in err and "Traceback" not in err
  assert "set A" not in err and "img/s" not in err  # no progress bar: nothing was extracted
  assert "--images: 7, --reference: 6" in err
  print(f"KID misconfiguration reported in {elapsed:.2f} s")
