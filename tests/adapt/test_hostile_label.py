"""`hps-jax label` and the LoRA trainer's readers on hostile inputs: archive members whose names collide or try to
leave the output folder (each selected image gets its own file inside it, so no "Weird image." row can point at a
preferred image), zip and image bombs, malformed manifests and regularization lists, pickled latent caches, and a
real 2 GiB zip bomb labelled in a subprocess with its peak memory measured."""

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.adapt import train_lora as tl
from hps_jax.adapt.label import Selection, extract_selected, read_manifest, read_regularization
from hps_jax.cli import main
from hps_jax.data.diffusiondb import read_diffusiondb
from hps_jax.data.skips import Skips as SkipRecord
from hps_jax.errors import InputError
from tests.adapt.test_label import gradient
from tests.cli.test_cli import checkpoint  # noqa: F401  (the tiny random HPS checkpoint fixture)
from tests.data.test_diffusiondb import Skips, encode, pixels
from tests.data.test_hostile_archives import MiB, deflated_part, patch_central, png_claiming

ROOT = Path(__file__).resolve().parents[2]
CONTENT_NAME = re.compile(r"^images/part-000001/[0-9a-f]{16}-[^/]+$")


def tree(d: Path, skip: Path | None = None) -> set[str]:
  """Every file and folder below d (not following links), except those under `skip`."""
  out = set()
  for dirpath, dirnames, filenames in os.walk(d):
    if skip is not None and Path(dirpath).is_relative_to(skip):
      continue
    out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
  return {p for p in out if skip is None or not Path(p).is_relative_to(skip)}


def colliding_members(outside: Path) -> dict[str, bytes]:
  """Distinct images under names that collide once sanitized or case-folded, or that try to leave the folder."""
  names = ["dup.png", "../dup.png", "DUP.png", str(outside / "abs.png"), "sub/dup.png", "a\\..\\..\\b.png"]
  return {n: encode(gradient(10 + i)) for i, n in enumerate(names)}


# ------------------------------------------------------------------------------------------------------------
# extraction: unique names inside the output folder
# ------------------------------------------------------------------------------------------------------------
def test_extracted_names_are_unique_and_confined(tmp_path):
  members = colliding_members(tmp_path / "outside")
  zp = deflated_part(tmp_path / "db" / "part-000001.zip", members, {n: {"p": "p"} for n in members})
  records = read_diffusiondb(tmp_path / "db", Skips())
  assert sorted(r.name for r in records) == sorted(members)  # every one is an image to score
  idx = {r.name: i for i, r in enumerate(records)}
  sel = [
    Selection("a", 2, idx["dup.png"], idx["../dup.png"]),  # the collision of the report: preferred vs weird
    Selection("b", 2, idx["DUP.png"], idx[str(tmp_path / "outside" / "abs.png")]),
    Selection("c", 2, idx["sub/dup.png"], idx["a\\..\\..\\b.png"]),
  ]
  out = tmp_path / "run"
  out.mkdir()
  before = tree(tmp_path, skip=out)
  skips = SkipRecord()
  kept, paths = extract_selected(records, sel, out, skips)
  assert kept == sel and skips.items == []
  assert tree(tmp_path, skip=out) == before  # nothing written outside the output folder
  assert not (tmp_path / "outside").exists() and not (tmp_path / "dup.png").exists()
  assert len(set(paths.values())) == 6  # six members, six files
  for name, i in idx.items():
    rel = paths[i]
    assert (out / rel).resolve().is_relative_to((out / "images").resolve())
    assert (out / rel).read_bytes() == members[name], name  # each row's file holds its own member's bytes
  assert {records[i].name for i, p in paths.items() if not CONTENT_NAME.match(p)} == {"DUP.png", "sub/dup.png"}
  assert paths[idx["sub/dup.png"]] == "images/part-000001/sub/dup.png"  # safe names are kept as they are
  # dup.png meets DUP.png case-insensitively (macOS, Windows): it is named by its content instead
  assert CONTENT_NAME.match(paths[idx["dup.png"]]) and paths[idx["DUP.png"]] == "images/part-000001/DUP.png"
  assert paths[idx["../dup.png"]].endswith("-dup.png") and paths[idx["a\\..\\..\\b.png"]].endswith("-b.png")

  # again into the same folder (a rerun): the same names, the files replaced, not duplicated
  _, again = extract_selected(records, sel, out, SkipRecord())
  assert again == paths and len(list((out / "images").rglob("*.png"))) == 6
  # a file left where a folder must go (and a folder where a file must go) is not clobbered: another name is used
  (out / "images/part-000001/sub").rename(out / "moved")
  (out / "images/part-000001/sub").write_bytes(b"someone else's")
  (out / "images/part-000001/DUP.png").unlink()
  (out / "images/part-000001/DUP.png").mkdir()
  _, third = extract_selected(records, sel, out, SkipRecord())
  assert (out / "images/part-000001/sub").read_bytes() == b"someone else's"
  assert CONTENT_NAME.match(third[idx["sub/dup.png"]]) and CONTENT_NAME.match(third[idx["DUP.png"]])
  assert all((out / third[i]).read_bytes() == members[n] for n, i in idx.items())
  assert zp.exists()


