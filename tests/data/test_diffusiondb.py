"""The DiffusionDB reader on synthetic downloads: record order, parquet-over-JSON precedence, the 2M and Large
layouts, member bytes, and how bad members and bad files are reported."""

import io
import json
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from hps_jax.data.diffusiondb import (
  ArchiveReader,
  DiffusionDBError,
  MemberError,
  find_parts,
  iter_diffusiondb,
  read_diffusiondb,
  read_records,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


# ------------------------------------------------------------------------------------------------------------
# builders (also used by tests/adapt/test_label.py)
# ------------------------------------------------------------------------------------------------------------
def pixels(seed: int, size: int = 16) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
  return buf.getvalue()


def write_part(path, members: dict, meta: dict | None = None):
  """A part zip: `members` {name: bytes} in the given order (stored, so bytes can be corrupted in place), then
  the part JSON `part-NNNNNN.json` when `meta` is given."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    for name, data in members.items():
      zf.writestr(name, data)
    if meta is not None:
      zf.writestr(path.stem + ".json", json.dumps(meta))
  return path


def corrupt_member(path, name: str):
  """Flips one data byte of a stored member (its CRC no longer matches)."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(name)
  raw = bytearray(path.read_bytes())
  n_name, n_extra = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
  raw[info.header_offset + 30 + n_name + n_extra + info.file_size // 2] ^= 0xFF
  path.write_bytes(bytes(raw))


def write_parquet(path, rows: list[dict]):
  """DiffusionDB-style metadata: image_name, prompt, part_id, seed, step, cfg, sampler, width, height."""
  cols = {
    "image_name": pa.string(),
    "prompt": pa.string(),
    "part_id": pa.uint16(),
    "seed": pa.uint32(),
    "step": pa.uint16(),
    "cfg": pa.float32(),
    "sampler": pa.uint8(),
    "width": pa.uint16(),
    "height": pa.uint16(),
  }
  full = [{**{"seed": 1, "step": 50, "cfg": 7.0, "sampler": 8, "width": 16, "height": 16}, **r} for r in rows]
  table = pa.table({c: pa.array([r[c] for r in full], t) for c, t in cols.items()})
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(table, path)
  return path


class Skips(list):
  def __call__(self, where, why):
    self.append((where, why))


# ------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path):
  """Part 10 under a_dir/ and part 2 under z_dir/ (path order disagrees with part order); members written out of
  name order; prompts from the parquet (part 10: c.png, a.png) and from the part JSON (the rest)."""
  root = tmp_path / "db"
  write_part(
    root / "a_dir" / "part-000010.zip",
    {
      "c.png": encode(pixels(3)),
      "notes.txt": b"hello",
      "a.png": encode(pixels(1)),
      "b.png": encode(pixels(2)),
      "orphan.png": encode(pixels(4)),
    },
    {
      "a.png": {"p": "json prompt a", "se": 11, "c": 5.0, "st": 30, "sa": "k_lms"},
      "b.png": {"p": "json prompt b", "se": 12, "c": 6.0, "st": 40, "sa": "k_euler"},
    },
  )
  write_part(
    root / "z_dir" / "part-000002.zip",
    {"y.png": encode(pixels(6)), "x.png": encode(pixels(5))},
    {"x.png": {"p": "prompt x"}, "y.png": {"p": "prompt y", "se": 99}},
  )
  write_parquet(
    root / "metadata.parquet",
    [
      {
        "image_name": "a.png",
        "prompt": "parquet prompt a",
        "part_id": 10,
        "seed": 21,
        "step": 25,
        "cfg": 9.5,
        "sampler": 3,
        "width": 640,
        "height": 512,
      },
      {"image_name": "c.png", "prompt": "parquet prompt c", "part_id": 10},
      {"image_name": "elsewhere.png", "prompt": "not in any zip", "part_id": 10},
    ],
  )
  return root


def test_order_precedence_and_skips(db):
  skips = Skips()
  recs = read_diffusiondb(db, skips)
  assert [(r.part, r.name) for r in recs] == [
    ("z_dir/part-000002", "x.png"),
    ("z_dir/part-000002", "y.png"),
    ("a_dir/part-000010", "a.png"),
    ("a_dir/part-000010", "b.png"),
    ("a_dir/part-000010", "c.png"),
  ]
  assert [r.prompt for r in recs] == ["prompt x", "prompt y", "parquet prompt a", "json prompt b", "parquet prompt c"]
  assert [r.part_id for r in recs] == [2, 2, 10, 10, 10]
  a, b, c = recs[2:]
  # parquet fields win over the JSON's; the JSON fills what the parquet lacks
  assert (a.seed, a.step, a.cfg, a.sampler, a.width, a.height) == (21, 25, 9.5, 3, 640, 512)
  assert (b.seed, b.step, b.cfg, b.sampler, b.width, b.height) == (12, 40, 6.0, "k_euler", None, None)
  assert (c.seed, c.step, c.cfg, c.sampler) == (1, 50, 7.0, 8)
  assert recs[1].seed == 99 and recs[0].seed is None
  zp = db / "a_dir" / "part-000010.zip"
  assert a.archive == str(zp) and a.where == f"{zp}:a.png"
  assert [w for w, _ in skips] == [f"{zp}:notes.txt", f"{zp}:orphan.png"]
  assert "not an image member" in skips[0][1] and "no prompt" in skips[1][1]
  # without a prompt requirement the orphan is kept, prompt None
  assert [r.prompt for r in read_diffusiondb(db, Skips(), require_prompt=False)][5] is None
  assert [p.name for p in find_parts(db)] == ["part-000002.zip", "part-000010.zip"]


def test_large_layout_webp_bytes(tmp_path):
  root = tmp_path / "large"
  imgs = {f"{k:02d}.webp": pixels(10 + k) for k in (2, 0, 1)}
  zp = write_part(
    root / "diffusiondb-large-part-1" / "part-000001.zip",
    {n: encode(a, "WEBP") for n, a in imgs.items()},
    {n: {"p": f"p{n[:2]}"} for n in imgs},
  )
  write_parquet(root / "metadata-large.parquet", [{"image_name": "01.webp", "prompt": "from parquet", "part_id": 1}])
  skips = Skips()
  recs = list(iter_diffusiondb(root, skips))
  assert skips == []
  assert [r.name for r in recs] == ["00.webp", "01.webp", "02.webp"]
  assert [r.prompt for r in recs] == ["p00", "from parquet", "p02"]
  assert {r.part for r in recs} == {"diffusiondb-large-part-1/part-000001"}
  with zipfile.ZipFile(zp) as zf:
    for r in recs:
      assert r.data == zf.read(r.name)
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB")), imgs[r.name])
  assert all(r.data is None for r in iter_diffusiondb(root, Skips(), with_bytes=False))


def test_corrupt_member_is_skipped(db):
  zp = db / "z_dir" / "part-000002.zip"
  corrupt_member(zp, "x.png")
  skips = Skips()
  recs = list(iter_diffusiondb(db, skips))
  assert [r.name for r in recs] == ["y.png", "a.png", "b.png", "c.png"]
  assert skips[-1][0] == f"{zp}:x.png" and "cannot read zip member" in skips[-1][1]
  listing = read_diffusiondb(db, Skips())  # the listing itself does not read member data
  with ArchiveReader() as reader, pytest.raises(MemberError, match="Bad CRC"):
    reader.read(listing[0])


def test_bad_files_are_errors_naming_them(db, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    read_diffusiondb(tmp_path / "nowhere", Skips())
  (tmp_path / "empty").mkdir()
  with pytest.raises(DiffusionDBError, match="no part-NNNNNN.zip"):
    read_diffusiondb(tmp_path / "empty", Skips())
  (db / "metadata.parquet").write_bytes(b"PAR1 this is not parquet")
  with pytest.raises(DiffusionDBError, match=r"metadata\.parquet: cannot read parquet"):
    read_diffusiondb(db, Skips())
  write_parquet(db / "metadata.parquet", [{"image_name": "a.png", "prompt": "x", "part_id": 10}])
  pq.write_table(pa.table({"image_name": ["a.png"]}), db / "metadata-bad.parquet")
  with pytest.raises(DiffusionDBError, match=r"metadata-bad\.parquet: missing column\(s\) \['prompt'\]"):
    read_diffusiondb(db, Skips())
  (db / "metadata-bad.parquet").unlink()
  write_part(db / "z_dir" / "part-000002.zip", {"x.png": b"x"}, None)
  with zipfile.ZipFile(db / "z_dir" / "part-000002.zip", "a") as zf:
    zf.writestr("part-000002.json", "[1, 2]")
  with pytest.raises(DiffusionDBError, match=r"part-000002\.zip:part-000002\.json: expected an object"):
    read_diffusiondb(db, Skips())
  (db / "z_dir" / "part-000002.zip").write_bytes(b"not a zip")
  with pytest.raises(DiffusionDBError, match=r"part-000002\.zip: not a readable zip"):
    read_diffusiondb(db, Skips())


def test_read_records_jsonl(tmp_path):
  (tmp_path / "sub").mkdir()
  Image.fromarray(pixels(0)).save(tmp_path / "sub" / "a.png")
  lines = [
    json.dumps({"image": "sub/a.png", "prompt": "p"}),
    '{"image": "b.png"}',
    "{broken",
    json.dumps({"image": "/abs/c.png", "prompt": "q"}),
  ]
  (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
  skips = Skips()
  recs = read_records(tmp_path / "list.jsonl", skips)
  assert [(r.name, r.prompt, r.archive) for r in recs] == [
    (str(tmp_path / "sub" / "a.png"), "p", None),
    ("/abs/c.png", "q", None),
  ]
  assert recs[0].where == str(tmp_path / "sub" / "a.png")
  assert [w.rsplit(":", 1)[1] for w, _ in skips] == ["2", "3"]
  with ArchiveReader() as reader:
    assert reader.read(recs[0]) == recs[0].name
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    read_records(tmp_path / "absent.jsonl", skips)
  (tmp_path / "list.txt").write_text("x")
  with pytest.raises(ValueError, match="expected a DiffusionDB folder"):
    read_records(tmp_path / "list.txt", skips)
