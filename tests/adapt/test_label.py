"""`hps-jax label`: the selection rule on hand-computed HPS values, the regularization and manifest readers, and
the command end to end on a synthetic DiffusionDB download (zip and JSONL inputs), with bad inputs reported as
skips and bad files as one-line errors."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from hps_jax.adapt.label import (
  PRESETS,
  LabelConfig,
  Selection,
  is_blurry,
  manifest_rows,
  max_neighbour_diff,
  read_manifest,
  read_regularization,
  select,
  select_by_prompt,
  softmax,
)
from hps_jax.cli import main
from tests.cli.test_cli import checkpoint  # noqa: F401  (the tiny random HPS checkpoint fixture)
from tests.data.test_diffusiondb import Skips, corrupt_member, encode, pixels, write_parquet, write_part


# ------------------------------------------------------------------------------------------------------------
# the rule, alpha = 2: keep best if softmax(HPS)[best] > 2/n, worst if softmax(-HPS)[worst] > 2/n
# ------------------------------------------------------------------------------------------------------------
def test_hand_computed_softmax():
  # [20, 21, 23.5] - 23.5 -> e^-3.5, e^-2.5, e^0 = 0.0302, 0.0821, 1 -> 1 / 1.1123 = 0.8991
  assert softmax([20, 21, 23.5])[2] == pytest.approx(0.8991, abs=1e-4)
  # -[20, 21, 23.5] + 20 -> e^0, e^-1, e^-3.5 = 1, 0.3679, 0.0302 -> 1 / 1.3981 = 0.7153
  assert softmax([-20, -21, -23.5])[0] == pytest.approx(0.7153, abs=1e-4)
  assert softmax([1000.0, 0.0]).tolist() == [1.0, 0.0]  # shifted by the max: no overflow


@pytest.mark.parametrize(
  "hps, expected",
  [
    # n = 2: 2/n = 1 and a softmax entry is at most 1, so nothing ever passes
    ([20, 21], (None, None)),
    ([0, 50], (None, None)),  # softmax = 1 - 2e-22 = 1.0 in float64, still not > 1
    # n = 3, threshold 2/3 = 0.6667
    ([20, 21, 23.5], (2, 0)),  # best 0.8991, worst 1 / (1 + e^-1 + e^-3.5) = 0.7153: both pass
    ([20, 20.5, 23], (2, None)),  # best e^3 / (1 + e^.5 + e^3) = 20.09 / 22.73 = 0.8835; worst 1 / 1.6563 = 0.6037
    ([20, 22.5, 23], (None, 0)),  # mirror image: best 0.6037, worst 0.8835
    ([20, 21, 22], (None, None)),  # e^2 / (1 + e + e^2) = 7.389 / 11.107 = 0.6652 both ways: just below 2/3
    ([23, 21, 22], (None, None)),  # the same values in another order
    # n = 4, threshold 2/4 = 0.5
    ([20, 20.5, 21, 23], (3, None)),  # best e^3 / (1 + e^.5 + e + e^3) = 0.7891; worst 1 / 2.024 = 0.4940
    ([20, 22, 22.5, 23], (None, 0)),  # worst 1 / (1 + e^-2 + e^-2.5 + e^-3) = 1 / 1.2672 = 0.7891; best 0.4940
    ([20, 22, 22, 24], (3, 0)),  # e^4 / (1 + 2 e^2 + e^4) = 54.60 / 70.38 = 0.7758 both ways
    ([24, 22, 20, 22], (0, 2)),  # the same, permuted
    ([20, 20.5, 21, 21.5], (None, None)),  # e^1.5 / (1 + e^.5 + e + e^1.5) = 4.482 / 9.849 = 0.4551 both ways
    # ties: the first of the tied images is the candidate, and a tied extreme shares its mass
    ([20, 20, 25], (2, None)),  # best e^5 / (e^5 + 2) = 0.9867; worst (index 0) 1 / (2 + e^-5) = 0.4983
    ([23, 20, 23], (None, 1)),  # best (index 0) e^0 / (2 + e^-3) = 0.4879; worst e^3 / (e^3 + 2) = 0.9094
    ([21, 21, 21, 21], (None, None)),  # 1/4 each
  ],
)
def test_select_alpha_2(hps, expected):
  assert select(hps, 2.0) == expected


def test_select_ties_and_degenerate_inputs():
  # alpha = 1, n = 4 (threshold 0.25): [25, 20, 25, 20] -> e^5 / (2 e^5 + 2) = 0.4967 both ways; first tied wins
  assert select([25, 20, 25, 20], 1.0) == (0, 1)
  # alpha = 0.5, n = 2 (threshold 0.25): equal scores give 0.5 both ways, but best == worst: neither is kept
  assert select([5, 5], 0.5) == (None, None)
  assert select([7.0], 0.5) == (None, None) and select([], 2.0) == (None, None)
  with pytest.raises(ValueError, match="1-d"):
    select([[1, 2], [3, 4]])
  with pytest.raises(ValueError, match="1-d"):
    select(3.0)


SCORED = [
  ("p3a", "three", 20.0),
  ("p4a", "four", 20.0),
  ("p2a", "two", 20.0),
  ("p3b", "three", 20.5),
  ("p1a", "one", 30.0),
  ("p4b", "four", 22.0),
  ("p2b", "two", 29.0),
  ("p4c", "four", 22.0),
  ("p3c", "three", 23.0),
  ("p4d", "four", 24.0),
]


def test_select_by_prompt_groups_in_first_appearance_order():
  sel, stats = select_by_prompt(SCORED, PRESETS["paper"])
  # three: [20, 20.5, 23] -> best only; four: [20, 22, 22, 24] -> both; two and one: n <= alpha, never scored
  assert sel == [Selection("three", 3, "p3c", None), Selection("four", 4, "p4d", "p4a")]
  assert stats == {"prompts": 4, "prompts_n_le_alpha": 2}


def test_min_images_filter_and_manifest_caption_prefix():
  config = LabelConfig(min_images=4)
  sel, stats = select_by_prompt(SCORED, config)
  assert sel == [Selection("four", 4, "p4d", "p4a")]
  assert stats == {"prompts": 4, "prompts_below_min_images": 3}
  assert select_by_prompt(SCORED, LabelConfig(min_images=5))[0] == []
  rows = manifest_rows(sel + [Selection("x", 3, None, "k")], lambda k: f"img/{k}.png")
  assert rows == [
    {"image": "img/p4d.png", "caption": "four", "kind": "preferred"},
    {"image": "img/p4a.png", "caption": "Weird image. four", "kind": "non_preferred"},
    {"image": "img/k.png", "caption": "Weird image. x", "kind": "non_preferred"},
  ]
  assert manifest_rows(sel, str, negative_prefix="Bad: ")[1]["caption"] == "Bad: four"


def test_blur_filter():
  flat = np.full((4, 6, 3), 100, np.uint8)
  assert max_neighbour_diff(flat) == 0
  assert is_blurry(flat, 10) and not is_blurry(flat, 0)  # 0 = off
  step9, step10, down10 = flat.copy(), flat.copy(), flat.copy()
  step9[:, 3:, 1] = 109
  step10[2, 5, 0] = 110
  down10[:, 3:] = 90  # a falling edge counts by its magnitude
  assert [max_neighbour_diff(a) for a in (step9, step10, down10)] == [9, 10, 10]
  assert [is_blurry(a, 10) for a in (step9, step10, down10)] == [True, False, False]
  assert max_neighbour_diff(np.zeros((5, 1, 3), np.uint8)) == 0
  assert max_neighbour_diff(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)) == 255


def test_config_presets_and_validation():
  assert PRESETS["paper"] == LabelConfig(2.0, 0, 0, "Weird image. ")
  assert (PRESETS["release"].blur_threshold, PRESETS["release"].min_images) == (10, 4)
  for bad in (LabelConfig(alpha=0), LabelConfig(alpha=float("nan")), LabelConfig(min_images=-1)):
    with pytest.raises(ValueError):
      bad.validate()


# ------------------------------------------------------------------------------------------------------------
# regularization and manifest readers
# ------------------------------------------------------------------------------------------------------------
def test_read_regularization_and_manifest(tmp_path):
  reg = tmp_path / "reg"
  reg.mkdir()
  (reg / "metadata.jsonl").write_text(
    "\n".join(
      [
        json.dumps({"file_name": "a.png", "caption": "a"}),
        "",
        "{oops",
        json.dumps({"file_name": "b.png"}),
        json.dumps({"file_name": "/abs/c.png", "caption": "c"}),
      ]
    )
    + "\n"
  )
  skips = Skips()
  items = read_regularization(reg, skips)
  assert [(p, c) for p, c, _ in items] == [(str(reg / "a.png"), "a"), ("/abs/c.png", "c")]
  assert [w for w, _ in skips] == [f"{reg / 'metadata.jsonl'}:3", f"{reg / 'metadata.jsonl'}:4"]
  assert read_regularization(reg / "metadata.jsonl", Skips()) == items  # the JSONL itself works too
  with pytest.raises(ValueError, match="no metadata.jsonl"):
    read_regularization(tmp_path, Skips())
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    read_regularization(tmp_path / "absent.jsonl", Skips())

  m = tmp_path / "out" / "manifest.jsonl"
  m.parent.mkdir()
  m.write_text(
    json.dumps({"image": "images/x.png", "caption": "x", "kind": "preferred"})
    + "\n\n"
    + json.dumps({"image": "/abs/y.png", "caption": "y", "kind": "regularization"})
    + "\n"
  )
  assert [r["image"] for r in read_manifest(m)] == [str(m.parent / "images/x.png"), "/abs/y.png"]
  m.write_text(m.read_text() + "{broken\n")
  with pytest.raises(ValueError, match=r"manifest\.jsonl:4: not valid JSON"):
    read_manifest(m)
  m.write_text(json.dumps({"image": "x.png"}) + "\n")
  with pytest.raises(ValueError, match=r"manifest\.jsonl:1: expected"):
    read_manifest(m)


# ------------------------------------------------------------------------------------------------------------
# the command end to end
# ------------------------------------------------------------------------------------------------------------
def gradient(seed: int) -> np.ndarray:
  """A 16x16 horizontal blend of two random colours (neighbour steps of about 255/15 at most)."""
  c = np.random.default_rng(seed).integers(0, 256, (2, 3))
  t = np.linspace(0, 1, 16)[None, :, None]
  return np.broadcast_to(c[0] * (1 - t) + c[1] * t, (16, 16, 3)).astype(np.uint8)


# name -> (pixels, prompt). Prompts: "a red car" n=3, "a cat" n=5 (one member is not an image), "mountains" n=4
# (one member fails its CRC), "a lone tree" n=1 (never scored).
ZIP1 = {
  "a1.png": (gradient(0), "a red car"),
  "a2.png": (pixels(0), "a red car"),
  "b1.png": (pixels(1), "a cat"),
  "b2.png": (pixels(2), "a cat"),
  "c1.png": (pixels(3), "mountains"),
  "corrupt.png": (pixels(7), "mountains"),
  "junk.png": (None, "a cat"),
}
ZIP2 = {
  "a3.webp": (gradient(1), "a red car"),
  "b3.webp": (gradient(2), "a cat"),
  "b4.webp": (gradient(3), "a cat"),
  "c2.webp": (gradient(1), "mountains"),
  "c3.webp": (pixels(1), "mountains"),
  "d1.webp": (pixels(9), "a lone tree"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A DiffusionDB folder (2M-style PNG part, Large-style WebP part; prompts of part 1 from metadata.parquet, of
  part 2 from its part JSON), and a regularization folder with one broken image and one malformed line."""
  d = tmp_path_factory.mktemp("label")
  root = d / "db"
  members1 = {n: (encode(a) if a is not None else b"\x89PNG but not really") for n, (a, _) in ZIP1.items()}
  members1.update({"nop.png": encode(pixels(8)), "readme.txt": b"text"})
  z1 = write_part(root / "images" / "part-000001.zip", members1, {"a1.png": {"p": "overridden by the parquet"}})
  corrupt_member(z1, "corrupt.png")
  write_parquet(root / "metadata.parquet", [{"image_name": n, "prompt": p, "part_id": 1} for n, (_, p) in ZIP1.items()])
  z2 = write_part(
    root / "diffusiondb-large-part-1" / "part-000002.zip",
    {n: encode(a, "WEBP") for n, (a, _) in ZIP2.items()},
    {n: {"p": p} for n, (_, p) in ZIP2.items()},
  )
  reg = d / "reg"
  reg.mkdir()
  Image.fromarray(pixels(20)).save(reg / "r1.png")
  Image.fromarray(gradient(20)).save(reg / "r2.jpg")
  (reg / "broken.png").write_bytes(b"not an image")
  (reg / "metadata.jsonl").write_text(
    "\n".join(
      [
        json.dumps({"file_name": "r1.png", "caption": "a photo"}),
        json.dumps({"file_name": "broken.png", "caption": "b"}),
        "{oops",
        json.dumps({"file_name": "r2.jpg", "caption": "a drawing"}),
      ]
    )
    + "\n"
  )
  return {"root": root, "z1": z1, "z2": z2, "reg": reg}


