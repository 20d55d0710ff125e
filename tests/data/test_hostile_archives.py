"""Hostile inputs to the readers of paths and archives: the path confinement rule, malformed JSONL (each bad line a
named skip, an unusable file one InputError), DiffusionDB parts that are zip bombs, lie in their headers, hold
ambiguous or unsupported members or broken metadata, and image members that are decompression bombs or truncated.
Every archive is generated here; bombs are small with lowered caps, the real 2 GiB one is in
tests/adapt/test_hostile_label.py."""

import io
import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from hps_jax.data import diffusiondb as ddb
from hps_jax.data import pairs
from hps_jax.data.diffusiondb import (
  ArchiveLimits,
  ArchiveReader,
  DiffusionDBError,
  MemberError,
  iter_diffusiondb,
  read_diffusiondb,
  read_records,
)
from hps_jax.data.images import ImageError, load_image
from hps_jax.data.pairs import read_image_rows
from hps_jax.data.paths import OutsidePathError, confine, safe_basename, safe_member_path
from hps_jax.errors import InputError
from tests.data.test_diffusiondb import Skips, encode, pixels, write_part

MiB = 1024 * 1024


# ------------------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------------------
def deflated_part(path, members: dict, meta: dict | bytes | None = None, compression=zipfile.ZIP_DEFLATED):
  """A part zip, members deflated; a member given as an int is that many zero bytes, streamed (never held)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w", compression) as zf:
    for name, data in members.items():
      if isinstance(data, int):
        with zf.open(name, "w", force_zip64=data > 2**31 - 2) as f:
          chunk = bytes(MiB)
          for start in range(0, data, MiB):
            f.write(chunk[: min(MiB, data - start)])
      else:
        zf.writestr(name, data)
    if meta is not None:
      zf.writestr(path.stem + ".json", meta if isinstance(meta, bytes) else json.dumps(meta))
  return path


def patch_central(path, name: str, *, file_size=None, compress_size=None, flags=None):
  """Rewrites fields of `name`'s central directory entry (what zipfile trusts): a zip whose headers lie."""
  with zipfile.ZipFile(path) as zf:
    pos = zf.start_dir
  raw = bytearray(path.read_bytes())
  while raw[pos : pos + 4] == b"PK\x01\x02":
    n, m, k = struct.unpack("<HHH", raw[pos + 28 : pos + 34])
    if raw[pos + 46 : pos + 46 + n].decode() == name:
      if flags is not None:
        raw[pos + 8 : pos + 10] = struct.pack("<H", flags)
      if compress_size is not None:
        raw[pos + 20 : pos + 24] = struct.pack("<I", compress_size)
      if file_size is not None:
        raw[pos + 24 : pos + 28] = struct.pack("<I", file_size)
      path.write_bytes(bytes(raw))
      return path
    pos += 46 + n + m + k
  raise KeyError(name)


def png_claiming(width: int, height: int) -> bytes:
  """A small PNG whose IHDR (CRC fixed up) declares width x height pixels: a decompression bomb by its header."""
  import zlib

  data = bytearray(encode(pixels(0, 8)))
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def by_where(skips) -> dict:
  return {w: why for w, why in skips}


# ------------------------------------------------------------------------------------------------------------
# the confinement rule
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "path, inside",
  [
    ("a.png", "a.png"),
    ("sub/./a.png", "sub/a.png"),
    ("sub/../a.png", "a.png"),
    ("sub//a.png", "sub/a.png"),
    ("../a.png", None),
    ("sub/../../a.png", None),
    ("../root/a.png", "a.png"),  # leaves and comes back: lexically inside
    ("..", None),
    ("....png", "....png"),
  ],
)
def test_confine_relative_paths(tmp_path, path, inside):
  root = tmp_path / "root"
  if inside is None:
    with pytest.raises(OutsidePathError, match=r"escapes .*root \(pass --allow-outside-paths to allow\)"):
      confine(path, root)
    assert confine(path, root, allow_outside=True) == os.path.normpath(os.path.join(root, path))
  else:
    assert confine(path, root) == str(root / inside)


def test_confine_absolute_and_unusable_paths(tmp_path):
  assert confine("/etc/hosts", tmp_path) == "/etc/hosts"  # absolute: as written (module docstring of paths)
  assert confine("/data//x/../y.png", tmp_path) == "/data/y.png"
  assert isinstance(OutsidePathError("x"), InputError)
  for bad, words in [("", "empty"), ("a\x00b.png", "NUL"), ("x\udfffy.png", "lone surrogate"), (7, "string")]:
    for allow in (False, True):
      with pytest.raises(OutsidePathError, match=words):
        confine(bad, tmp_path, allow_outside=allow)


