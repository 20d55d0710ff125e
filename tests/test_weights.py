"""The weights registry (hps_jax.weights): cache resolution offline, sha256 checks and pinning, atomic downloads
(through injected fetchers: nothing here reaches the network), `hps-jax weights`, the `from_pretrained`
constructors and the `hps_jax.score` / `hps_jax.fid` one-liners."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import hps_jax
from hps_jax import weights
from hps_jax.cli import main
from hps_jax.convert.clip import save_hf
from hps_jax.models.clip import CLIP, CLIPConfig
from hps_jax.preference.scorer import AestheticScorer, Scorer
from hps_jax.weights import Entry, WeightsError

LINEAR = "sac+logos+ava1-l14-linearMSE.pth"


@pytest.fixture
def cache(tmp_path, monkeypatch):
  d = tmp_path / "cache"
  monkeypatch.setenv("HPS_JAX_CACHE", str(d))
  monkeypatch.setenv("HPS_JAX_OFFLINE", "1")
  return d


@pytest.fixture
def online(monkeypatch):
  monkeypatch.delenv("HPS_JAX_OFFLINE", raising=False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def put(name, src) -> str:
  """Copies a file into the cache at the entry's path; returns that path."""
  dest = weights.cache_path(name)
  dest.parent.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(src, dest)
  return dest


def sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def test_cache_path_layout(cache):
  assert weights.cache_path("laion-aesthetic-linear") == cache / "laion-aesthetic-linear" / LINEAR
  assert weights.cache_path("clip-vit-l-14") == cache / "clip-vit-l-14"
  with pytest.raises(WeightsError, match="unknown weights 'nope'"):
    weights.resolve("nope")


def test_prepopulated_cache_resolves_offline(cache, aesthetic_weights):
  dest = put("laion-aesthetic-linear", aesthetic_weights / LINEAR)
  assert weights.resolve("laion-aesthetic-linear") == dest
  side = json.loads((dest.parent / (LINEAR + ".sha256.json")).read_text())
  assert side["sha256"] == weights.REGISTRY["laion-aesthetic-linear"].sha256 and not side["pinned"]
  assert weights.resolve("laion-aesthetic-linear") == dest  # the fast path (unchanged stamp)


def test_unknown_sha_is_pinned_on_first_use(cache):
  dest = weights.cache_path("hps-v2.1")
  dest.parent.mkdir(parents=True)
  dest.write_bytes(b"fake checkpoint")
  assert weights.expected_sha256("hps-v2.1") is None
  assert weights.resolve("hps-v2.1") == dest
  assert weights.expected_sha256("hps-v2.1") == sha(b"fake checkpoint")
  dest.write_bytes(b"another checkpoint")
  with pytest.raises(WeightsError, match="pinned") as e:
    weights.resolve("hps-v2.1")
  assert sha(b"fake checkpoint") in str(e.value) and sha(b"another checkpoint") in str(e.value)


def test_missing_offline_names_url_and_cache_path(cache):
  with pytest.raises(WeightsError) as e:
    weights.resolve("laion-aesthetic-relu")
  msg = str(e.value)
  assert "\n" not in msg and "offline" in msg
  assert weights.REGISTRY["laion-aesthetic-relu"].location in msg
  assert str(cache / "laion-aesthetic-relu" / "ava+logos-l14-reluMSE.pth") in msg
  with pytest.raises(WeightsError, match="huggingface.co/openai/clip-vit-large-patch14.*into .*clip-vit-l-14"):
    weights.resolve("clip-vit-l-14")


def test_manual_entry_is_never_downloaded(cache, online):
  with pytest.raises(WeightsError, match="not downloadable automatically.*sharepoint.*hps-v1/hpc.pt"):
    weights.resolve("hps-v1")


def test_corrupted_file_is_refused(cache):
  e = weights.REGISTRY["laion-aesthetic-linear"]
  dest = weights.cache_path(e)
  dest.parent.mkdir(parents=True)
  dest.write_bytes(b"truncated")
  with pytest.raises(WeightsError, match=f"sha256 {sha(b'truncated')}, expected {e.sha256}"):
    weights.resolve(e.name)


