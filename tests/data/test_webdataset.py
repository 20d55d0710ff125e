"""hps_jax.data.webdataset (img2dataset tar shards) and `hps-jax score` / `aesthetic --shards`: samples in order,
truncated shards and image-less samples as named skips, hostile members refused with bounded memory, brace patterns,
disjoint shard shares, the same scores from shards as from a folder, and the aesthetic regularization set."""

import io
import json
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.data.diffusiondb import ArchiveLimits
from hps_jax.data.skips import Skips
from hps_jax.data.webdataset import WebdatasetError, expand_shards, iter_samples, shard_share

pytest.importorskip("webdataset")


def _png(seed: int, size=(24, 20)) -> bytes:
  rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  for k, v in kw.items():
    setattr(info, k, v)
  tf.addfile(info, io.BytesIO(data))


def write_shard(path, samples) -> Path:
  """samples: [(key, {ext: bytes})] written in order, members of a sample adjacent (as img2dataset does)."""
  with tarfile.open(path, "w") as tf:
    for key, parts in samples:
      for ext, data in parts.items():
        _add(tf, f"{key}.{ext}", data)
  return Path(path)


def _skips_by_where(skips: Skips) -> dict[str, str]:
  return dict(skips.items)


# ------------------------------------------------------------------------------------------------------------
# the reader
# ------------------------------------------------------------------------------------------------------------
def test_samples_are_grouped_by_key_in_member_order(tmp_path):
  shard = tmp_path / "00000.tar"
  with tarfile.open(shard, "w") as tf:
    d = tarfile.TarInfo("./")
    d.type = tarfile.DIRTYPE
    tf.addfile(d)  # `tar -C dir .` writes one: passed over
    _add(tf, "./000.jpg", b"jpeg bytes")
    _add(tf, "./000.txt", b"  a red bicycle\n")
    _add(tf, "./000.json", json.dumps({"url": "http://x/0.jpg", "width": 4}).encode())
    _add(tf, "./000.cls", b"7")  # other fields: not read
    _add(tf, "001.PNG", b"png bytes")  # extensions compare lowercase
    _add(tf, "002.webp", b"webp bytes")
    _add(tf, "002.txt", b"")  # an empty caption is no caption
    _add(tf, "sub/003.jpeg", b"jpeg 3")
  skips = Skips()
  got = list(iter_samples([shard], skips))
  assert skips.items == []
  assert [tuple(s) for s in got] == [
    ("000", shard, 0, b"jpeg bytes", "jpg", "a red bicycle", {"url": "http://x/0.jpg", "width": 4}),
    ("001", shard, 1, b"png bytes", "png", None, None),
    ("002", shard, 2, b"webp bytes", "webp", None, None),
    ("sub/003", shard, 3, b"jpeg 3", "jpeg", None, None),
  ]
  assert got[0].where == f"{shard}/000.jpg"