@pytest.mark.parametrize(
  "name, safe",
  [
    ("a.png", "a.png"),
    ("sub/dir/a.png", "sub/dir/a.png"),
    ("../a.png", None),
    ("a/../../b.png", None),
    ("/abs.png", None),
    ("C:/x.png", None),
    ("a\\..\\b.png", None),
    ("./a.png", None),
    ("a//b.png", None),
    ("a.png/", None),
    ("tab\t.png", None),
    ("esc\x1b[31m.png", None),
    ("x\udfffy.png", None),
    ("", None),
    ("dots.", None),
    ("ünïcödé.png", "ünïcödé.png"),
  ],
)
def test_safe_member_path(name, safe):
  got = safe_member_path(name)
  assert (got.as_posix() if got is not None else None) == safe
  base = safe_basename(name)
  assert base and "/" not in base and "\\" not in base and base not in (".", "..")
  base.encode("utf-8")


# ------------------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------------------
def test_jsonl_bad_lines_are_named_skips(tmp_path):
  d = tmp_path / "lists"
  d.mkdir()
  lines = [
    json.dumps({"image": "ok.png", "prompt": "fine"}),  # 1
    "{oops",  # 2
    "[1, 2]",  # 3
    '"just a string"',  # 4
    "null",  # 5
    json.dumps({"prompt": "no image"}),  # 6
    json.dumps({"image": "x.png"}),  # 7
    json.dumps({"image": 7, "prompt": "x"}),  # 8
    json.dumps({"image": "x.png", "prompt": 3.5}),  # 9
    '{"image": "x.png", "prompt": "a \\ud800 cat"}',  # 10
    '{"image": "x\\udfffy.png", "prompt": "cat"}',  # 11
    json.dumps({"image": "a\u0000b.png", "prompt": "x"}),  # 12
    json.dumps({"image": "../../etc/passwd", "prompt": "x"}),  # 13
    json.dumps({"image": "", "prompt": "x"}),  # 14
    "[" * 100000 + "]" * 100000,  # 15
    json.dumps({"image": "/abs/elsewhere.png", "prompt": "absolute"}),  # 16
    json.dumps({"image": "sub/../in.png", "prompt": "line\u2028separator"}),  # 17: U+2028 is not a line break
    "",  # 18: blank, ignored
    json.dumps({"image": "c.png", "prompt": "a\u0000cat\u001b[31m\u202e", "extra": {"deep": [1]}}),  # 19
  ]
  f = d / "pairs.jsonl"
  f.write_text("\n".join(lines) + "\n", encoding="utf-8")
  skips = Skips()
  rows = list(read_image_rows(f, skips))
  assert rows == [
    (str(d / "ok.png"), "fine"),
    ("/abs/elsewhere.png", "absolute"),
    (str(d / "in.png"), "line\u2028separator"),
    (str(d / "c.png"), "a\u0000cat\u001b[31m\u202e"),
  ]
  want = {
    2: "not valid JSON",
    3: "got a JSON array",
    4: "got a JSON string",
    5: "got a JSON null",
    6: "missing 'image'",
    7: "missing 'prompt'",
    8: '"image" is a JSON number',
    9: '"prompt" is a JSON number',
    10: "lone surrogate",
    11: "lone surrogate",
    12: "NUL",
    13: "escapes",
    14: "empty",
    15: "nested too deeply",
  }
  got = by_where(skips)
  assert list(got) == [f"{f}:{n}" for n in want]
  for n, words in want.items():
    assert words in got[f"{f}:{n}"], (n, got[f"{f}:{n}"])
  assert "--allow-outside-paths" in got[f"{f}:13"]
  # allowed: the escaping row is read; without a prompt requirement line 7 is fine
  rows = list(read_image_rows(f, Skips(), require_prompt=False, allow_outside=True))
  assert (os.path.normpath(d / "../../etc/passwd"), "x") in rows and (str(d / "x.png"), None) in rows


