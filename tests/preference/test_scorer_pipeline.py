"""The streaming pipeline of the scorers (`scorer._stream`): decode workers (threads or spawned processes) and
prefetch overlapped with compute. Order, values (bit for bit across worker counts and kinds), per-image errors in
place, bounded read-ahead, and no worker left running however the stream ends. No timing here (bench/score_e2e.py)."""

import multiprocessing

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hps_jax import errors
from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.models.aesthetic import AestheticMLP
from hps_jax.models.clip import CLIP, CLIPConfig
from hps_jax.preference import scorer as scorer_mod
from hps_jax.preference.scorer import AestheticScorer, Scorer

BATCH = 4


def _spawned_workers() -> list:
  """This process's live worker processes (multiprocessing's resource tracker is not one)."""
  return multiprocessing.active_children()


def _no_workers_left():
  assert multiprocessing.active_children() == []
  try:
    import psutil
  except ImportError:
    return
  workers = [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(_cmdline(p))]
  assert workers == []


def _cmdline(p) -> list:
  try:
    return p.cmdline()
  except Exception:  # exited meanwhile (psutil.NoSuchProcess, AccessDenied)
    return []


@pytest.fixture(scope="module")
def scorer():
  model = CLIP(CLIPConfig.tiny(), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  return Scorer(model, CLIPTokenizer.default(), "pad", batch_size=BATCH)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """14 JPEG/PNG files of varied sizes with an unreadable one at index 6 (mid-chunk)."""
  d = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  paths = []
  for i in range(14):
    path = d / f"{i:02d}.{'png' if i % 3 else 'jpg'}"
    if i == 6:
      path.write_bytes(b"\xff\xd8\xff not a jpeg")
    else:
      h, w = [(40, 24), (17, 33), (64, 80), (96, 50)][i % 4]
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
  return paths


def _items(files):
  return [(p, f"prompt number {i}") for i, p in enumerate(files)]


def _reference(scorer, items):
  """The sequential computation, chunk by chunk as the stream chunks (same buckets, so bit for bit)."""
  want = []
  for start in range(0, len(items), BATCH):
    chunk = [(p, q) for p, q in items[start : start + BATCH] if not p.endswith("06.jpg")]
    px = scorer.prepare_images([p for p, _ in chunk])
    want += list(scorer.cosine_arrays(px, scorer.tokenize([q for _, q in chunk])))
  return np.array(want)


@pytest.mark.parametrize(
  "worker_type,workers", [("thread", 1), ("thread", 3), ("process", 1), ("process", 2), ("auto", 2)]
)
def test_order_values_and_errors_identical_across_workers(scorer, files, worker_type, workers, monkeypatch):
  items = _items(files)
  seen = []
  real = scorer._dispatch_cosine

  def spy(pixels, ids):
    seen.append(len(_spawned_workers()))
    return real(pixels, ids)

  monkeypatch.setattr(scorer, "_dispatch_cosine", spy)
  monkeypatch.setattr(scorer, "workers", workers)
  monkeypatch.setattr(scorer, "worker_type", worker_type)
  rows = list(scorer.iter_scores(items))
  assert [r["image"] for r in rows] == files and [r["prompt"] for r in rows] == [q for _, q in items]
  assert "error" in rows[6] and "06.jpg" in rows[6]["error"] and "hps" not in rows[6]
  assert all("error" not in r for i, r in enumerate(rows) if i != 6)
  got = np.array([r["cosine"] for i, r in enumerate(rows) if i != 6])
  np.testing.assert_array_equal(got, _reference(scorer, items))  # bit for bit
  assert [r["hps"] for i, r in enumerate(rows) if i != 6] == [100.0 * c for c in got.tolist()]
  # processes were used when asked for (auto: threads), and none is left
  uses_processes = worker_type == "process"
  assert (max(seen) > 0) == uses_processes, seen
  _no_workers_left()


def test_mixed_sources_and_aesthetic_scorer(scorer, files):
  """Chunks of in-memory images go to threads even in process mode; bytes go to processes; same values."""
  arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files[:4]]
  blobs = [open(p, "rb").read() for p in files[8:12]]
  sources = arrays + files[4:8] + blobs  # index 6 unreadable
  items = [(s, "a red circle") for s in sources]
  rows = {t: list(Scorer.iter_scores(_with(scorer, t), items)) for t in ("thread", "process")}
  assert [("error" in r) for r in rows["process"]] == [i == 6 for i in range(12)]
  assert [r.get("cosine") for r in rows["process"]] == [r.get("cosine") for r in rows["thread"]]
  _no_workers_left()

  mlp = _tiny_mlp(CLIPConfig.tiny().embed_dim)
  model = CLIP(CLIPConfig.tiny(), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  aes = {
    t: list(AestheticScorer(model, mlp, batch_size=BATCH, workers=2, worker_type=t).iter_scores(files))
    for t in ("thread", "process")
  }
  assert aes["thread"] == aes["process"] and "error" in aes["process"][6]
  want = AestheticScorer(model, mlp, batch_size=BATCH).score(files[:4])
  np.testing.assert_array_equal([r["aesthetic"] for r in aes["process"][:4]], want)
  _no_workers_left()


def _with(scorer, worker_type):
  clone = object.__new__(Scorer)
  clone.__dict__.update(scorer.__dict__, worker_type=worker_type, workers=2)
  return clone


def _tiny_mlp(dim):
  return AestheticMLP((dim, 8, 1), rngs=nnx.Rngs(1))


def _decode_stream(files, compute, *, worker_type="process", workers=2, prefetch=2, items=None):
  pre = PreprocessConfig(mode="pad", size=16)
  items = items if items is not None else [(p, i) for i, p in enumerate(files)]
  return scorer_mod._stream(items, BATCH, pre, workers, compute, worker_type=worker_type, prefetch=prefetch)


def _count(pixels, extras):
  return np.asarray(extras, np.float32)


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_exception_in_compute_stops_the_workers_after_earlier_rows(files, worker_type):
  calls = []

  def compute(pixels, extras):
    calls.append(len(extras))
    if len(calls) == 3:
      raise RuntimeError("model failed")
    return _count(pixels, extras)

  got = []
  with pytest.raises(RuntimeError, match="model failed"):
    for row in _decode_stream(files, compute, worker_type=worker_type):
      got.append(row[1])
  assert got == list(range(8))  # the two chunks computed before the failure, in order
  _no_workers_left()


@pytest.mark.parametrize("stop", ["keyboard", "signal"])
def test_stop_shuts_the_workers_down(files, stop):
  def compute(pixels, extras):
    if stop == "keyboard":
      raise KeyboardInterrupt
    errors.pending_stop.append(15)  # what the CLI's SIGTERM handler records; the loop checks it
    return _count(pixels, extras)

  want = KeyboardInterrupt if stop == "keyboard" else errors.Interrupted
  try:
    with pytest.raises(want):
      list(_decode_stream(files, compute))
  finally:
    errors.pending_stop.clear()
  _no_workers_left()


def test_closing_the_stream_early_shuts_the_workers_down(files):
  stream = _decode_stream(files, _count)
  first = next(stream)
  assert first[1] == 0 and first[3] is None
  assert _spawned_workers()  # running while the stream is open
  stream.close()
  _no_workers_left()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_read_ahead_is_bounded(files, prefetch):
  """Items are pulled lazily: at most (prefetch + 2) chunks ahead of the rows handed out (prefetch decoding, one
  computing, one waiting for its rows), and the pipeline does read that far ahead (decode overlaps compute)."""
  state = {"pulled": 0, "yielded": 0, "ahead": 0, "loads": 0, "loads_ahead": 0}
  many = files * 4  # 56 items, 14 chunks

  def items():
    for i, p in enumerate(many):
      state["pulled"] += 1
      state["ahead"] = max(state["ahead"], state["pulled"] - state["yielded"])
      yield p, i

  def load(src):  # a custom decoder: runs on threads, in this process, so it can count
    state["loads"] += 1
    state["loads_ahead"] = max(state["loads_ahead"], state["loads"] - state["yielded"])
    return scorer_mod.load_image(src)

  pre = PreprocessConfig(mode="pad", size=16)
  stream = scorer_mod._stream(items(), BATCH, pre, 2, _count, load=load, prefetch=prefetch)
  out = []
  for row in stream:
    out.append(row[1])
    state["yielded"] += 1
  assert out == list(range(len(many)))
  assert state["ahead"] == (prefetch + 2) * BATCH
  assert state["loads_ahead"] <= (prefetch + 2) * BATCH
  assert state["loads"] == len(many)


def test_failing_items_come_after_the_chunks_read_before_them(files):
  def items():
    for i, p in enumerate(files[:10]):
      if i == 9:
        raise TypeError("a bad item")
      yield p, i

  got = []
  with pytest.raises(TypeError, match="a bad item"):
    for row in _decode_stream(files, _count, items=items()):
      got.append(row[1])
  assert got == list(range(8))  # two whole chunks; the partial chunk with the bad item is dropped, as before
  _no_workers_left()


def test_worker_type_is_checked(scorer):
  with pytest.raises(ValueError, match="worker_type"):
    list(_decode_stream([], _count, worker_type="fork"))
  with pytest.raises(ValueError, match="worker_type"):
    Scorer(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), scorer.tokenizer, worker_type="x")