# ------------------------------------------------------------------------------------------------------------
# the command end to end
# ------------------------------------------------------------------------------------------------------------
def _reg(d: Path) -> Path:
  reg = d / "reg"
  reg.mkdir()
  Image.fromarray(pixels(30)).save(reg / "r.png")
  (reg / "metadata.jsonl").write_text(
    json.dumps({"file_name": "r.png", "caption": "a photo"})
    + "\n"
    + json.dumps({"file_name": "../../../etc/hostname", "caption": "x"})
    + "\n"
  )
  return reg


def test_label_hostile_archive_end_to_end(checkpoint, tmp_path, capsys):  # noqa: F811
  """Pairs of colliding names per prompt (n = 2, alpha 0.1: both images of every prompt are selected), next to a
  zip bomb, a PNG bomb, a truncated PNG, a name used twice and a member the JSON lists but the zip lacks."""
  members = colliding_members(tmp_path / "outside")
  prompts = dict(zip(members, ["a", "a", "b", "b", "c", "c"]))
  full = encode(pixels(9, 64))
  bad = {"bomb.png": 8 * MiB, "pngbomb.png": png_claiming(12000, 12000), "half.png": full[: len(full) // 2]}
  zp = deflated_part(
    tmp_path / "db" / "part-000001.zip",
    {**members, **bad},
    {**{n: {"p": p} for n, p in prompts.items()}, **{n: {"p": "d"} for n in [*bad, "twice.png", "ghost.png"]}},
  )
  with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(zp, "a") as zf:
    zf.writestr("twice.png", encode(pixels(1)))
    zf.writestr("twice.png", encode(pixels(2)))
  reg = _reg(tmp_path)
  out = tmp_path / "run" / "manifest.jsonl"
  before = tree(tmp_path)
  rc = main(
    [
      "label",
      "--checkpoint",
      str(checkpoint),
      "--images",
      str(tmp_path / "db"),
      "--regularization",
      str(reg),
      "--out",
      str(out),
      "--scores",
      str(tmp_path / "run" / "scores.jsonl"),
      "--alpha",
      "0.1",
      "--batch-size",
      "4",
    ]
  )
  stderr = capsys.readouterr().err
  assert rc == 1, stderr
  assert "Traceback" not in stderr
  skipped = {l.split(": ", 1)[0].removeprefix("  skipped "): l for l in stderr.splitlines() if "skipped " in l}
  assert set(skipped) == {f"{zp}:{n}" for n in [*bad, "twice.png", "ghost.png"]} | {f"{reg / 'metadata.jsonl'}:2"}
  assert "compression ratio" in skipped[f"{zp}:bomb.png"]
  assert "decompression bomb" in skipped[f"{zp}:pngbomb.png"] and "truncated" in skipped[f"{zp}:half.png"]
  assert "2 members share this name" in skipped[f"{zp}:twice.png"]
  assert "not in the archive" in skipped[f"{zp}:ghost.png"]
  assert "escapes" in skipped[f"{reg / 'metadata.jsonl'}:2"] and "--allow-outside-paths" in stderr

  # nothing outside the output folder; six distinct files inside it, each with its own member's bytes
  assert tree(tmp_path, skip=out.parent) == before
  manifest = [json.loads(l) for l in out.read_text().splitlines()]
  rows = [r for r in manifest if r["kind"] != "regularization"]
  assert len(rows) == 6 and len({r["image"] for r in rows}) == 6
  scores = [json.loads(l) for l in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
  member_of = {(s["prompt"], s["kind"]): s["image"].split(":", 1)[1] for s in scores if s["kind"]}
  for r in rows:
    prompt = r["caption"].removeprefix("Weird image. ")
    assert (r["caption"] != prompt) == (r["kind"] == "non_preferred")
    assert (out.parent / r["image"]).resolve().is_relative_to((out.parent / "images").resolve())
    assert (out.parent / r["image"]).read_bytes() == members[member_of[(prompt, r["kind"])]]
  assert manifest[-1] == {"image": str(reg / "r.png"), "caption": "a photo", "kind": "regularization"}
  # the trainer reads the manifest back: every image inside its folder (the regularization one is absolute)
  assert [r["image"] for r in tl.read_manifest(out)][:6] == [str(out.parent / r["image"]) for r in rows]


def test_label_jsonl_paths_are_confined(checkpoint, tmp_path, capsys):  # noqa: F811
  lists = tmp_path / "lists"
  lists.mkdir()
  for i in range(3):
    Image.fromarray(gradient(i)).save(lists / f"{i}.png")
  Image.fromarray(gradient(5)).save(tmp_path / "outside.png")
  rows = [{"image": f"{i}.png", "prompt": "a"} for i in range(3)] + [{"image": "../outside.png", "prompt": "a"}]
  rows.append('{"image": "3.png", "prompt": "a \\ud800"}')
  (lists / "l.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  args = ["label", "--checkpoint", str(checkpoint), "--images", str(lists / "l.jsonl"), "--alpha", "1"]
  args += ["--regularization", str(_reg(tmp_path)), "--out", str(tmp_path / "run" / "m.jsonl")]
  assert main(args) == 1
  err = capsys.readouterr().err
  assert re.search(r"skipped .*l\.jsonl:4: image path \.\./outside\.png escapes .*lists \(pass --allow-outside", err)
  assert re.search(r"skipped .*l\.jsonl:5: .*lone surrogate", err)
  assert "done: 3 images processed" in err


# ------------------------------------------------------------------------------------------------------------
# manifests, regularization lists, latent caches
# ------------------------------------------------------------------------------------------------------------
def test_manifest_rows_are_checked_and_confined(tmp_path):
  m = tmp_path / "run" / "manifest.jsonl"
  m.parent.mkdir()
  good = {"image": "images/x.png", "caption": "x", "kind": "preferred"}

  def write(*rows):
    m.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))

  write(good, {**good, "image": "/abs/y.png", "kind": "regularization"})
  assert [r["image"] for r in read_manifest(m)] == [str(m.parent / "images/x.png"), "/abs/y.png"]
  write(good, {**good, "image": "../../etc/passwd"})
  with pytest.raises(InputError, match=r"manifest\.jsonl:2: image path \.\./\.\./etc/passwd escapes .*run \(pass"):
    read_manifest(m)
  assert read_manifest(m, allow_outside=True)[1]["image"] == os.path.normpath(m.parent / "../../etc/passwd")
  assert tl.read_manifest(m, allow_outside=True)[1]["image"] == read_manifest(m, allow_outside=True)[1]["image"]
  with pytest.raises(InputError, match="escapes"):
    tl.read_manifest(m)
  for row, words in [
    ({**good, "image": 7}, "must be a string"),
    ({**good, "image": ""}, "empty"),
    ({**good, "image": "a\x00b.png"}, "NUL"),
    ({**good, "caption": None}, '"caption" is not a string'),
    (b'{"image": "x.png", "caption": "a \\ud800", "kind": "preferred"}', "lone surrogate"),
    ({**good, "kind": "best"}, '"kind" must be one of'),
    (b"[1, 2]", "expected"),
    (b"{oops", "not valid JSON"),
    (b'{"image": "\xff.png", "caption": "x", "kind": "preferred"}', "not valid UTF-8"),
  ]:
    write(good, row)
    with pytest.raises(InputError, match=r"manifest\.jsonl:2: .*" + re.escape(words)) as e:
      read_manifest(m)
    assert "\n" not in str(e.value)
  m.write_bytes(b"\x00\x01binary")
  with pytest.raises(InputError, match="binary data"):
    tl.read_manifest(m)
  m.write_text("\n")
  with pytest.raises(InputError, match="no rows"):
    tl.read_manifest(m)
  with pytest.raises(InputError, match="no such manifest"):
    tl.read_manifest(tmp_path / "absent.jsonl")


def test_regularization_rows_are_confined(tmp_path):
  reg = tmp_path / "reg"
  reg.mkdir()
  (reg / "metadata.jsonl").write_text(
    "\n".join(
      [
        json.dumps({"file_name": "a.png", "caption": "a"}),
        json.dumps({"file_name": "../../etc/hostname", "caption": "b"}),
        '{"file_name": "c.png", "caption": "\\udc80"}',
        json.dumps({"file_name": "/abs/d.png", "caption": "d"}),
        json.dumps({"file_name": "e\u0000.png", "caption": "e"}),
      ]
    )
    + "\n"
  )
  skips = Skips()
  assert [p for p, _, _ in read_regularization(reg, skips)] == [str(reg / "a.png"), "/abs/d.png"]
  why = dict(skips)
  meta = reg / "metadata.jsonl"
  assert list(why) == [f"{meta}:2", f"{meta}:3", f"{meta}:5"]
  assert "file_name ../../etc/hostname escapes" in why[f"{meta}:2"] and "lone surrogate" in why[f"{meta}:3"]
  items = read_regularization(reg, Skips(), allow_outside=True)
  assert [p for p, _, _ in items][1] == os.path.normpath(tmp_path / "../etc/hostname")


def test_latent_cache_never_unpickles(tmp_path):
  key = json.dumps([["a.png", "a"], 16])
  path = tmp_path / "latent_cache.npz"
  ok = {"moments": np.zeros((1, 2, 2, 8), np.float32), "context": np.zeros((1, 77, 4), np.float32)}
  np.savez(path, key=np.asarray(key), **ok)
  cache = tl._load_cache(path, key, 1)
  assert cache is not None and len(cache) == 1
  assert tl._load_cache(path, key.replace("a.png", "b.png"), 1) is None  # other rows: rebuilt
  for content, words in [
    ({"key": np.asarray(key), "moments": np.array([{"x": 1}], dtype=object), "context": ok["context"]}, "allow_pickle"),
    ({"key": np.asarray(key), "context": ok["context"]}, "expected key, moments and context"),
    ({"key": np.asarray(key), "moments": ok["moments"].astype(np.float64), "context": ok["context"]}, "float32"),
    ({"key": np.asarray(key), "moments": ok["moments"][:0], "context": ok["context"]}, "of 1 rows"),
  ]:
    np.savez(path, **content)
    with pytest.raises(InputError, match=r"latent_cache\.npz: not a readable latent cache .*" + words):
      tl._load_cache(path, key, 1)
  for raw in (b"", b"garbage", b"PK\x03\x04 truncated"):
    path.write_bytes(raw)
    with pytest.raises(InputError, match="delete it to rebuild it"):
      tl._load_cache(path, key, 1)
  np.save(tmp_path / "plain.npy", np.zeros(3))
  with pytest.raises(InputError, match="a .npy array"):
    tl._load_cache(tmp_path / "plain.npy", key, 1)


# ------------------------------------------------------------------------------------------------------------
# the real bomb: a 2 MB part holding a 2 GiB member, labelled in a subprocess
# ------------------------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent(
  """
  import json, sys
  import jax, numpy, PIL.Image  # imported before the baseline
  from hps_jax.cli import main
  from hps_jax.preference import scorer  # noqa: F401
  def status_kib(key):  # this process's own counters: VmRSS now, VmHWM its peak (ru_maxrss would include the
    # parent's resident set inherited at fork, which execve carries over on Linux)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
  before = status_kib("VmRSS")
  rc = main(sys.argv[1:])
  print(json.dumps({"rc": rc, "growth_kib": status_kib("VmHWM") - before, "peak_kib": status_kib("VmHWM")}))
  """
)


def test_label_real_zip_bomb_in_bounded_memory(checkpoint, tmp_path):  # noqa: F811
  """bomb.png: 2 GiB of zeros (~2 MB deflated; the old reader held it whole, 4.6 GB peak), refused from its
  headers. liar.png: 2047 MiB of zeros whose central directory claims 60 MiB (under the 64 MiB cap, ratio ~30:1):
  it is really decompressed, stops at the declared size and fails its CRC. Both named, peak growth < 1 GiB."""
  good = {f"g{i}.png": encode(gradient(i)) for i in range(3)}
  members = {**good, "bomb.png": 2 * 1024 * MiB, "liar.png": 2047 * MiB}
  zp = deflated_part(tmp_path / "db" / "part-000001.zip", members, {n: {"p": "a cat"} for n in members})
  patch_central(zp, "liar.png", file_size=60 * MiB)
  assert zp.stat().st_size < 8 * MiB
  with zipfile.ZipFile(zp) as zf:
    assert zf.getinfo("bomb.png").file_size == 2 * 1024 * MiB
  out = tmp_path / "run" / "manifest.jsonl"
  args = ["label", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "db"), "--alpha", "1"]
  args += ["--regularization", str(_reg(tmp_path)), "--out", str(out), "--batch-size", "4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  res = subprocess.run(
    [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
  )
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.loads(res.stdout.strip().splitlines()[-1])
  assert result["rc"] == 1, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  assert re.search(r"skipped .*part-000001\.zip:bomb\.png: member of 2147483648 bytes .* exceeds the cap", res.stderr)
  assert re.search(r"skipped .*part-000001\.zip:liar\.png: cannot read zip member: Bad CRC", res.stderr)
  assert "done: 3 images processed" in res.stderr
  assert result["growth_kib"] < 1024 * 1024, result  # the brief: peak RSS growth under 1 GiB
  assert out.exists()