def test_jsonl_encodings_and_line_endings(tmp_path, monkeypatch):
  f = tmp_path / "p.jsonl"
  row = json.dumps({"image": "a.png", "prompt": "é"}, ensure_ascii=False)
  f.write_bytes(
    b"\xef\xbb\xbf" + row.encode() + b"\r\n" + b'{"image": "\xff\xfe.png", "prompt": "x"}\r\n' + row.encode()
  )
  skips = Skips()
  assert list(read_image_rows(f, skips)) == [(str(tmp_path / "a.png"), "é")] * 2  # BOM and CRLF are fine
  assert [w for w, _ in skips] == [f"{f}:2"] and "not valid UTF-8 (byte 0xff" in skips[0][1]
  # an over-long line is skipped without being held whole; the next line is read
  monkeypatch.setattr(pairs, "MAX_LINE_CHARS", 64)
  f.write_text(json.dumps({"image": "a.png", "prompt": "x" * 1000}) + "\n" + row + "\n", encoding="utf-8")
  skips = Skips()
  assert list(read_image_rows(f, skips)) == [(str(tmp_path / "a.png"), "é")]
  assert skips == [(f"{f}:1", "line longer than 64 characters")]


@pytest.mark.parametrize(
  "content, words",
  [
    (b"", r"no rows"),
    (b"\n  \n\n", r"no rows"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"binary data"),
    (json.dumps({"image": "a.png", "prompt": "x"}).encode("utf-16"), r"UTF-16/32"),
    (b"{oops\n[1]\nnull\n", r"no usable row, all 3 skipped \(first: .*p\.jsonl:1: not valid JSON"),
    (b'{"image": "../x.png", "prompt": "x"}\n', r"no usable row.*escapes"),
  ],
)
def test_jsonl_unusable_files_are_one_input_error(tmp_path, content, words):
  f = tmp_path / "p.jsonl"
  f.write_bytes(content)
  with pytest.raises(InputError, match=words) as e:
    list(read_image_rows(f, Skips()))
  assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_jsonl_missing_file_or_directory(tmp_path):
  with pytest.raises(InputError, match="cannot read .*absent.jsonl"):
    list(read_image_rows(tmp_path / "absent.jsonl", Skips()))
  (tmp_path / "d.jsonl").mkdir()
  with pytest.raises(InputError, match="is a directory"):
    list(read_image_rows(tmp_path / "d.jsonl", Skips()))
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    read_records(tmp_path / "absent.jsonl", Skips())
  (tmp_path / "x.txt").write_text("x")
  with pytest.raises(InputError, match="expected a DiffusionDB folder"):
    read_records(tmp_path / "x.txt", Skips())


def test_read_records_jsonl_confines_paths(tmp_path):
  (tmp_path / "list.jsonl").write_text(
    json.dumps({"image": "../outside.png", "prompt": "p"})
    + "\n"
    + json.dumps({"image": "in.png", "prompt": "p"})
    + "\n"
  )
  skips = Skips()
  assert [r.name for r in read_records(tmp_path / "list.jsonl", skips)] == [str(tmp_path / "in.png")]
  assert "escapes" in skips[0][1]
  recs = read_records(tmp_path / "list.jsonl", Skips(), allow_outside=True)
  assert [r.name for r in recs] == [str(tmp_path.parent / "outside.png"), str(tmp_path / "in.png")]


# ------------------------------------------------------------------------------------------------------------
# DiffusionDB parts: bombs and lying headers
# ------------------------------------------------------------------------------------------------------------
GOOD = {f"g{i}.png": encode(pixels(i)) for i in range(3)}


def _meta(names, prompt="p"):
  return {n: {"p": prompt} for n in names}


def test_zip_bomb_members_are_skipped_from_their_headers(tmp_path):
  root = tmp_path / "db"
  zp = deflated_part(root / "part-000001.zip", {**GOOD, "bomb.png": 8 * MiB}, _meta([*GOOD, "bomb.png"]))
  skips = Skips()
  recs = read_diffusiondb(root, skips)  # default caps: 8 MiB of zeros compress ~1000:1
  assert [r.name for r in recs] == sorted(GOOD)
  assert list(by_where(skips)) == [f"{zp}:bomb.png"]
  assert "compression ratio" in skips[0][1] and "exceeds the cap of 100:1" in skips[0][1]
  skips = Skips()
  read_diffusiondb(root, skips, limits=ArchiveLimits(max_member_bytes=2 * MiB, max_ratio=1e9))
  assert "member of 8388608 bytes uncompressed exceeds the cap of 2 MiB" in skips[0][1]
  # the same member is refused when read directly (a record listed under other caps)
  bomb = ddb.Record(name="bomb.png", prompt="p", archive=str(zp), part="part-000001")
  with ArchiveReader() as reader, pytest.raises(MemberError, match="compression ratio"):
    reader.read(bomb)