@pytest.fixture(scope="module")
def reference(checkpoint):  # noqa: F811
  """HPS of (pixels, prompt) pairs through the library API, one bucket of 8 (a single compilation)."""
  from hps_jax.preference.scorer import Scorer

  scorer = Scorer.from_checkpoint(checkpoint, buckets=(8,))
  return lambda images, prompts: scorer.score(images, prompts)


def _label(capsys, *args):
  rc = main(["label", *map(str, args)])
  out, err = capsys.readouterr()
  return rc, out, err


def _check_selection(scores_path, manifest, reference, config, image_of):
  """The manifest's selections are select_by_prompt's on HPS recomputed here; returns the reference scores."""
  rows = [json.loads(l) for l in scores_path.read_text().splitlines()]
  want = reference([image_of(r["image"]) for r in rows], [r["prompt"] for r in rows])
  np.testing.assert_allclose([r["hps"] for r in rows], want, rtol=1e-5, atol=1e-4)
  sel, _ = select_by_prompt([(r["image"], r["prompt"], h) for r, h in zip(rows, want)], config)
  expected = manifest_rows(sel, lambda where: where)
  got = [r for r in manifest if r["kind"] != "regularization"]
  assert [(r["caption"], r["kind"]) for r in got] == [(r["caption"], r["kind"]) for r in expected]
  kinds = {r["image"]: r["kind"] for r in rows}
  assert [kinds[r["image"]] for r in expected] == [r["kind"] for r in expected]  # --scores marks the same ones
  return expected, got