def test_truncated_shard_and_sample_without_image_are_named_skips(tmp_path):
  good = write_shard(
    tmp_path / "a.tar",
    [("k0", {"jpg": b"0" * 600, "txt": b"zero"}), ("k1", {"txt": b"no image", "json": b"{}"}), ("k2", {"png": b"2"})],
  )
  full = write_shard(tmp_path / "full.tar", [(f"t{i}", {"jpg": bytes([i]) * 3000, "txt": b"c"}) for i in range(4)])
  data = full.read_bytes()
  # cut inside t2's image data: t0 and t1 are kept, t2 and the rest are skipped
  t2_data = data.index(bytes([2]) * 3000)
  (tmp_path / "cut.tar").write_bytes(data[: t2_data + 1000])
  # cut exactly after t1.txt's data block: tarfile would end quietly there (no end-of-archive marker)
  t2_header = t2_data - 512
  (tmp_path / "cut_at_header.tar").write_bytes(data[:t2_header])
  (tmp_path / "garbage.tar").write_bytes(b"not a tar file at all" * 40)
  shards = [good, tmp_path / "cut.tar", tmp_path / "cut_at_header.tar", tmp_path / "garbage.tar", tmp_path / "gone.tar"]
  skips = Skips()
  got = [(s.shard.name, s.key, s.index) for s in iter_samples(shards, skips)]
  assert got == [
    ("a.tar", "k0", 0),
    ("a.tar", "k2", 2),
    ("cut.tar", "t0", 0),
    ("cut.tar", "t1", 1),
    ("cut_at_header.tar", "t0", 0),  # t1 was being read when the data ended: it may lack members, so it is skipped
  ]
  by = _skips_by_where(skips)
  assert len(skips.items) == 5, skips.items
  assert "no image member" in by[f"{good}:k1"]
  assert "truncated" in by[f"{tmp_path / 'cut.tar'}:t2"] and "rest of the shard" in by[f"{tmp_path / 'cut.tar'}:t2"]
  assert "no end-of-archive marker" in by[f"{tmp_path / 'cut_at_header.tar'}:t1"]
  assert "not a readable uncompressed tar" in by[str(tmp_path / "garbage.tar")]
  assert by[str(tmp_path / "gone.tar")] == "no such shard"


def _raw_header(name: str, size: int, type=tarfile.REGTYPE) -> bytes:
  info = tarfile.TarInfo(name)
  info.size, info.type = size, type
  return info.tobuf(format=tarfile.GNU_FORMAT)