def test_lying_headers_cannot_inflate_memory(tmp_path):
  """The central directory says 1 MiB (ratio ~30:1, under every cap); the data inflates to 32 MiB. zipfile stops
  at the declared size and the CRC fails: a named skip, with a peak allocation of a few MiB."""
  root = tmp_path / "db"
  zp = deflated_part(root / "part-000001.zip", {**GOOD, "liar.png": 32 * MiB}, _meta([*GOOD, "liar.png"]))
  patch_central(zp, "liar.png", file_size=1 * MiB)
  skips = Skips()
  tracemalloc.start()
  try:
    recs = list(iter_diffusiondb(root, skips))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert [r.name for r in recs] == sorted(GOOD)
  assert list(by_where(skips)) == [f"{zp}:liar.png"] and "Bad CRC" in skips[0][1]
  assert peak < 8 * MiB, peak


def test_caps_are_enforced_on_the_bytes_read(tmp_path, monkeypatch):
  """Were a header check ever fooled, the chunked read still stops at the caps."""
  zp = deflated_part(tmp_path / "db" / "part-000001.zip", {"big.png": 8 * MiB}, _meta(["big.png"]))
  monkeypatch.setattr(ddb, "member_problem", lambda *a, **k: None)
  rec = ddb.Record(name="big.png", prompt="p", archive=str(zp), part="part-000001")
  limits = ArchiveLimits(max_member_bytes=2 * MiB, max_ratio=1e9, chunk_bytes=256 * 1024)
  with ArchiveReader(limits) as reader, pytest.raises(MemberError, match="decompresses to more than the cap of 2 MiB"):
    reader.read(rec)
  limits = ArchiveLimits(max_member_bytes=64 * MiB, max_ratio=10, chunk_bytes=256 * 1024)
  with ArchiveReader(limits) as reader, pytest.raises(MemberError, match="decompresses more than 10:1"):
    reader.read(rec)


def test_unsupported_encrypted_and_duplicate_members(tmp_path):
  root = tmp_path / "db"
  names = [*GOOD, "b.png", "enc.png", "dup.png"]
  zp = deflated_part(root / "part-000001.zip", {**GOOD, "enc.png": encode(pixels(5))}, _meta(names))
  with zipfile.ZipFile(zp, "a", zipfile.ZIP_BZIP2) as zf:
    zf.writestr("b.png", encode(pixels(4)))
  with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(zp, "a") as zf:
    zf.writestr("dup.png", encode(pixels(6)))
    zf.writestr("dup.png", encode(pixels(7)))
  patch_central(zp, "enc.png", flags=0x1)
  skips = Skips()
  recs = read_diffusiondb(root, skips)
  assert [r.name for r in recs] == sorted(GOOD)
  got = by_where(skips)
  assert "compressed with bzip2 (method 12): only stored and deflated" in got[f"{zp}:b.png"]
  assert "encrypted member" in got[f"{zp}:enc.png"]
  assert "2 members share this name" in got[f"{zp}:dup.png"] and len(skips) == 3  # one skip per name
  # the reader refuses them too (records made by hand)
  with ArchiveReader() as reader:
    for name, words in (("b.png", "bzip2"), ("enc.png", "encrypted"), ("nothere.png", "no member named")):
      with pytest.raises(MemberError, match=words):
        reader.read(ddb.Record(name=name, prompt="p", archive=str(zp), part="part-000001"))


def test_part_json_problems(tmp_path):
  root = tmp_path / "db"
  zp = root / "part-000001.zip"

  def part(meta):
    if zp.exists():
      zp.unlink()
    return write_part(zp, GOOD, None) if meta is None else deflated_part(zp, GOOD, meta)

  # listed but absent: a named skip (the part is incomplete); a lone surrogate prompt: a named skip
  part({**_meta(GOOD), "ghost.png": {"p": "x"}})
  skips = Skips()
  assert [r.name for r in read_diffusiondb(root, skips)] == sorted(GOOD)
  assert skips == [(f"{zp}:ghost.png", "listed in part-000001.json but not in the archive")]
  part(json.dumps({**_meta(GOOD), "g1.png": {"p": "x"}}).replace('"p": "x"', '"p": "a \\ud800"').encode())
  skips = Skips()
  assert [r.name for r in read_diffusiondb(root, skips)] == ["g0.png", "g2.png"]
  assert skips[0][0] == f"{zp}:g1.png" and "prompt is not valid Unicode (lone surrogate" in skips[0][1]
  # whole-part problems: one DiffusionDBError naming the JSON
  for meta, words, limits in [
    (b"\xff\xfe{}", "expected UTF-8 JSON", ddb.DEFAULT_LIMITS),
    (b"[" * 100000 + b"]" * 100000, "expected UTF-8 JSON", ddb.DEFAULT_LIMITS),
    (b"{oops", "expected UTF-8 JSON", ddb.DEFAULT_LIMITS),
    (b'{"g0.png": "a prompt, not an object"}', "expected an object mapping image names", ddb.DEFAULT_LIMITS),
    (json.dumps(_meta(GOOD, "x" * 4096)).encode(), "exceeds the cap of 8192 bytes", ArchiveLimits(max_json_bytes=8192)),
  ]:
    part(meta)
    with pytest.raises(DiffusionDBError, match=r"part-000001\.zip:part-000001\.json: .*" + words):
      read_diffusiondb(root, Skips(), limits=limits)
  # no part JSON and no parquet: every member is a named 'no prompt' skip
  part(None)
  skips = Skips()
  assert read_diffusiondb(root, skips) == [] and all("no prompt" in why for _, why in skips) and len(skips) == 3