def local_entry(tmp_path, data: bytes, sha256=None, size=None) -> Entry:
  src = tmp_path / "published.bin"
  src.write_bytes(data)
  return Entry("local-test", "a file:// download", "url", src.as_uri(), "published.bin", sha256=sha256, size=size)


def test_download_from_file_url_checks_sha_and_is_atomic(cache, online, tmp_path):
  good = local_entry(tmp_path, b"weights v1", sha256=sha(b"weights v1"), size=10)
  path = weights.resolve(good)
  assert path == cache / "local-test" / "published.bin" and path.read_bytes() == b"weights v1"
  assert sorted(p.name for p in path.parent.iterdir()) == ["published.bin", "published.bin.sha256.json"]

  shutil.rmtree(cache)
  bad = local_entry(tmp_path, b"tampered!!", sha256=sha(b"weights v1"))
  with pytest.raises(WeightsError, match=f"sha256 {sha(b'tampered!!')}, expected {sha(b'weights v1')}; refused"):
    weights.resolve(bad)
  assert not any(p.is_file() for p in cache.rglob("*"))  # nothing left behind, not even the partial file

  pinned = local_entry(tmp_path, b"unpublished hash")
  assert weights.resolve(pinned).read_bytes() == b"unpublished hash"
  assert weights.expected_sha256(pinned) == sha(b"unpublished hash")

  shutil.rmtree(cache)
  wrong_size = local_entry(tmp_path, b"short", size=99)
  with pytest.raises(WeightsError, match="5 bytes, expected 99"):
    weights.resolve(wrong_size)
  assert not any(p.is_file() for p in cache.rglob("*"))


def test_failed_download_is_one_line_with_url_and_path(cache, online):
  def broken(entry, dest):
    dest.write_bytes(b"half")
    raise OSError("connection refused\nmore detail")

  e = weights.REGISTRY["laion-aesthetic-relu"]
  with pytest.raises(WeightsError) as err:
    weights.resolve(e, fetch=broken)
  msg = str(err.value)
  assert "\n" not in msg and "connection refused" in msg and e.location in msg
  assert str(weights.cache_path(e)) in msg
  assert not weights.cache_path(e).parent.exists() or not any(weights.cache_path(e).parent.iterdir())


def test_hub_file_download_through_huggingface_hub(cache, online, monkeypatch):
  hub = pytest.importorskip("huggingface_hub")
  calls = []

  def fake_hf_hub_download(repo_id, filename, *, local_dir):
    calls.append((repo_id, filename))
    out = tmp = __import__("pathlib").Path(local_dir) / filename
    tmp.write_bytes(b"open_clip checkpoint")
    return str(out)

  monkeypatch.setattr(hub, "hf_hub_download", fake_hf_hub_download)
  path = weights.resolve("hps-v2")
  assert calls == [("xswu/HPSv2", "HPS_v2_compressed.pt")]
  assert path.read_bytes() == b"open_clip checkpoint"
  assert weights.expected_sha256("hps-v2") == sha(b"open_clip checkpoint")


# ------------------------------------------------------------------------------------------------------------
# hps-jax weights
# ------------------------------------------------------------------------------------------------------------
def test_cli_list_path_verify(cache, aesthetic_weights, capsys):
  put("laion-aesthetic-linear", aesthetic_weights / LINEAR)
  assert main(["weights", "list"]) == 0
  out = capsys.readouterr().out
  rows = {line.split()[0]: line for line in out.splitlines()}
  assert set(rows) == set(weights.REGISTRY)
  assert " present " in rows["laion-aesthetic-linear"] and " missing " in rows["hps-v2.1"]

  assert main(["weights", "path", "laion-aesthetic-linear"]) == 0
  assert capsys.readouterr().out.strip() == str(cache / "laion-aesthetic-linear" / LINEAR)
  assert main(["weights", "path", "hps-v2.1"]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1
  assert "huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt" in err
  assert main(["weights", "path", "nope"]) == 2

  assert main(["weights", "verify"]) == 0
  assert "laion-aesthetic-linear: ok" in capsys.readouterr().out
  assert main(["weights", "verify", "hps-v2"]) == 2
  assert "not in the cache" in capsys.readouterr().err

  dest = weights.cache_path("laion-aesthetic-linear")
  data = bytearray(dest.read_bytes())
  data[100] ^= 1
  dest.write_bytes(bytes(data))
  assert main(["weights", "verify", "laion-aesthetic-linear"]) == 2
  assert "FAILED" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# from_pretrained, the one-liners
# ------------------------------------------------------------------------------------------------------------
def images(n=3, size=40, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8) for i in range(n)]