def test_label_diffusiondb_end_to_end(inputs, checkpoint, reference, capsys, tmp_path):  # noqa: F811
  out = tmp_path / "run" / "manifest.jsonl"
  rc, stdout, stderr = _label(
    capsys,
    "--scorer",
    checkpoint,
    "--images",
    inputs["root"],
    "--regularization",
    inputs["reg"],
    "--out",
    out,
    "--scores",
    tmp_path / "scores.jsonl",
    "--alpha",
    1.5,
    "--batch-size",
    8,
  )
  assert rc == 1, stderr  # finished, with skips
  z1, z2, reg = inputs["z1"], inputs["z2"], inputs["reg"]
  skipped = {l.split(": ", 1)[0].removeprefix("  skipped "): l for l in stderr.splitlines() if "skipped " in l}
  assert set(skipped) == {
    f"{z1}:readme.txt",
    f"{z1}:nop.png",
    f"{z1}:corrupt.png",
    f"{z1}:junk.png",
    f"{reg / 'metadata.jsonl'}:2 ({reg / 'broken.png'})",
    f"{reg / 'metadata.jsonl'}:3",
  }
  assert "not an image member" in skipped[f"{z1}:readme.txt"] and "no prompt" in skipped[f"{z1}:nop.png"]
  assert "Bad CRC" in skipped[f"{z1}:corrupt.png"] and "not a recognised image" in skipped[f"{z1}:junk.png"]
  assert "done: 10 images processed, 6 skipped" in stderr

  # the selection is the rule applied to independently computed HPS
  data = {}
  for z in (z1, z2):
    with zipfile.ZipFile(z) as zf:
      data.update({f"{z}:{n}": zf.read(n) for n in zf.namelist() if n != "corrupt.png"})
  manifest = [json.loads(l) for l in out.read_text().splitlines()]
  config = LabelConfig(alpha=1.5)
  expected, got = _check_selection(tmp_path / "scores.jsonl", manifest, reference, config, data.__getitem__)
  for e, g in zip(expected, got):  # images written out, original bytes, under images/<part>/<member>
    zp, name = e["image"].rsplit(":", 1)
    part = "images/part-000001" if zp == str(z1) else "diffusiondb-large-part-1/part-000002"
    assert g["image"] == f"images/{part}/{name}"
    assert (out.parent / g["image"]).read_bytes() == data[e["image"]]
    pix, prompt = {**ZIP1, **ZIP2}[name]
    np.testing.assert_array_equal(np.asarray(Image.open(out.parent / g["image"]).convert("RGB")), pix)
    assert g["caption"] == (prompt if g["kind"] == "preferred" else "Weird image. " + prompt)
  assert manifest[len(got) :] == [
    {"image": str(reg / "r1.png"), "caption": "a photo", "kind": "regularization"},
    {"image": str(reg / "r2.jpg"), "caption": "a drawing", "kind": "regularization"},
  ]
  assert read_manifest(out)[0]["image"] == str(out.parent / got[0]["image"])

  summary = json.loads(stdout.strip().splitlines()[-1])
  n_pref = sum(r["kind"] == "preferred" for r in expected)
  assert summary["counts"] == {"preferred": n_pref, "non_preferred": len(expected) - n_pref, "regularization": 2}
  assert n_pref >= 1 and len(expected) - n_pref >= 1  # the fixture exercises both kinds
  assert {k: summary[k] for k in ("images", "scored", "blurry", "skipped", "prompts", "prompts_not_scored")} == {
    "images": 13,
    "scored": 10,
    "blurry": 0,
    "skipped": 6,
    "prompts": 4,
    "prompts_not_scored": 1,
  }
  assert summary["config"] == {
    "preset": "paper",
    "alpha": 1.5,
    "blur_threshold": 0,
    "min_images": 0,
    "negative_prefix": "Weird image. ",
  }