def test_hostile_members_are_refused_with_bounded_memory(tmp_path):
  """Absolute and `..` names, links, devices, two images in one sample, a member over the cap, a 1 TB declared
  size and a 1 GB pax header: each refused (named), never allocated; the shard's good samples still come out."""
  shard = tmp_path / "hostile.tar"
  with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tf:
    _add(tf, "ok0.jpg", b"fine")
    _add(tf, "/etc/abs.jpg", b"abs")
    _add(tf, "../up.jpg", b"up")
    _add(tf, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    _add(tf, "hard.jpg", b"", type=tarfile.LNKTYPE, linkname="ok0.jpg")
    _add(tf, "fifo.png", b"", type=tarfile.FIFOTYPE)
    _add(tf, "two.jpg", b"a")
    _add(tf, "two.png", b"b")
    _add(tf, "big.jpg", b"x" * 5000)  # over the test's 4000-byte cap
    _add(tf, "bigcap.txt", b"y" * 300)  # over the test's 200-byte text cap
    _add(tf, "bigcap.jpg", b"ok")
    _add(tf, "ok1.jpg", b"fine too")
  skips = Skips()
  limits = ArchiveLimits(max_member_bytes=4000, max_json_bytes=200)
  got = [(s.key, s.image) for s in iter_samples([shard], skips, limits)]
  assert got == [("ok0", b"fine"), ("ok1", b"fine too")]
  by = _skips_by_where(skips)
  assert "unsafe member name" in by[f"{shard}:'/etc/abs.jpg'"] and "unsafe member name" in by[f"{shard}:'../up.jpg'"]
  assert "symbolic link" in by[f"{shard}:link"] and "hard link" in by[f"{shard}:hard"] and "FIFO" in by[f"{shard}:fifo"]
  assert "two image members" in by[f"{shard}:two"]
  assert "over the cap of 4000" in by[f"{shard}:big"] and "over the cap of 200" in by[f"{shard}:bigcap"]
  assert len(skips.items) == 8

  # declared sizes far beyond the file: a 1 TB member, a 1 GB pax header (tarfile would read it in one call)
  body = tarfile.TarInfo("a.jpg")
  body.size = 4
  huge = _raw_header("b.jpg", 10**12)
  pax = _raw_header("././@PaxHeader", 10**9, tarfile.XHDTYPE)
  first = body.tobuf(format=tarfile.GNU_FORMAT) + b"good".ljust(512, b"\0")
  (tmp_path / "huge.tar").write_bytes(first + huge + b"\0" * 4096)
  (tmp_path / "pax.tar").write_bytes(first + pax + b"\0" * 4096)
  tracemalloc.start()
  try:
    skips = Skips()
    got = [(s.shard.name, s.key) for s in iter_samples([tmp_path / "huge.tar", tmp_path / "pax.tar"], skips)]
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert got == [("huge.tar", "a")]  # pax.tar's "a" was pending at the bad header: skipped with it
  assert peak < 8 * 1024 * 1024, peak
  by = _skips_by_where(skips)
  assert "declares 1000000000000 bytes" in by[f"{tmp_path / 'huge.tar'}:b"]
  assert "truncated" in by[f"{tmp_path / 'pax.tar'}:a"] and "cap" in by[f"{tmp_path / 'pax.tar'}:a"]


def test_brace_patterns_folders_and_lists(tmp_path):
  d = tmp_path / "laion"
  d.mkdir()
  for i in range(4):
    write_shard(d / f"{i:05d}.tar", [(f"{i}", {"jpg": b"x"})])
  (d / "notes.txt").write_text("not a shard")
  assert expand_shards(f"{d}/{{00000..00002}}.tar") == [d / f"{i:05d}.tar" for i in range(3)]
  assert expand_shards(str(d)) == [d / f"{i:05d}.tar" for i in range(4)]  # a folder: its .tar files, sorted
  assert expand_shards([f"{d}/00003.tar::{d}/00001.tar", f"{d}/{{00001,00000}}.tar"]) == [
    d / "00003.tar",
    d / "00001.tar",
    d / "00000.tar",
  ]  # in the order given, each once
  # a range with a shard that failed to download: listed, and counted as a skip when read
  shards = expand_shards(f"{d}/{{00002..00005}}.tar")
  assert len(shards) == 4
  skips = Skips()
  assert [s.key for s in iter_samples(shards, skips)] == ["2", "3"]
  assert [w for w, _ in skips.items] == [str(d / "00004.tar"), str(d / "00005.tar")]
  (tmp_path / "empty").mkdir()
  with pytest.raises(WebdatasetError, match="no .tar shards"):
    expand_shards(str(tmp_path / "empty"))
  with pytest.raises(WebdatasetError, match="empty shard spec"):
    expand_shards([""])


def test_shard_share_is_disjoint_covering_and_deterministic():
  shards = [f"s{i:03d}.tar" for i in range(11)]
  for n in range(1, 14):
    shares = [shard_share(shards, i, n) for i in range(n)]
    flat = [s for share in shares for s in share]
    assert sorted(flat) == shards  # covering, and disjoint (no shard twice)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares == [shard_share(shards, i, n) for i in range(n)]
    for share in shares:
      assert share == sorted(share)  # each share keeps the shards' order
  for bad in [(0, 0), (2, 2), (-1, 3), (True, 2)]:
    with pytest.raises(ValueError):
      shard_share(shards, *bad)


def test_webdataset_reader_imports_without_torch(tmp_path):
  write_shard(tmp_path / "0.tar", [("a", {"jpg": b"x", "txt": b"cap"})])
  code = (
    "import sys; sys.modules['torch'] = None\n"
    "import webdataset\n"
    "from hps_jax.data.skips import Skips\n"
    "from hps_jax.data.webdataset import expand_shards, iter_samples\n"
    f"s = list(iter_samples(expand_shards({str(tmp_path)!r} + '/{{0..0}}.tar'), Skips()))\n"
    "assert [(x.key, x.caption) for x in s] == [('a', 'cap')], s\n"
    "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    "print('ok')\n"
  )
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from flax import nnx

  from hps_jax.convert.aesthetic import save_aesthetic
  from hps_jax.convert.clip import save_hf
  from hps_jax.models.aesthetic import AestheticMLP
  from hps_jax.models.clip import CLIP, CLIPConfig

  d = tmp_path_factory.mktemp("wds_models")
  return {
    "hps": save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), d / "hps"),
    "clip": save_hf(CLIP(CLIPConfig.tiny().replace(embed_dim=768), rngs=nnx.Rngs(2)), d / "clip768"),
    "head": save_aesthetic(AestheticMLP(rngs=nnx.Rngs(3)), d / "head.safetensors"),
  }


