"""TFDS preference builders: each builder prepares a tiny fixture written in the upstream layout (8x8 PNG/JPEG
images, one bad record of every applicable kind) and must round-trip the valid records exactly, in source order,
while counting and reporting every record it leaves out."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from hps_jax.data import datasets as D  # noqa: E402


def _image(seed: int, fmt: str = "PNG") -> bytes:
  arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  return buf.getvalue()


def _truncated(seed: int) -> bytes:
  data = _image(seed)
  return data[: len(data) // 2]


GARBAGE = b"this is not an image at all"


def _write(path, data: bytes) -> bytes:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return data


def _write_json(path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj), encoding="utf-8")


def _assert_records(source, expected: list[dict]) -> None:
  assert len(source) == len(expected)
  for i, want in enumerate(expected):
    got = source[i]
    assert set(got) == {"id", "prompt", "images", "ranks", "chosen", "user"}
    assert got["user"] == want.get("user", "") and isinstance(got["user"], str)  # who chose, "" when not given
    assert got["id"] == want["id"] and isinstance(got["id"], str)
    assert got["prompt"] == want["prompt"] and isinstance(got["prompt"], str)
    assert isinstance(got["images"], list) and all(type(b) is bytes for b in got["images"])
    assert got["images"] == want["images"]
    assert got["ranks"].dtype == np.int32
    np.testing.assert_array_equal(got["ranks"], np.asarray(want["ranks"], np.int32))
    assert type(got["chosen"]) is int and got["chosen"] == want["chosen"]


def _assert_report(report: dict, kept: int, bad: dict, skipped: dict | None = None) -> None:
  assert report["kept"] == kept
  assert report["bad"] == bad
  assert report["skipped"] == (skipped or {})
  assert set(report["examples"]) == set(bad) | set(skipped or {})
  for kind, n in {**bad, **(skipped or {})}.items():
    assert len(report["examples"][kind]) == min(n, D.MAX_EXAMPLES)


# ---------------------------------------------------------------------------------------------------------------
# hpd_v1


def test_hpd_v1(tmp_path, caplog):
  m = tmp_path / "hpd_v1"
  img = m / "preference_images"
  a = [_write(img / "a0.png", _image(0)), _write(img / "a1.png", _image(1))]
  b = [_write(img / f"b{j}.jpg", _image(10 + j, "JPEG")) for j in range(3)]
  _write(img / "c0.png", _image(20))
  _write(img / "e0.png", _image(30))
  _write(img / "e1.png", _truncated(31))
  t = [_write(img / "t0.png", _image(40)), _write(img / "t1.png", _image(41))]
  train = [
    {
      "human_preference": 1,
      "prompt": "a red bicycle",
      "id": "r0",
      "user_hash": "u",
      "contain_name": False,
      "file_path": ["preference_images/a0.png", "preference_images/a1.png"],
    },
    # paths without the preference_images/ prefix, an integer id
    {
      "human_preference": 0,
      "prompt": "a café at night",
      "id": 17,
      "user_hash": "u",
      "contain_name": True,
      "file_path": ["b0.jpg", "b1.jpg", "b2.jpg"],
    },
    {"human_preference": 0, "prompt": "missing", "id": "r2", "file_path": ["c0.png", "nope.png"]},
    {"human_preference": 2, "prompt": "out of range", "id": "r3", "file_path": ["a0.png", "a1.png"]},
    {"human_preference": 0, "prompt": "corrupt", "id": "r4", "file_path": ["e0.png", "e1.png"]},
    {"human_preference": 0, "prompt": "one image", "id": "r5", "file_path": ["a0.png"]},
    {"human_preference": "first", "prompt": "bad label", "id": "r6", "file_path": ["a0.png", "a1.png"]},
    "not a record",
  ]
  _write_json(m / "preference_train.json", train)
  _write_json(
    m / "preference_test.json",
    [{"human_preference": 0, "prompt": "test prompt", "id": "t0", "file_path": ["t0.png", "t1.png"]}],
  )

  with caplog.at_level(logging.WARNING, logger=D.__name__):
    builder = D.prepare("hpd_v1", m, tmp_path / "tfds")
  assert builder.is_prepared() and str(builder.data_path).endswith("hpd_v1/1.1.0")
  assert any("'train'" in r.getMessage() and "missing_image=1" in r.getMessage() for r in caplog.records)
  assert not any("'test'" in r.getMessage() for r in caplog.records)  # nothing left out there
  assert any(str(builder.data_path / "bad_records_train.json") in r.getMessage() for r in caplog.records)
  assert builder.bad_records["train"].kept == 2 and sum(builder.bad_records["train"].counts.values()) == 6

  src = D.data_source("hpd_v1", "train", m, tmp_path / "tfds")
  _assert_records(
    src,
    [
      {"id": "r0", "prompt": "a red bicycle", "images": a, "ranks": [1, 0], "chosen": 1, "user": "u"},
      {"id": "17", "prompt": "a café at night", "images": b, "ranks": [0, 1, 1], "chosen": 0, "user": "u"},
    ],
  )
  _assert_records(
    D.data_source("hpd_v1", "test", m, tmp_path / "tfds"),
    [{"id": "t0", "prompt": "test prompt", "images": t, "ranks": [0, 1], "chosen": 0}],
  )

  report = D.bad_record_report(builder, "train")
  _assert_report(
    report,
    kept=2,
    bad={
      "bad_json": 1,
      "bad_label": 1,
      "too_few_images": 1,
      "index_out_of_range": 1,
      "missing_image": 1,
      "corrupt_image": 1,
    },
  )
  ex = report["examples"]
  assert ex["missing_image"][0]["id"] == "r2" and "nope.png" in ex["missing_image"][0]["detail"]
  assert ex["index_out_of_range"][0]["id"] == "r3"
  assert ex["corrupt_image"][0]["id"] == "r4" and "e1.png" in ex["corrupt_image"][0]["detail"]
  assert ex["too_few_images"][0]["id"] == "r5"
  assert ex["bad_label"][0]["id"] == "r6"
  assert ex["bad_json"][0]["id"] == "train-7"
  _assert_report(D.bad_record_report(builder, "test"), kept=1, bad={})


# ---------------------------------------------------------------------------------------------------------------
# hpd_v2


def test_hpd_v2(tmp_path):
  m = tmp_path / "hpd_v2"
  p0 = [_write(m / "train" / "p0a.png", _image(0)), _write(m / "train" / "p0b.jpg", _image(1, "JPEG"))]
  p1 = [_write(m / "train" / "p1a.png", _image(2)), _write(m / "train" / "p1b.png", _image(3))]
  q0 = [_write(m / "test" / f"q0{c}.png", _image(10 + j)) for j, c in enumerate("abc")]
  q1 = [_write(m / "test" / f"q1{c}.jpg", _image(20 + j, "JPEG")) for j, c in enumerate("abc")]
  _write(m / "test" / "bad.png", GARBAGE)
  _write_json(
    m / "train.json",
    [
      {"human_preference": [0, 1], "prompt": "two cats", "file_path": ["p0a.png", "p0b.jpg"], "user_hash": "x"},
      {"human_preference": [1, 0], "prompt": "a lighthouse", "file_path": ["p1a.png", "p1b.png"]},
      {"human_preference": [1, 1], "prompt": "no single choice", "file_path": ["p1a.png", "p1b.png"]},
      {"human_preference": 2, "prompt": "index too large", "file_path": ["p1a.png", "p1b.png"]},
      {"human_preference": [1, 0], "prompt": "gone", "file_path": ["p1a.png", "gone.png"]},
    ],
  )
  _write_json(
    m / "test.json",
    [
      {
        "prompt": "ranked",
        "image_path": ["q0a.png", "q0b.png", "q0c.png"],
        "rank": [2, 1, 3],
        "raw_annotations": [[2, 1, 3]],
      },
      # a tie for the best rank (the first wins) and paths that already name the split folder
      {
        "prompt": "tied",
        "image_path": ["test/q1a.jpg", "test/q1b.jpg", "test/q1c.jpg"],
        "rank": [1, 1, 2],
        "raw_annotations": [],
      },
      {"prompt": "corrupt", "image_path": ["q0a.png", "bad.png"], "rank": [1, 2], "raw_annotations": []},
      {"prompt": "rank length", "image_path": ["q0a.png", "q0b.png"], "rank": [1], "raw_annotations": []},
      {"prompt": "one image", "image_path": ["q0a.png"], "rank": [1], "raw_annotations": []},
    ],
  )
  data_dir = tmp_path / "tfds"
  _assert_records(
    D.data_source("hpd_v2", "train", m, data_dir),
    [
      {"id": "train-0", "prompt": "two cats", "images": p0, "ranks": [1, 0], "chosen": 1},
      {"id": "train-1", "prompt": "a lighthouse", "images": p1, "ranks": [0, 1], "chosen": 0},
    ],
  )
  _assert_records(
    D.data_source("hpd_v2", "test", m, data_dir),
    [
      {"id": "test-0", "prompt": "ranked", "images": q0, "ranks": [2, 1, 3], "chosen": 1},
      {"id": "test-1", "prompt": "tied", "images": q1, "ranks": [1, 1, 2], "chosen": 0},
    ],
  )
  builder = D.prepare("hpd_v2", m, data_dir)
  train = D.bad_record_report(builder, "train")
  _assert_report(train, kept=2, bad={"bad_label": 1, "index_out_of_range": 1, "missing_image": 1})
  assert train["examples"]["bad_label"][0]["id"] == "train-2"
  assert "gone.png" in train["examples"]["missing_image"][0]["detail"]
  test = D.bad_record_report(builder, "test")
  _assert_report(test, kept=2, bad={"corrupt_image": 1, "bad_label": 1, "too_few_images": 1})
  assert test["examples"]["corrupt_image"][0]["id"] == "test-2"


# ---------------------------------------------------------------------------------------------------------------
# pickapic


def _pick_rows(rows: list[dict], with_flags: bool = True, with_id: bool = True):
  cols = {
    "caption": pa.string(),
    "jpg_0": pa.binary(),
    "jpg_1": pa.binary(),
    "label_0": pa.float64(),
    "label_1": pa.float64(),
    "image_0_url": pa.string(),
  }
  if with_flags:
    cols.update(has_label=pa.bool_(), are_different=pa.bool_())
  if with_id:
    cols["ranking_id"] = pa.int64()
  full = [{"image_0_url": "http://example.invalid/0.jpg", "has_label": True, "are_different": True, **r} for r in rows]
  return pa.table({c: pa.array([r.get(c) for r in full], type=t) for c, t in cols.items()})


@pytest.fixture
def pickapic_dir(tmp_path):
  m = tmp_path / "pickapic"
  (m / "data").mkdir(parents=True)
  img = {k: _image(100 + k, "JPEG") for k in range(20)}
  train_a = [
    {"caption": "a fox", "jpg_0": img[0], "jpg_1": img[1], "label_0": 1.0, "label_1": 0.0, "ranking_id": 100},
    {"caption": "a tie", "jpg_0": img[2], "jpg_1": img[3], "label_0": 0.5, "label_1": 0.5, "ranking_id": 101},
    {
      "caption": "unlabeled",
      "jpg_0": img[4],
      "jpg_1": img[5],
      "label_0": None,
      "label_1": None,
      "has_label": False,
      "ranking_id": 102,
    },
  ]
  train_b = [
    {"caption": "an owl", "jpg_0": img[6], "jpg_1": img[7], "label_0": 0.0, "label_1": 1.0, "ranking_id": 103},
    {
      "caption": "same",
      "jpg_0": img[8],
      "jpg_1": img[8],
      "label_0": 1.0,
      "label_1": 0.0,
      "are_different": False,
      "ranking_id": 104,
    },
    {"caption": "corrupt", "jpg_0": img[9], "jpg_1": GARBAGE, "label_0": 1.0, "label_1": 0.0, "ranking_id": 105},
    {"caption": "odd label", "jpg_0": img[10], "jpg_1": img[11], "label_0": 0.3, "label_1": 0.7, "ranking_id": 106},
  ]
  pq.write_table(_pick_rows(train_a), m / "data" / "train-00000-of-00002.parquet")
  pq.write_table(_pick_rows(train_b), m / "data" / "train-00001-of-00002.parquet", row_group_size=2)
  test = [
    {"caption": "test one", "jpg_0": img[12], "jpg_1": img[13], "label_0": 0.0, "label_1": 1.0},
    {"caption": "test two", "jpg_0": img[14], "jpg_1": img[15], "label_0": 1.0, "label_1": 0.0},
  ]
  pq.write_table(_pick_rows(test, with_flags=False, with_id=False), m / "data" / "test-00000-of-00001.parquet")
  unique = [{"caption": "unique", "jpg_0": img[16], "jpg_1": img[17], "label_0": 1.0, "label_1": 0.0, "ranking_id": 7}]
  pq.write_table(_pick_rows(unique), m / "data" / "validation_unique-00000-of-00001.parquet")
  return m, img


def test_pickapic_default_excludes_ties(tmp_path, pickapic_dir):
  m, img = pickapic_dir
  builder = D.prepare("pickapic", m, tmp_path / "tfds")
  assert builder.builder_config.name == "default" and str(builder.data_path).endswith("pickapic/default/1.1.0")
  assert set(builder.info.splits) == {"train", "test", "validation_unique"}
  _assert_records(
    D.data_source("pickapic", "train", m, tmp_path / "tfds"),
    [
      {"id": "100", "prompt": "a fox", "images": [img[0], img[1]], "ranks": [0, 1], "chosen": 0},
      {"id": "103", "prompt": "an owl", "images": [img[6], img[7]], "ranks": [1, 0], "chosen": 1},
    ],
  )
  _assert_records(
    D.data_source("pickapic", "test", m, tmp_path / "tfds", "default"),
    [
      {"id": "test-0", "prompt": "test one", "images": [img[12], img[13]], "ranks": [1, 0], "chosen": 1},
      {"id": "test-1", "prompt": "test two", "images": [img[14], img[15]], "ranks": [0, 1], "chosen": 0},
    ],
  )
  _assert_records(
    D.data_source("pickapic", "validation_unique", m, tmp_path / "tfds"),
    [{"id": "7", "prompt": "unique", "images": [img[16], img[17]], "ranks": [0, 1], "chosen": 0}],
  )
  report = D.bad_record_report(builder, "train")
  _assert_report(
    report, kept=2, bad={"corrupt_image": 1, "bad_label": 1}, skipped={"tie": 1, "unlabeled": 1, "not_different": 1}
  )
  assert [e["id"] for e in report["examples"]["tie"]] == ["101"]
  assert [e["id"] for e in report["examples"]["not_different"]] == ["104"]
  assert [e["id"] for e in report["examples"]["corrupt_image"]] == ["105"]
  _assert_report(D.bad_record_report(builder, "test"), kept=2, bad={})


def test_pickapic_with_ties(tmp_path, pickapic_dir):
  m, img = pickapic_dir
  builder = D.prepare("pickapic", m, tmp_path / "tfds", builder_config="with_ties")
  assert str(builder.data_path).endswith("pickapic/with_ties/1.1.0")
  _assert_records(
    D.data_source("pickapic", "train", m, tmp_path / "tfds", "with_ties"),
    [
      {"id": "100", "prompt": "a fox", "images": [img[0], img[1]], "ranks": [0, 1], "chosen": 0},
      {"id": "101", "prompt": "a tie", "images": [img[2], img[3]], "ranks": [0, 0], "chosen": 0},
      {"id": "103", "prompt": "an owl", "images": [img[6], img[7]], "ranks": [1, 0], "chosen": 1},
    ],
  )
  _assert_report(
    D.bad_record_report(builder, "train"),
    kept=3,
    bad={"corrupt_image": 1, "bad_label": 1},
    skipped={"unlabeled": 1, "not_different": 1},
  )


# ---------------------------------------------------------------------------------------------------------------
# preference_jsonl


def test_preference_jsonl(tmp_path):
  m = tmp_path / "jsonl"
  a = [_write(m / "imgs" / "a.png", _image(0)), _write(m / "imgs" / "b.jpg", _image(1, "JPEG"))]
  c = [_write(tmp_path / "elsewhere" / f"c{j}.png", _image(10 + j)) for j in range(3)]
  _write(m / "imgs" / "bad.png", _truncated(5))
  lines = [
    json.dumps({"prompt": "first", "images": ["imgs/a.png", "imgs/b.jpg"], "chosen": 0, "id": "j1"}),
    "",
    json.dumps(
      {
        "prompt": "absolute paths",
        "images": [str(tmp_path / "elsewhere" / f"c{j}.png") for j in range(3)],
        "chosen": 1,
        "ranks": [2, 0, 1],
      }
    ),
    '{"prompt": "broken", "images": [',
    json.dumps({"prompt": "index", "images": ["imgs/a.png", "imgs/b.jpg"], "chosen": 5}),
    json.dumps({"prompt": "missing", "images": ["imgs/a.png", "imgs/nope.png"], "chosen": 0}),
    json.dumps({"prompt": "corrupt", "images": ["imgs/a.png", "imgs/bad.png"], "chosen": 0}),
    json.dumps({"prompt": "alone", "images": ["imgs/a.png"], "chosen": 0}),
    json.dumps({"prompt": "inconsistent", "images": ["imgs/a.png", "imgs/b.jpg"], "chosen": 1, "ranks": [0, 1]}),
    "[1, 2]",
  ]
  (m / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  data_dir = tmp_path / "tfds"
  builder = D.prepare("preference_jsonl", m, data_dir)
  assert set(builder.info.splits) == {"train"}
  expected = [
    {"id": "j1", "prompt": "first", "images": a, "ranks": [0, 1], "chosen": 0},
    {"id": "train-3", "prompt": "absolute paths", "images": c, "ranks": [2, 0, 1], "chosen": 1},
  ]
  src = D.data_source("preference_jsonl", "train", m, data_dir)
  _assert_records(src, expected)
  assert src[-1]["id"] == "train-3" and [r["id"] for r in src.__getitems__([1, 0])] == ["train-3", "j1"]
  with pytest.raises(IndexError):
    src[2]

  report = D.bad_record_report(builder, "train")
  _assert_report(
    report,
    kept=2,
    bad={
      "bad_json": 2,
      "index_out_of_range": 1,
      "missing_image": 1,
      "corrupt_image": 1,
      "too_few_images": 1,
      "bad_label": 1,
    },
  )
  ex = report["examples"]
  assert [e["id"] for e in ex["bad_json"]] == ["train-4", "train-10"]
  assert ex["bad_json"][0]["detail"].startswith("train.jsonl:4:")
  assert ex["bad_json"][1]["detail"].startswith("train.jsonl:10:")
  assert ex["index_out_of_range"][0]["detail"].startswith("train.jsonl:5:")
  assert "nope.png" in ex["missing_image"][0]["detail"]

  # Prepared once: later calls reuse the data and do not need manual_dir any more.
  for f in m.rglob("*"):
    if f.is_file():
      f.unlink()
  _assert_records(D.data_source("preference_jsonl", "train", m, data_dir), expected)


def test_jsonl_synthetic_round_trip_feeds_pipeline(tmp_path):
  import grain

  from hps_jax.data.pipeline import RecordTransform, eval_dataset
  from hps_jax.data.preprocess import PreprocessConfig
  from hps_jax.data.synthetic import SyntheticPreference, write_jsonl

  syn = SyntheticPreference(5, seed=3, split="validation", image_size=16)
  write_jsonl(syn, tmp_path / "m", "validation")
  src = D.data_source("preference_jsonl", "validation", tmp_path / "m", tmp_path / "tfds")
  _assert_records(src, [syn[i] for i in range(len(syn))])
  assert len(grain.MapDataset.source(src)) == 5

  def tokenizer(texts, context_length):
    return np.ones((len(texts), context_length), np.int32)

  transform = RecordTransform(tokenizer, PreprocessConfig(mode="clip", size=16), max_images=4, context_length=8)
  batches = list(eval_dataset(src, transform, batch_size=2))
  assert [len(b["chosen"]) for b in batches] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate([b["chosen"] for b in batches]), [syn[i]["chosen"] for i in range(5)])


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
  "name, present, expected",
  [
    ("hpd_v1", ["preference_train.json"], "preference_test.json"),
    ("hpd_v2", ["train.json", "test.json", "train/"], "test/"),
    ("pickapic", ["data/"], "parquet"),
    ("preference_jsonl", ["notes.txt"], ".jsonl"),
  ],
)
def test_missing_manual_files_give_a_clear_error(tmp_path, name, present, expected):
  m = tmp_path / "manual"
  m.mkdir()
  for p in present:
    if p.endswith("/"):
      (m / p).mkdir()
    else:
      _write_json(m / p, [])
  with pytest.raises(ValueError, match=expected) as err:
    D.prepare(name, m, tmp_path / "tfds")
  assert str(m) in str(err.value)
  with pytest.raises(ValueError, match="not a directory"):
    D.prepare(name, tmp_path / "absent", tmp_path / "tfds")


def test_usage_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset"):
    D.prepare("hpd_v3", tmp_path, tmp_path / "tfds")
  with pytest.raises(ValueError, match="no builder config"):
    D.prepare("pickapic", tmp_path, tmp_path / "tfds", builder_config="ties")
  with pytest.raises(ValueError, match="no builder config"):
    D.prepare("hpd_v1", tmp_path, tmp_path / "tfds", builder_config="default")


def test_split_without_valid_records_fails(tmp_path):
  m = tmp_path / "m"
  m.mkdir()
  (m / "train.jsonl").write_text('{"prompt": "x", "images": ["a.png", "b.png"], "chosen": 0}\nnot json\n')
  with pytest.raises(ValueError, match="no valid record") as err:
    D.prepare("preference_jsonl", m, tmp_path / "tfds")
  assert "missing_image=1" in str(err.value) and "bad_json=1" in str(err.value)
  builder = D.BUILDERS["preference_jsonl"](data_dir=str(tmp_path / "tfds"))
  assert not builder.is_prepared()
  with pytest.raises(FileNotFoundError, match="bad-record report"):
    D.bad_record_report(builder, "train")


def test_unknown_split(tmp_path):
  m = tmp_path / "m"
  _write(m / "a.png", _image(0))
  _write(m / "b.png", _image(1))
  (m / "train.jsonl").write_text('{"prompt": "x", "images": ["a.png", "b.png"], "chosen": 1}\n')
  with pytest.raises(ValueError, match="no split 'test'"):
    D.data_source("preference_jsonl", "test", m, tmp_path / "tfds")