def test_label_jsonl_release_preset(inputs, checkpoint, reference, capsys, tmp_path):  # noqa: F811
  """JSONL input, regularization given as a JSONL, preset release: flat images are dropped before the softmax and
  "mountains" (3 left of 4) is then dropped; "a red car" (n=3 < 4) is never scored."""
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  order = [
    "c1.png",
    "flat2",
    "c2.webp",
    "c3.webp",
    "b1.png",
    "b2.png",
    "flat",
    "b3.webp",
    "b4.webp",
    "a1.png",
    "a2.png",
    "a3.webp",
  ]
  src = {
    **ZIP1,
    **ZIP2,
    "flat": (np.full((16, 16, 3), 90, np.uint8), "a cat"),
    "flat2": (np.full((16, 16, 3), 200, np.uint8), "mountains"),
  }
  lines = []
  for name in order:
    pix, prompt = src[name]
    Image.fromarray(pix).save(imgs / f"{name.split('.')[0]}.png")
    lines.append(json.dumps({"image": f"imgs/{name.split('.')[0]}.png", "prompt": prompt}))
  (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "reg.jsonl").write_text(json.dumps({"file_name": str(inputs["reg"] / "r1.png"), "caption": "r"}) + "\n")
  out = tmp_path / "manifest.jsonl"
  rc, stdout, stderr = _label(
    capsys,
    "--scorer",
    checkpoint,
    "--images",
    tmp_path / "list.jsonl",
    "--regularization",
    tmp_path / "reg.jsonl",
    "--out",
    out,
    "--preset",
    "release",
    "--alpha",
    1,
    "--batch-size",
    5,
    "--scores",
    tmp_path / "scores.jsonl",
  )
  assert rc == 0, stderr
  assert "done: 7 images processed, 0 skipped" in stderr
  manifest = [json.loads(l) for l in out.read_text().splitlines()]
  expected, got = _check_selection(
    tmp_path / "scores.jsonl", manifest, reference, LabelConfig(alpha=1, blur_threshold=10, min_images=4), Image.open
  )
  assert [r["image"] for r in got] == [r["image"] for r in expected]  # files are referenced where they are
  assert {r["caption"].removeprefix("Weird image. ") for r in got} == {"a cat"}
  assert manifest[-1] == {"image": str(inputs["reg"] / "r1.png"), "caption": "r", "kind": "regularization"}
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert {
    k: summary[k]
    for k in (
      "images",
      "scored",
      "blurry",
      "prompts",
      "prompts_selected",
      "prompts_not_scored",
      "prompts_too_few_after_drops",
    )
  } == {
    "images": 12,
    "scored": 7,
    "blurry": 2,
    "prompts": 3,
    "prompts_selected": 1,
    "prompts_not_scored": 1,
    "prompts_too_few_after_drops": 1,
  }
  assert summary["counts"] == {"preferred": 1, "non_preferred": 1, "regularization": 1}  # n=4 at alpha 1: 1/4


