"""`hps-jax study create` and the study file: alignment of `sample --ab` output by prompt and seed, folders by
file name, manifests by prompt (equal seeds first), sha256 of every listed image, attention checks with their
answers, determinism with --seed, misaligned inputs named (exit 1), nothing pairable / bad arguments (exit 2, one
line), and `load_study` refusing tampered files."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main
from hps_jax.errors import InputError
from hps_jax.study.create import FORMAT, image_path, load_study, verify_images

W, H = 40, 24  # not square: width and height must not be swapped

SD_SETTINGS = {  # what `hps-jax sample --ab` adds to every row (hps_jax/cli/sample.py)
  "model": "sd-v1-4",
  "steps": 50,
  "guidance": 7.5,
  "scheduler": "pndm",
  "height": H,
  "width": W,
  "lora": "lora.safetensors",
  "lora_format": "peft",
}


def _png(path: Path, seed: int, size=(W, H)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def _make_ab(root: Path, prompts, *, seed=0, num_images=1) -> list[tuple[str, int, str]]:
  """A `sample --ab --outdir ROOT` folder written as sample.py writes it: ROOT/adapted and ROOT/base, each with
  {j:04d}_{seed}.png files and samples.jsonl rows (file, prompt, seed, negative_prompt, lora_scale, settings), and
  ROOT/ab_grid.png; the adapted rows are written in reverse order (alignment must not depend on line order).
  -> the (prompt, seed, file) slots."""
  slots = [(p, seed + j * num_images + k, j) for j, p in enumerate(prompts) for k in range(num_images)]
  for v, (name, scale, negative) in enumerate((("adapted", 1.0, "Weird image."), ("base", 0.0, ""))):
    rows = []
    for prompt, s, j in slots:
      file = f"{j:04d}_{s}.png"
      _png(root / name / file, 1000 * v + s)
      rows.append(
        {"file": file, "prompt": prompt, "seed": s, "negative_prompt": negative, "lora_scale": scale, **SD_SETTINGS}
      )
    if name == "adapted":
      rows.reverse()
    (root / name / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  _png(root / "ab_grid.png", 99, (2 * W, len(slots) * H))
  return [(p, s, f"{j:04d}_{s}.png") for p, s, j in slots]


def _sha(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _create(*args) -> int:
  return main(["study", "create", *map(str, args)])


def _read(path: Path) -> dict:
  return json.loads(path.read_text())


def _by_id(study: dict) -> dict:
  return {img["id"]: img for img in study["images"]}


def _one_error_line(err: str) -> str:
  """The one error line (the progress bar of the image check, when it ran, is not a message)."""
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith("checking images:")]
  assert "Traceback" not in err
  assert len(lines) == 1, err
  assert lines[0].startswith("hps-jax study: error: "), err
  return lines[0]


PROMPTS = ["a red cube on a table", "a blue sphere", "a cat wearing a hat"]


def test_ab_pairs_align_by_prompt_and_seed(tmp_path, capsys):
  ab = tmp_path / "ab"
  slots = _make_ab(ab, PROMPTS, seed=5, num_images=2)
  consent = tmp_path / "consent.txt"
  consent.write_text("I agree to take part.\n")
  out = ab / "study.json"
  assert _create("--ab", ab, "--out", out, "--title", "SD vs HPS", "--consent", consent) == 0
  assert f"wrote the study (6 test pairs, 0 checks) to {out}" in capsys.readouterr().err

  study = _read(out)
  assert study["format"] == FORMAT == "hps-jax-study/1"
  assert study["systems"] == ["adapted", "base"]
  assert study["sources"] == {
    "adapted": {"kind": "ab", "path": str(ab / "adapted")},
    "base": {"kind": "ab", "path": str(ab / "base")},
  }
  assert study["settings"] == {
    "title": "SD vs HPS",
    "instructions": study["settings"]["instructions"],
    "consent": "I agree to take part.",
    "allow_tie": False,
    "pairs_per_participant": 6,
    "checks": 0,
    "pairs_per_prompt": 0,
    "seed": 0,
  }
  images = _by_id(study)
  assert len(images) == 12  # ab_grid.png is not an input
  for img in study["images"]:
    assert img["sha256"] == _sha(ab / img["path"])
    assert (img["width"], img["height"]) == (W, H)
  pairs = study["pairs"]
  assert [p["id"] for p in pairs] == [f"t{i:04d}" for i in range(1, 7)]
  seen = set()
  for pair in pairs:
    assert set(pair) == {"id", "kind", "prompt", "images"}  # no sides: they are randomized when served
    first, second = (images[i] for i in pair["images"])
    assert (first["system"], second["system"]) == ("adapted", "base")
    assert first["prompt"] == second["prompt"] == pair["prompt"]
    assert first["seed"] == second["seed"]
    file = f"{PROMPTS.index(pair['prompt']):04d}_{first['seed']}.png"
    assert (first["path"], second["path"]) == (f"adapted/{file}", f"base/{file}")
    assert (first["id"], second["id"]) == (f"adapted/{file}", f"base/{file}")
    seen.add((pair["prompt"], first["seed"], file))
  assert seen == set(slots)

  loaded = load_study(out)
  assert image_path(loaded, "base/0001_7.png") == ab / "base" / "0001_7.png"
  assert verify_images(loaded) == []


def test_ab_names_and_best_of_rows_align_by_slot_seed(tmp_path):
  """Best-of-N rows carry the kept candidate's seed (different per side): they align by their slot's seed."""
  ab = tmp_path / "ab"
  _make_ab(ab, PROMPTS[:2], seed=3)
  for name, best in (("adapted", 1), ("base", 0)):
    rows = [json.loads(line) for line in (ab / name / "samples.jsonl").read_text().splitlines()]
    for row in rows:
      slot = row["seed"]
      row["candidates"] = [{"seed": slot * 2 + c, "hps": 20.0 + c} for c in range(2)]
      row["seed"] = slot * 2 + best
    (ab / name / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "s" / "study.json"
  assert _create("--ab", ab, "--names", "sd14", "sd14+hps", "--out", out) == 0
  study = _read(out)
  assert study["systems"] == ["sd14", "sd14+hps"]
  images = _by_id(study)
  for pair in study["pairs"]:
    base, adapted = (images[i] for i in pair["images"])
    assert (base["system"], adapted["system"]) == ("sd14", "sd14+hps")
    assert Path(base["path"]).name == Path(adapted["path"]).name  # the same slot
    assert adapted["seed"] == base["seed"] + 1
    assert Path(base["path"]).is_absolute()  # outside the study's folder: absolute


def test_checks_have_their_expected_answers(tmp_path):
  ab = tmp_path / "ab"
  _make_ab(ab, PROMPTS)
  out = tmp_path / "study" / "study.json"
  args = ["--ab", ab, "--out", out, "--allow-tie", "--checks", 4, "--broken-checks", "--pairs-per-participant", 2]
  assert _create(*args) == 0
  study = _read(out)
  images = _by_id(study)
  assert study["settings"]["allow_tie"] is True
  assert study["settings"]["pairs_per_participant"] == 2
  assert study["counts"] == {"test_pairs": 3, "checks": 4, "left_out_by_pairs_per_prompt": 0}
  checks = [p for p in study["pairs"] if p["kind"] == "check"]
  assert [(c["id"], c["check"]) for c in checks] == [
    ("c001", "identical"),
    ("c002", "broken"),
    ("c003", "identical"),
    ("c004", "broken"),
  ]
  for c in checks:
    intact = images[c["images"][0]]
    assert c["prompt"] == intact["prompt"]
    if c["check"] == "identical":
      assert c["images"][0] == c["images"][1] and c["expected"] == "tie"
      continue
    broken = images[c["images"][1]]
    n = int(c["id"][1:]) // 2
    assert broken["id"] == f"broken-{n:03d}" and broken["path"] == f"checks/broken-{n:03d}.png"
    assert broken["system"] is None and broken["broken_from"] == intact["id"]
    assert c["expected"] == intact["system"] and c["expected_image"] == intact["id"]
    assert broken["sha256"] == _sha(out.parent / broken["path"])
    a = np.asarray(Image.open(out.parent / broken["path"]), np.float64)
    b = np.asarray(Image.open(image_path(load_study(out), intact["id"])), np.float64)
    assert a.shape == b.shape == (H, W, 3) and np.abs(a - b).mean() > 30  # visibly broken


def test_forced_choice_checks_are_broken_image_checks(tmp_path, capsys):
  ab = tmp_path / "ab"
  _make_ab(ab, PROMPTS)
  out = ab / "study.json"
  assert _create("--ab", ab, "--out", out, "--checks", 2, "--broken-checks") == 0
  study = _read(out)
  assert [p["check"] for p in study["pairs"] if p["kind"] == "check"] == ["broken", "broken"]
  assert study["settings"]["allow_tie"] is False


def test_same_seed_same_study(tmp_path):
  ab = tmp_path / "ab"
  _make_ab(ab, PROMPTS, num_images=2)
  out = ab / "study.json"
  args = ["--ab", ab, "--out", out, "--seed", 7, "--allow-tie", "--checks", 3, "--broken-checks", "--overwrite"]
  assert _create(*args) == 0
  first, check1 = _read(out), _sha(ab / "checks" / "broken-001.png")
  assert _create(*args) == 0
  second, check2 = _read(out), _sha(ab / "checks" / "broken-001.png")
  first.pop("created"), second.pop("created")
  assert first == second and check1 == check2
  assert _create(*[0 if a == 7 else a for a in args]) == 0
  third = _read(out)
  assert third["settings"]["seed"] == 0
  assert [p["images"] for p in third["pairs"]] != [p["images"] for p in first["pairs"]]  # other check images


def _manifest(path: Path, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_manifests_align_by_prompt_equal_seeds_first(tmp_path):
  d = tmp_path / "data"
  sd_rows, hps_rows = [], []
  for s in (1, 2, 3):
    _png(d / "sd" / f"cube_{s}.png", s)
    sd_rows.append({"image": f"sd/cube_{s}.png", "prompt": "a cube", "seed": s})
  for s in (2, 1, 9):
    _png(d / "hps" / f"cube_{s}.png", 100 + s)
    hps_rows.append({"image": f"hps/cube_{s}.png", "prompt": "a cube", "seed": s})
  for k in range(4):  # no seeds: drawn with --seed
    _png(d / "sd" / f"dog_{k}.png", 10 + k)
    _png(d / "hps" / f"dog_{k}.png", 110 + k)
    sd_rows.append({"image": f"sd/dog_{k}.png", "prompt": "a dog"})
    hps_rows.append({"image": f"hps/dog_{k}.png", "prompt": "a dog"})
  _manifest(d / "sd.jsonl", sd_rows)
  _manifest(d / "hps.jsonl", hps_rows)

  def pairing(seed):
    out = tmp_path / f"study{seed}.json"
    assert _create("--system", f"sd={d / 'sd.jsonl'}", "--system", f"hps={d / 'hps.jsonl'}", "--out", out,
                   "--seed", seed, "--overwrite") == 0  # fmt: skip
    study = _read(out)
    assert study["systems"] == ["hps", "sd"]
    images = _by_id(study)
    got = {}
    for pair in study["pairs"]:
      a, b = (images[i] for i in pair["images"])
      assert (a["system"], b["system"]) == ("hps", "sd") and a["prompt"] == b["prompt"] == pair["prompt"]
      got.setdefault(pair["prompt"], set()).add((Path(a["path"]).name, Path(b["path"]).name))
    return got

  got = pairing(0)
  assert got["a cube"] == {("cube_1.png", "cube_1.png"), ("cube_2.png", "cube_2.png"), ("cube_9.png", "cube_3.png")}
  assert len(got["a dog"]) == 4
  assert {a for a, _ in got["a dog"]} == {f"dog_{k}.png" for k in range(4)}
  assert pairing(0) == got
  assert len({frozenset(pairing(seed)["a dog"]) for seed in range(1, 6)} | {frozenset(got["a dog"])}) > 1


def test_sample_and_metadata_folders_align_by_prompt(tmp_path):
  """A folder with samples.jsonl (`hps-jax sample` without --ab; its grid.png is not listed) and one with the Hugging
  Face imagefolder metadata.jsonl (file_name, text) are matched by prompt."""
  sd, hps = tmp_path / "sd", tmp_path / "hps"
  rows, meta = [], []
  for j, prompt in enumerate(PROMPTS):
    _png(sd / f"{j:04d}_{j}.png", j)
    _png(hps / "imgs" / f"{j}.png", 10 + j)
    rows.append({"file": f"{j:04d}_{j}.png", "prompt": prompt, "seed": j, "negative_prompt": "", **SD_SETTINGS})
    meta.append({"file_name": f"imgs/{j}.png", "text": prompt})
  _png(sd / "grid.png", 99)
  _manifest(sd / "samples.jsonl", rows)
  _manifest(hps / "metadata.jsonl", meta[::-1])
  out = tmp_path / "study.json"
  assert _create("--system", f"sd={sd}", "--system", f"hps={hps}", "--out", out) == 0
  study = _read(out)
  assert study["sources"]["sd"]["kind"] == study["sources"]["hps"]["kind"] == "samples"
  images = _by_id(study)
  got = {p["prompt"]: [images[i]["path"] for i in p["images"]] for p in study["pairs"]}
  assert got == {prompt: [f"hps/imgs/{j}.png", f"sd/{j:04d}_{j}.png"] for j, prompt in enumerate(PROMPTS)}
  assert images["hps/imgs/0.png"]["seed"] is None and images["sd/0000_0.png"]["seed"] == 0


def test_three_system_folders(tmp_path, capsys):
  names = ("sd14", "sd14-hps", "sd21")
  for v, name in enumerate(names):
    for k in range(4):
      ext = ".jpg" if name == "sd21" and k == 0 else ".png"  # matched by name without the extension
      _png(tmp_path / name / f"img{k}{ext}", 10 * v + k)
    _png(tmp_path / name / "sub" / "img0.png", 50 + v)  # matched by the path below the folder
  systems = [a for name in names for a in ("--system", f"{name}={tmp_path / name}")]
  out = tmp_path / "study.json"
  assert _create(*systems, "--out", out) == 0
  study = _read(out)
  images = _by_id(study)
  assert len(study["pairs"]) == 5 * 3  # 5 files x every pair of the 3 systems
  combos = {}
  for pair in study["pairs"]:
    a, b = (images[i] for i in pair["images"])
    assert a["system"] < b["system"] and pair["prompt"] is None
    stem = lambda img: Path(img["path"]).with_suffix("").relative_to(img["system"])
    assert stem(a) == stem(b)
    combos[(a["system"], b["system"])] = combos.get((a["system"], b["system"]), 0) + 1
  assert combos == {("sd14", "sd14-hps"): 5, ("sd14", "sd21"): 5, ("sd14-hps", "sd21"): 5}
  assert images["sd21/img0.jpg"]["sha256"] == _sha(tmp_path / "sd21" / "img0.jpg")

  assert _create(*systems, "--out", out, "--overwrite", "--pairs-per-prompt", 1) == 0
  assert "10 pairs left out by --pairs-per-prompt" in capsys.readouterr().err
  study = _read(out)
  assert len(study["pairs"]) == 5 and study["counts"]["left_out_by_pairs_per_prompt"] == 10


def test_misaligned_inputs_are_named_exit_1(tmp_path, capsys):
  ab = tmp_path / "ab"
  _make_ab(ab, PROMPTS)  # seeds 0, 1, 2
  rows = (ab / "adapted" / "samples.jsonl").read_text().splitlines()
  rows = [r for r in rows if json.loads(r)["prompt"] != "a cat wearing a hat"]  # only in base
  escape = {"file": "../../outside.png", "prompt": "a dog", "seed": 9}
  (ab / "adapted" / "samples.jsonl").write_text("\n".join(rows + [json.dumps(escape)]) + "\n")
  (ab / "base" / "0001_1.png").write_bytes(b"not a png")  # its adapted partner is left alone
  out = ab / "study.json"
  assert _create("--ab", ab, "--out", out) == 1
  err = capsys.readouterr().err
  assert "done: 1 test pairs processed, 4 skipped" in err
  assert "skipped prompt 'a cat wearing a hat' seed 2: only in base; missing from adapted" in err
  assert f"skipped base: {ab / 'base' / '0001_1.png'}: " in err
  assert "skipped prompt 'a blue sphere' seed 1: only in adapted; missing from base" in err
  assert f"skipped adapted: {ab / 'adapted' / 'samples.jsonl'}:3: " in err and "escapes" in err
  study = _read(out)
  assert [p["prompt"] for p in study["pairs"]] == ["a red cube on a table"]


def test_a_file_name_that_is_not_unicode_is_named(tmp_path, capsys):
  for name in ("a", "b"):
    _png(tmp_path / name / "x.png", len(name))
  bad = os.path.join(os.fsencode(tmp_path / "a"), b"\xff.png")
  with open(bad, "wb") as f:
    f.write((tmp_path / "a" / "x.png").read_bytes())
  out = tmp_path / "study.json"
  assert _create("--system", f"a={tmp_path / 'a'}", "--system", f"b={tmp_path / 'b'}", "--out", out) == 1
  assert f"skipped a: {tmp_path / 'a'}/\\xff.png: the file name is not valid Unicode" in capsys.readouterr().err
  assert len(_read(out)["pairs"]) == 1


def test_nothing_to_pair_is_exit_2(tmp_path, capsys):
  _png(tmp_path / "a" / "x.png", 1)
  _png(tmp_path / "b" / "y.png", 2)
  out = tmp_path / "study.json"
  assert _create("--system", f"a={tmp_path / 'a'}", "--system", f"b={tmp_path / 'b'}", "--out", out) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert "no pair can be formed from a, b: 2 inputs skipped (first: file x: only in a; missing from b" in line
  assert not out.exists()


BAD_ARGS = [
  (["--system", "a=A"], "a study compares two or more systems: got one"),
  (["--system", "tie=A", "--system", "b=B"], "--system name 'tie' is reserved"),
  (["--system", "a/b=A", "--system", "b=B"], "--system name 'a/b': expected letters, digits"),
  (["--system", "a=A", "--system", "b=A"], "the same images as --system a"),
  (["--system", "a=A", "--system", "b=missing"], "--system b=missing: no such file or folder"),
  (["--system", "a=A", "--system", "b=AB/base"], "cannot align plain image folders (a: matched by file name) with"),
  (["--ab", "AB", "--system", "a=A"], "give the images: --ab OUTDIR, or two or more --system NAME=PATH"),
  (["--ab", "AB", "--checks", "2"], "an identical-image check expects 'tie'"),
  (["--ab", "AB", "--broken-checks"], "give their number with --checks N"),
  (["--ab", "AB", "--names", "x", "x"], "--names: the two systems need different names"),
  (["--ab", "AB", "--pairs-per-participant", "4"], "--pairs-per-participant 4 exceeds the 3 test pairs"),
  (["--ab", "AB", "--out", "OUT.txt"], "unknown format .txt; use .json"),
  (["--ab", "AB", "--out", "AB/base/samples.jsonl"], "unknown format .jsonl"),
  (["--ab", "AB", "--out", "EXISTING"], "exists: pass --overwrite to replace it"),
  (["--ab", "AB", "--consent", "missing.txt"], "--consent missing.txt: cannot read it"),
  (["--ab", "AB/base"], "samples.jsonl: not found (expected the output of `hps-jax sample --ab`"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[m[:30] for _, m in BAD_ARGS])
def test_bad_arguments_are_one_line_exit_2(args, message, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _make_ab(tmp_path / "AB", PROMPTS)
  _png(tmp_path / "A" / "x.png", 1)
  _png(tmp_path / "B" / "x.png", 2)
  (tmp_path / "EXISTING").mkdir()
  existing = tmp_path / "EXISTING" / "study.json"
  existing.write_text("{}")
  args = [str(existing) if a == "EXISTING" else a for a in args]
  out = [] if "--out" in args else ["--out", "new/study.json"]
  assert _create(*args, *out) == 2
  assert message in _one_error_line(capsys.readouterr().err)
  assert not (tmp_path / "new" / "study.json").exists() and existing.read_text() == "{}"


def _study(tmp_path) -> Path:
  ab = tmp_path / "ab"
  _make_ab(ab, PROMPTS)
  out = ab / "study.json"
  assert _create("--ab", ab, "--out", out, "--allow-tie", "--checks", 2, "--broken-checks") == 0
  return out


def _dup_image_id(s):
  s["images"][1]["id"] = s["images"][0]["id"]


def _missing_image_id(s):
  s["pairs"][0]["images"][1] = "base/nope.png"


def _dotdot_path(s):
  s["images"][0]["path"] = "../elsewhere/x.png"


def _bad_sha(s):
  s["images"][0]["sha256"] = "ABC"


def _dup_pair_id(s):
  s["pairs"][1]["id"] = s["pairs"][0]["id"]


def _sides_swapped(s):
  s["pairs"][0]["images"].reverse()


def _wrong_answer(s):
  check = next(p for p in s["pairs"] if p.get("check") == "broken")
  check["expected"] = "base" if check["expected"] == "adapted" else "adapted"


def _tie_without_allow_tie(s):
  s["settings"]["allow_tie"] = False


def _future_format(s):
  s["format"] = "hps-jax-study/2"


def _too_many_per_participant(s):
  s["settings"]["pairs_per_participant"] = 4


TAMPERED = [
  (_dup_image_id, "duplicate image id 'adapted/0000_0.png'"),
  (_missing_image_id, "pair 't0001': image id 'base/nope.png' is not in images"),
  (_dotdot_path, "path ../elsewhere/x.png escapes"),
  (_bad_sha, "sha256: expected 64 lowercase hex digits, got 'ABC'"),
  (_dup_pair_id, "duplicate pair id 't0001'"),
  (_sides_swapped, "a test pair shows two systems' images in system order, got 'base' and 'adapted'"),
  (_wrong_answer, "expected must be the intact image's system"),
  (_tie_without_allow_tie, "an identical check expects 'tie', which needs settings.allow_tie"),
  (_future_format, "study format 'hps-jax-study/2' is not supported"),
  (_too_many_per_participant, "settings.pairs_per_participant: expected an integer in [1, 3]"),
]


@pytest.mark.parametrize("tamper, message", TAMPERED, ids=[t.__name__ for t, _ in TAMPERED])
def test_load_study_rejects_a_tampered_file(tamper, message, tmp_path):
  path = _study(tmp_path)
  study = _read(path)
  load_study(path)  # the untouched file is valid
  tamper(study)
  path.write_text(json.dumps(study))
  with pytest.raises(InputError) as e:
    load_study(path)
  assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_load_study_rejects_what_is_not_a_study(tmp_path):
  for text, message in (("[1, 2]", "expected a JSON object"), ("{", "not valid UTF-8 JSON"), ("{}", "format is None")):
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(InputError, match="not a study file") as e:
      load_study(tmp_path / "s.json")
    assert message in str(e.value)


def test_verify_images_reports_changed_and_missing_files(tmp_path):
  path = _study(tmp_path)
  study = load_study(path)
  assert verify_images(study) == []
  _png(path.parent / "base" / "0000_0.png", 12345)
  (path.parent / "checks" / "broken-001.png").unlink()
  problems = dict(verify_images(study))
  assert set(problems) == {"base/0000_0.png", "broken-001"}
  assert "differs from the study's" in problems["base/0000_0.png"]
  assert "cannot read it" in problems["broken-001"]
  with pytest.raises(InputError, match="no image 'base/none.png'"):
    image_path(study, "base/none.png")