def test_aesthetic_from_pretrained_matches_from_checkpoint(cache, aesthetic_weights):
  head = put("laion-aesthetic-linear", aesthetic_weights / LINEAR)
  clip_dir = save_hf(
    CLIP(CLIPConfig.tiny().replace(embed_dim=768), rngs=nnx.Rngs(0)), weights.cache_path("clip-vit-l-14")
  )
  pre = AestheticScorer.from_pretrained(batch_size=4)
  ref = AestheticScorer.from_checkpoint(head, clip_dir, batch_size=4)
  np.testing.assert_array_equal(pre.score(images()), ref.score(images()))
  r = repr(pre)
  assert "laion-aesthetic-linear" in r and "clip-vit-l-14" in r and "768-1024-128-64-16-1" in r
  assert "batch_size=4" in r and "clip 32px" in r and "dtype='float32'" in r


def test_scorer_from_pretrained_and_score_one_liner(cache, tmp_path):
  ckpt = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / "hps")
  ref = Scorer.from_checkpoint(ckpt, batch_size=4).score(images(), "a red bicycle")
  got = hps_jax.score(images(), "a red bicycle", model=str(ckpt), batch_size=4)
  assert isinstance(got, np.ndarray) and got.shape == (3,)
  np.testing.assert_allclose(got, ref, rtol=1e-6)

  shutil.copytree(ckpt, weights.cache_path("clip-vit-l-14"))
  s = Scorer.from_pretrained("clip-vit-l-14", batch_size=4)
  np.testing.assert_allclose(s.score(images(), "a red bicycle"), ref, rtol=1e-6)
  r = repr(s)
  assert r.startswith("Scorer(source='clip-vit-l-14 (") and "patch 8" in r and "pad 32px" in r
  with pytest.raises(WeightsError, match="neither a known weights name"):
    Scorer.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.filterwarnings("ignore:FeatureStats")
def test_fid_one_liner_matches_the_command(tmp_path, capsys):
  from hps_jax.convert.inception import save_inception_torch
  from hps_jax.models.inception import FIDInception

  w = save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), tmp_path / "inception.safetensors")
  rng = np.random.default_rng(0)
  for name, lo in (("a", 0), ("b", 60)):
    d = tmp_path / name
    d.mkdir()
    for i in range(4):
      Image.fromarray(rng.integers(lo, lo + 190, (24, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
  got = hps_jax.fid(tmp_path / "a", tmp_path / "b", inception_weights=w, batch_size=4)
  assert isinstance(got, float) and np.isfinite(got) and got > 0
  assert (
    main(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception-weights", str(w), "--batch-size", "4"]) == 0
  )
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] == pytest.approx(got, rel=1e-9)


def test_sample_model_by_name_from_a_populated_cache(cache, tmp_path, capsys):
  """`sample --model sd-v1-4` resolves the cached diffusers folder offline (pinned on first use, verified after);
  a second run gives the same image. A tiny random SD stands in for the real weights."""
  from PIL import Image

  from hps_jax.diffusion.tiny import write_tiny_sd

  write_tiny_sd(weights.cache_path("sd-v1-4"), seed=2)
  argv = ["sample", "--model", "sd-v1-4", "--prompt", "a red circle", "--steps", "2", "--outdir"]
  assert main([*argv, str(tmp_path / "one")]) == 0
  assert main([*argv, str(tmp_path / "two")]) == 0
  first, second = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("one", "two"))
  assert first.shape == (32, 32, 3) and np.array_equal(first, second)
  assert main(["weights", "verify", "sd-v1-4"]) == 0
  (weights.cache_path("sd-v1-4") / "unet" / "config.json").write_text("{}")  # tampered after pinning
  capsys.readouterr()
  assert main([*argv, str(tmp_path / "three")]) == 2
  assert "sd-v1-4" in capsys.readouterr().err