@pytest.mark.parametrize(
  "case, message",
  [
    ("missing_images", "nowhere: no such file or directory"),
    ("bad_parquet", "metadata.parquet: cannot read parquet metadata"),
    ("bad_zip", "part-000003.zip: not a readable zip archive"),
    ("missing_regularization", "noreg: no such file or directory"),
    ("bad_alpha", "alpha must be > 0"),
  ],
)
def test_label_bad_files_are_one_line_errors(inputs, tmp_path, capsys, case, message):
  root = tmp_path / "db"
  write_part(root / "part-000001.zip", {"x.png": encode(pixels(0))}, {"x.png": {"p": "x"}})
  args = {"--images": root, "--regularization": inputs["reg"], "--alpha": 2}
  if case == "missing_images":
    args["--images"] = tmp_path / "nowhere"
  elif case == "bad_parquet":
    (root / "metadata.parquet").write_bytes(b"PAR1 garbage")
  elif case == "bad_zip":
    (root / "part-000003.zip").write_bytes(b"PK but not a zip")
  elif case == "missing_regularization":
    args["--regularization"] = tmp_path / "noreg"
  else:
    args["--alpha"] = -1
  rc, _, stderr = _label(
    capsys,
    "--scorer",
    tmp_path / "never_loaded",
    "--out",
    tmp_path / "m.jsonl",
    *[x for kv in args.items() for x in kv],
  )
  assert rc == 2
  assert "Traceback" not in stderr
  errors = [l for l in stderr.splitlines() if l.strip()]
  assert len(errors) == 1 and errors[0].startswith("hps-jax label: error: ") and message in errors[0], stderr
  assert not (tmp_path / "m.jsonl").exists()