CAPTIONS = ["a red bicycle", "a cat", "a red bicycle", "a bowl of soup", "a cat", "a red bicycle", "a dog"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """The same 7 images as a folder (+ a pairs file with their captions) and as two shards (4 + 3 samples)."""
  d = tmp_path_factory.mktemp("wds_data")
  folder = d / "folder"
  folder.mkdir()
  samples = []
  for i, caption in enumerate(CAPTIONS):
    data = _png(i, size=(20 + 3 * i, 30 - 2 * i))
    (folder / f"{i:03d}.png").write_bytes(data)
    samples.append((f"{i:03d}", {"png": data, "txt": caption.encode(), "json": json.dumps({"i": i}).encode()}))
  (d / "pairs.jsonl").write_text(
    "".join(json.dumps({"image": f"folder/{i:03d}.png", "prompt": c}) + "\n" for i, c in enumerate(CAPTIONS))
  )
  (d / "shards").mkdir()
  write_shard(d / "shards" / "00000.tar", samples[:4])
  write_shard(d / "shards" / "00001.tar", samples[4:])
  return d


def _rows(path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_score_from_shards_equals_score_from_the_folder(models, dataset, tmp_path, capsys):
  from hps_jax.cli import main

  ck = str(models["hps"])
  base = ["score", "--checkpoint", ck, "--batch-size", "4"]
  spec = f"{dataset}/shards/{{00000..00001}}.tar"
  assert main([*base, "--prompt", "a cat", str(dataset / "folder"), "--output", str(tmp_path / "f.jsonl")]) == 0
  assert main([*base, "--prompt", "a cat", "--shards", spec, "--output", str(tmp_path / "s.jsonl")]) == 0
  folder, shards = _rows(tmp_path / "f.jsonl"), _rows(tmp_path / "s.jsonl")
  assert [r["image"] for r in shards] == [f"{dataset}/shards/0000{i // 4}.tar/{i:03d}.png" for i in range(7)]
  assert [r["hps"] for r in shards] == [r["hps"] for r in folder]  # the same bytes, batches, numbers
  assert [r["rank"] for r in shards] == [r["rank"] for r in folder]

  # without --prompt the captions are the prompts: the numbers of the pairs file
  assert main([*base, "--pairs", str(dataset / "pairs.jsonl"), "--output", str(tmp_path / "p.jsonl")]) == 0
  assert main([*base, "--shards", str(dataset / "shards"), "--output", str(tmp_path / "c.jsonl")]) == 0
  pairs, captions = _rows(tmp_path / "p.jsonl"), _rows(tmp_path / "c.jsonl")
  assert [r["prompt"] for r in captions] == CAPTIONS
  assert [r["hps"] for r in captions] == [r["hps"] for r in pairs]
  assert [r["rank"] for r in captions] == [r["rank"] for r in pairs]
  assert sorted(r["rank"] for r in captions if r["prompt"] == "a red bicycle") == [1, 2, 3]

  # a truncated shard and a sample without an image: exit 1, each named and counted, the rest scored
  data = (dataset / "shards" / "00001.tar").read_bytes()
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "00001.tar").write_bytes(data[: data.index(b"a dog") - 600])  # inside sample 006's image
  write_shard(bad / "00002.tar", [("x", {"txt": b"caption only"}), ("y", {"png": _png(9), "txt": b"a cat"})])
  capsys.readouterr()
  rc = main([*base, "--shards", f"{bad}/{{00001..00002}}.tar", "--output", str(tmp_path / "b.jsonl")])
  err = capsys.readouterr().err
  assert rc == 1, err
  assert "done: 3 images processed, 2 skipped" in err
  assert f"skipped {bad}/00001.tar:006: truncated or corrupt shard" in err
  assert f"skipped {bad}/00002.tar:x: no image member" in err
  assert [r["image"] for r in _rows(tmp_path / "b.jsonl")] == [
    f"{bad}/00001.tar/004.png",
    f"{bad}/00001.tar/005.png",
    f"{bad}/00002.tar/y.png",
  ]


def test_aesthetic_from_shards_and_the_regularization_set(models, dataset, tmp_path, capsys):
  """Same aesthetic scores from shards as from the folder; --min-score T --out keeps exactly the images >= T (T
  chosen between two measured scores), copies them, and `hps-jax label`'s reader takes the set."""
  from hps_jax.adapt.label import read_regularization
  from hps_jax.cli import main

  base = ["aesthetic", "--aesthetic-mlp", str(models["head"]), "--clip-checkpoint", str(models["clip"])]
  base += ["--batch-size", "4"]
  assert main([*base, str(dataset / "folder"), "--output", str(tmp_path / "f.jsonl")]) == 0
  assert main([*base, "--shards", str(dataset / "shards"), "--output", str(tmp_path / "s.jsonl")]) == 0
  folder, shards = _rows(tmp_path / "f.jsonl"), _rows(tmp_path / "s.jsonl")
  scores = [r["aesthetic"] for r in shards]
  assert scores == [r["aesthetic"] for r in folder] and len(set(scores)) == 7
  ranked = sorted(scores)
  threshold = (ranked[3] + ranked[4]) / 2  # 3 images above
  want = {i for i, s in enumerate(scores) if s >= threshold}
  assert len(want) == 3

  reg = tmp_path / "reg"
  assert main([*base, "--shards", str(dataset / "shards"), "--min-score", repr(threshold), "--out", str(reg)]) == 0
  meta = _rows(reg / "metadata.jsonl")
  assert [m["source"] for m in meta] == [shards[i]["image"] for i in sorted(want)]
  assert [m["caption"] for m in meta] == [CAPTIONS[i] for i in sorted(want)]
  for m, i in zip(meta, sorted(want)):
    assert (reg / m["file_name"]).read_bytes() == (dataset / "folder" / f"{i:03d}.png").read_bytes()
    assert m["aesthetic"] == scores[i]
  assert sorted(p.name for p in (reg / "images").iterdir()) == sorted(Path(m["file_name"]).name for m in meta)
  assert [r["aesthetic"] for r in _rows(reg / "aesthetic.jsonl")] == scores  # every image's score is kept too
  skipped = []
  got = read_regularization(reg, lambda w, why: skipped.append((w, why)))
  assert skipped == [] and [(Path(p).name, c) for p, c, _ in got] == [
    (Path(m["file_name"]).name, m["caption"]) for m in meta
  ]

  # from the folder, captions from --captions; an image >= T without a caption is a named skip (exit 1)
  lines = (dataset / "pairs.jsonl").read_text().splitlines()
  top = max(want, key=lambda i: scores[i])
  (dataset / "caps.jsonl").write_text("".join(line + "\n" for i, line in enumerate(lines) if i != top))
  reg2 = tmp_path / "reg2"
  capsys.readouterr()
  rc = main(
    [*base, str(dataset / "folder"), "--captions", str(dataset / "caps.jsonl"), "--min-score", repr(threshold)]
    + ["--out", str(reg2)]
  )
  err = capsys.readouterr().err
  assert rc == 1, err
  assert f"skipped {dataset / 'folder' / f'{top:03d}.png'}: aesthetic" in err and "no caption" in err
  assert [m["caption"] for m in _rows(reg2 / "metadata.jsonl")] == [CAPTIONS[i] for i in sorted(want - {top})]
  assert main([*base, "--min-score", "5", str(dataset / "folder")]) == 2  # --min-score needs --out
