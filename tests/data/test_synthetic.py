"""The synthetic preference set: determinism, split separation, schema, and that the preference is really a
function of prompt + pixels (a hand-written, non-learned oracle recovers every rank), plus the JSONL export."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from hps_jax.data.synthetic import COLORS, SHAPES, SyntheticPreference, make_record, write_jsonl
from hps_jax.preference.evaluate import preference_report


def _decode(data: bytes) -> np.ndarray:
  img = Image.open(io.BytesIO(data))
  assert img.format == "PNG" and img.mode == "RGB"
  return np.asarray(img)


def _same(a: dict, b: dict):
  assert a["id"] == b["id"] and a["prompt"] == b["prompt"] and a["chosen"] == b["chosen"]
  np.testing.assert_array_equal(a["ranks"], b["ranks"])
  assert len(a["images"]) == len(b["images"])
  for x, y in zip(a["images"], b["images"]):
    np.testing.assert_array_equal(_decode(x), _decode(y))


def _prompt_attributes(prompt: str) -> tuple[str, str]:
  words = prompt.split()
  colors, shapes = [w for w in words if w in COLORS], [w for w in words if w in SHAPES]
  assert len(colors) == 1 and len(shapes) == 1, prompt
  return colors[0], shapes[0]


def _segment(img: np.ndarray) -> np.ndarray:
  """Foreground mask: pixels far from the background colour (the median of the one-pixel border, which the shape
  rarely reaches)."""
  border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
  bg = np.median(border.astype(np.float64), axis=0)
  return np.linalg.norm(img.astype(np.float64) - bg, axis=-1) > 60


def _mean_color(img: np.ndarray) -> np.ndarray:
  return img[_segment(img)].astype(np.float64).mean(axis=0)


def _nearest_color(img: np.ndarray) -> str:
  m = _mean_color(img)
  return min(COLORS, key=lambda c: np.linalg.norm(m - np.asarray(COLORS[c])))


def _shape(img: np.ndarray) -> str:
  """By how much of its bounding box the shape fills: square ~1, circle ~pi/4, triangle ~1/2."""
  fg = _segment(img)
  rows, cols = np.flatnonzero(fg.sum(1) >= 2), np.flatnonzero(fg.sum(0) >= 2)  # isolated noise pixels drop out
  box = fg[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
  fill = box.mean()
  return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def _oracle_ranks(prompt: str, images: list) -> np.ndarray:
  """0: named colour and shape; 1: named shape, another colour; 2: another shape (the generator's grading)."""
  color, shape = _prompt_attributes(prompt)
  out = []
  for data in images:
    img = _decode(data)
    out.append(0 if (_shape(img), _nearest_color(img)) == (shape, color) else 1 if _shape(img) == shape else 2)
  return np.asarray(out)


def test_constants():
  assert len(COLORS) >= 5 and 2 <= len(SHAPES) <= 4
  cols = np.asarray(list(COLORS.values()), np.float64)
  dists = np.linalg.norm(cols[:, None] - cols[None], axis=-1)[np.triu_indices(len(cols), 1)]
  assert dists.min() > 100  # well separated


def test_records_are_deterministic_and_order_free():
  a, b = SyntheticPreference(20, seed=7), SyntheticPreference(50, seed=7)  # num_records is not part of the seed
  forward = [a[i] for i in range(20)]
  for i in reversed(range(20)):
    _same(forward[i], b[i])
    _same(forward[i], a[i])
  _same(a[-1], a[19])
  with pytest.raises(IndexError):
    a[20]
  with pytest.raises(IndexError):
    a[-21]
  assert len(a) == 20 and forward[3]["id"] == "train-3"


def test_seeds_and_splits_differ():
  def key(rec):
    return (rec["prompt"], tuple(rec["images"]))

  train = {key(r) for r in SyntheticPreference(30, seed=0, split="train")}
  test = {key(r) for r in SyntheticPreference(30, seed=0, split="test")}
  other_seed = {key(r) for r in SyntheticPreference(30, seed=1, split="train")}
  assert len(train) == 30 and not train & test and not train & other_seed
  assert SyntheticPreference(3, split="test")[0]["id"] == "test-0"


def test_schema_counts_and_ranks():
  src = SyntheticPreference(120, seed=2, split="train")
  counts = set()
  for rec in src:
    assert set(rec) == {"id", "prompt", "images", "ranks", "chosen"}
    n = len(rec["images"])
    counts.add(n)
    assert all(isinstance(x, bytes) for x in rec["images"])
    assert isinstance(rec["ranks"], np.ndarray) and rec["ranks"].dtype == np.int32 and rec["ranks"].shape == (n,)
    assert isinstance(rec["chosen"], int) and 0 <= rec["chosen"] < n
    assert rec["ranks"][rec["chosen"]] == 0 and np.sum(rec["ranks"] == 0) == 1  # the unique best
    assert set(rec["ranks"].tolist()) <= {0, 1, 2} and 1 in rec["ranks"]  # always a right-shape, wrong-colour one
    _prompt_attributes(rec["prompt"])
  assert counts == {2, 3, 4}
  assert {len(r["images"]) for r in SyntheticPreference(20, min_images=3, max_images=3)} == {3}
  for lo, hi in ((1, 4), (3, 2)):
    with pytest.raises(ValueError):
      SyntheticPreference(5, min_images=lo, max_images=hi)


@pytest.mark.parametrize("size", [48, 32])
def test_images_decode_to_size_and_chosen_shows_the_named_colour(size):
  src = SyntheticPreference(30, seed=4, split="test", image_size=size)
  for rec in src:
    imgs = [_decode(x) for x in rec["images"]]
    assert all(im.shape == (size, size, 3) and im.dtype == np.uint8 for im in imgs)
    color, _ = _prompt_attributes(rec["prompt"])
    err = np.abs(_mean_color(imgs[rec["chosen"]]) - np.asarray(COLORS[color])).max()
    assert err < 30, (rec["prompt"], _mean_color(imgs[rec["chosen"]]))


def test_make_record_attributes_match_pixels():
  rng = np.random.default_rng(0)
  for n in (2, 3, 4) * 10:
    rec = make_record(rng, 48, n, record_id="x")
    assert len(rec["images"]) == n and rec["id"] == "x"
    color, shape = _prompt_attributes(rec["prompt"])
    assert rec["attributes"][rec["chosen"]] == (color, shape)
    for data, (c, s) in zip(rec["images"], rec["attributes"]):
      img = _decode(data)
      assert (_nearest_color(img), _shape(img)) == (c, s)


def test_a_hand_written_oracle_solves_it_and_chance_does_not():
  src = SyntheticPreference(200, seed=5, split="test")
  recs = list(src)
  ranks = [r["ranks"] for r in recs]
  # The full oracle (colour + shape, no learning) recovers every graded rank, hence 100% n-way and pairwise.
  oracle = [_oracle_ranks(r["prompt"], r["images"]) for r in recs]
  for r, o in zip(recs, oracle):
    np.testing.assert_array_equal(o, r["ranks"], err_msg=r["prompt"])
  full = preference_report([-o.astype(np.float64) for o in oracle], ranks)
  assert full["accuracy"] == 1.0 and full["pairwise_accuracy"] == 1.0
  # Colour alone (minus the distance of each image's mean colour to the named one) already does far better than
  # chance; it fails only where a wrong-shape distractor happens to have the named colour.
  colour = [
    np.asarray(
      [-np.linalg.norm(_mean_color(_decode(x)) - COLORS[_prompt_attributes(r["prompt"])[0]]) for x in r["images"]]
    )
    for r in recs
  ]
  rep_c = preference_report(colour, ranks)
  assert rep_c["accuracy"] >= 0.8
  # Random scores land near the random-guess expectation (mean of 1/n, about 0.36 here).
  rng = np.random.default_rng(0)
  rand = preference_report([rng.random(len(r)) for r in ranks], ranks)
  assert 0.3 < rand["random_expectation"] < 0.42
  assert abs(rand["accuracy"] - rand["random_expectation"]) < 0.12


def test_write_jsonl_round_trip(tmp_path):
  src = SyntheticPreference(6, seed=1, split="validation")
  path = write_jsonl(src, tmp_path / "data", "validation")
  assert path == tmp_path / "data" / "validation.jsonl"
  lines = path.read_text(encoding="utf-8").splitlines()
  assert len(lines) == len(src)
  for i, line in enumerate(lines):
    row, rec = json.loads(line), src[i]
    assert set(row) == {"id", "prompt", "images", "chosen", "ranks"}
    assert row["id"] == rec["id"] and row["prompt"] == rec["prompt"] and row["chosen"] == rec["chosen"]
    assert row["ranks"] == rec["ranks"].tolist()
    assert len(row["images"]) == len(rec["images"])
    for rel, data in zip(row["images"], rec["images"]):
      assert not rel.startswith("/")
      assert (tmp_path / "data" / rel).read_bytes() == data


def test_records_feed_the_pipeline_transform():
  from hps_jax.data.pipeline import RANK_PAD, RecordTransform
  from hps_jax.data.preprocess import PreprocessConfig

  def tokenizer(texts, context_length):
    return np.ones((len(texts), context_length), np.int32)

  tf = RecordTransform(tokenizer, PreprocessConfig(mode="clip", size=32), max_images=4, context_length=8)
  for rec in SyntheticPreference(8, seed=0):
    out = tf(rec)
    n = len(rec["images"])
    assert out["pixels"].shape == (4, 32, 32, 3) and out["mask"].sum() == n
    assert int(out["chosen"]) == rec["chosen"]
    np.testing.assert_array_equal(out["ranks"][:n], rec["ranks"])
    assert (out["ranks"][n:] == RANK_PAD).all()


def test_generation_is_fast():
  import time

  src = SyntheticPreference(60, seed=9)
  t = time.perf_counter()
  n = sum(len(src[i]["images"]) for i in range(len(src)))
  per_image = (time.perf_counter() - t) / n
  assert per_image < 0.02, f"{per_image * 1e3:.1f} ms per image"