@pytest.mark.parametrize("damage", ["truncated", "middle", "header_only", "empty", "random"])
def test_corrupt_zips_are_one_line_errors(tmp_path, damage):
  root = tmp_path / "db"
  zp = deflated_part(root / "part-000001.zip", GOOD, _meta(GOOD))
  data = zp.read_bytes()
  zp.write_bytes(
    {
      "truncated": data[: len(data) // 2],
      "middle": data[:100] + os.urandom(200) + data[300:],
      "header_only": b"PK\x03\x04 but then nothing",
      "empty": b"",
      "random": os.urandom(4096),
    }[damage]
  )
  try:
    recs = list(iter_diffusiondb(root, skips := Skips()))
  except DiffusionDBError as e:
    assert "part-000001.zip" in str(e) and "\n" not in str(e)
  else:  # random bytes in the middle may spare the central directory: then the damaged members are skips
    assert damage == "middle" and len(recs) + len(skips) >= 1 and all(where.startswith(str(zp)) for where, _ in skips)


# ------------------------------------------------------------------------------------------------------------
# image members: decompression bombs, truncation, paths that are not files
# ------------------------------------------------------------------------------------------------------------
def test_image_members_bomb_and_truncated(tmp_path, monkeypatch):
  root = tmp_path / "db"
  full = encode(pixels(9, 64))
  members = {
    **GOOD,
    "pngbomb.png": png_claiming(100_000, 100_000),  # over twice PIL's limit: PIL's own error
    "large.png": png_claiming(12_000, 12_000),  # 144 Mpx: over our limit (89.5 Mpx), refused from the header
    "half.png": full[: len(full) // 2],
  }
  deflated_part(root / "part-000001.zip", members, _meta(members))
  recs = {r.name: r for r in iter_diffusiondb(root, Skips())}
  with pytest.raises(ImageError, match="decompression bomb"):
    load_image(recs["pngbomb.png"].data)
  with pytest.raises(ImageError, match="decompression bomb: 12000x12000 = 144000000 pixels exceeds"):
    load_image(recs["large.png"].data)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone switched PIL's guard off: ours still holds
  for name in ("pngbomb.png", "large.png"):
    with pytest.raises(ImageError, match="decompression bomb: .* exceeds the limit of 89478485"):
      load_image(recs[name].data)
  with pytest.raises(ImageError, match="truncated"):
    load_image(recs["half.png"].data)
  assert load_image(recs["g0.png"].data).shape == (16, 16, 3)


def test_image_paths_that_are_not_files(tmp_path):
  os.mkfifo(tmp_path / "fifo.png")
  for path, words in [
    (str(tmp_path / "fifo.png"), "not a regular file"),
    ("/dev/zero", "not a regular file"),
    ("a\x00b.png", "not a usable file path"),
    ("x\udfffy.png", "not a usable file path|file not found"),
  ]:
    with pytest.raises(ImageError, match=words) as e:
      load_image(path)
    str(e.value).encode("utf-8")  # printable


def test_alpha_composite_stays_exact_in_16_bits():
  rgba = np.array([[[255, 255, 255, 255], [255, 0, 128, 1], [0, 0, 0, 254], [200, 100, 50, 128]]], np.uint8)
  got = load_image(rgba, background=(255, 255, 255))
  a = rgba[..., 3:].astype(np.int64)
  want = (rgba[..., :3].astype(np.int64) * a + 255 * (255 - a) + 127) // 255
  np.testing.assert_array_equal(got, want)


def test_png_bytes_helper_really_claims_its_size():
  assert Image.open(io.BytesIO(png_claiming(123, 45))).size == (123, 45)
