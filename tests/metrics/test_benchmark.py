"""`hps-jax benchmark` and its parts: the HPSv2 / ImageReward / mean aggregations against hand-computed numbers,
the layout readers (missing and extra images named, exit 1), one decoding pass for several scorers, and the
per-image scores equal to `Scorer.score` of the same images. Tiny random CLIP models and a random aesthetic head."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hps_jax.cli import main
from hps_jax.convert.aesthetic import save_aesthetic
from hps_jax.convert.clip import save_hf
from hps_jax.metrics import benchmark as bm
from hps_jax.metrics.multiscore import MultiScorer, ScorerSpec, build_scorers
from hps_jax.models.aesthetic import AestheticMLP
from hps_jax.models.clip import CLIP, CLIPConfig
from hps_jax.preference import scorer as scorer_mod

STYLES = ["anime", "concept-art", "paintings", "photo"]
N_PROMPTS = 20  # per style; --chunks 10 -> chunks of 2


# ------------------------------------------------------------------------------------------------ aggregations
def test_hpsv2_default_is_10_chunks_of_80():
  rng = np.random.default_rng(0)
  scores = {s: rng.normal(25, 2, 800) for s in STYLES}
  agg = bm.hpsv2_aggregate(scores)
  for s in STYLES:
    chunk_means = scores[s].reshape(10, 80).mean(axis=1)  # HPSv2: [mean(res[i:i+80]) for i in range(0, 800, 80)]
    got = agg["styles"][s]
    assert got["chunks"] == 10 and got["chunk_size"] == 80 and got["n"] == 800
    np.testing.assert_allclose(got["chunk_means"], chunk_means, rtol=1e-12)
    assert got["mean"] == pytest.approx(chunk_means.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(np.std(chunk_means, ddof=0), rel=1e-12)
  assert agg["score"] == pytest.approx(np.concatenate(list(scores.values())).mean(), rel=1e-12)
  assert agg["complete"] and agg["missing"] == 0
  # by size gives the same; a count that does not split is refused unless allowed
  assert bm.hpsv2_aggregate(scores, chunk_size=80)["styles"]["photo"] == agg["styles"]["photo"]
  with pytest.raises(ValueError, match="do not split into 10 equal chunks"):
    bm.hpsv2_aggregate({"photo": np.ones(795)})
  uneven = bm.hpsv2_aggregate({"photo": np.arange(25.0)}, chunks=2, allow_uneven=True)["styles"]["photo"]
  assert uneven["chunk_means"] == [np.arange(12.0).mean(), np.arange(12.0, 25).mean()]


def test_hpsv2_missing_image_leaves_its_chunk_mean_over_the_rest():
  v = np.array([1.0, 3.0, np.nan, 5.0, np.nan, np.nan])
  got = bm.hpsv2_aggregate({"photo": v}, chunks=3)
  st = got["styles"]["photo"]
  assert st["chunk_means"] == [2.0, 5.0, None]
  assert st["mean"] == 3.5 and st["std"] == 1.5 and st["n"] == 3 and st["missing"] == 3
  assert got["score"] == 3.0 and not got["complete"] and got["missing"] == 3


def test_imagereward_and_mean_aggregations():
  got = bm.imagereward_aggregate({"a": [1.0, 2.0, 3.0], "b": [10.0, np.nan, 20.0], "c": [np.nan] * 3})
  assert got["prompt_means"] == {"a": 2.0, "b": 15.0, "c": None}
  assert got["mean"] == 8.5 and got["std_over_prompts"] == 6.5
  assert got["n_prompts"] == 2 and got["n"] == 5 and got["missing"] == 4 and not got["complete"]

  v = np.random.default_rng(1).normal(0, 1, 200)
  m = bm.mean_aggregate(v, resamples=500, seed=3)
  assert m["mean"] == pytest.approx(v.mean()) and m["std"] == pytest.approx(v.std())
  assert m["ci_low"] < m["mean"] < m["ci_high"]
  half = 1.96 * v.std() / np.sqrt(len(v))  # the normal approximation the bootstrap should be close to
  assert m["ci_high"] - m["ci_low"] == pytest.approx(2 * half, rel=0.2)
  assert bm.mean_aggregate(v, resamples=500, seed=3) == m  # seeded
  assert bm.mean_aggregate([np.nan])["mean"] is None


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Two tiny random CLIPs (HF dirs) and a random aesthetic head on the first one's embedding."""
  d = tmp_path_factory.mktemp("models")
  hps = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), d / "hps")
  other = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(1)), d / "other")
  head = AestheticMLP((CLIPConfig.tiny().embed_dim, 16, 8, 8, 4, 1), "linear", rngs=nnx.Rngs(2))
  aes = save_aesthetic(head, d / "aes.safetensors")
  return {"hps": str(hps), "other": str(other), "aes": str(aes)}


@pytest.fixture(scope="module")
def scorers(models):
  specs = [
    ScorerSpec("hps", "clip", models["hps"]),
    ScorerSpec("clipscore", "clip", models["other"], preprocess="clip"),
    ScorerSpec("aes", "aesthetic", models["aes"], clip_checkpoint=models["hps"]),
  ]
  return build_scorers(specs, batch_size=8)


def _write_image(path: Path, rng, size=(24, 40)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path, quality=95)


@pytest.fixture(scope="module")
def hpsv2_tree(tmp_path_factory):
  """HPSv2's folders in small: prompts/<style>.json (20 prompts each), images/<gen>/<style>/{i:05d}.jpg."""
  root = tmp_path_factory.mktemp("hpsv2")
  rng = np.random.default_rng(7)
  (root / "prompts").mkdir()
  (root / "prompts" / "drawbench.json").write_text('["another prompt set in the same folder, as in HPSv2\'s"]')
  for s in STYLES:
    prompts = [f"{s} picture number {i} of a red {['cat', 'house', 'boat'][i % 3]}" for i in range(N_PROMPTS)]
    (root / "prompts" / f"{s}.json").write_text(json.dumps(prompts))
    for gen in ("sd14", "sd21"):
      for i in range(N_PROMPTS):
        _write_image(root / "images" / gen / s / f"{i:05d}.jpg", rng)
  return root


def _run(argv, capsys):
  rc = main(argv)
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


# ------------------------------------------------------------------------------------------------ multiscore
def test_one_decode_per_image_for_three_scorers(scorers, hpsv2_tree, tmp_path, monkeypatch):
  images = sorted(str(p) for p in (hpsv2_tree / "images" / "sd14" / "photo").glob("*.jpg"))[:10]
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
  calls = []
  real = scorer_mod.load_image
  monkeypatch.setattr(scorer_mod, "load_image", lambda src: (calls.append(src), real(src))[1])
  items = [(p, f"prompt {i}", i) for i, p in enumerate(images)] + [(str(corrupt), "x", "bad")]
  multi = MultiScorer(scorers, batch_size=4)
  out = list(multi.iter_scores(items))
  assert multi.decodes == len(items) == len(calls)  # 11 decodes for 3 scorers, not 33
  assert sorted(map(str, calls)) == sorted(p for p, _, _ in items)
  assert [o[2] for o in out] == [i for _, _, i in items]  # in order, extras passed through
  assert out[-1][3] is None and "corrupt.jpg" in str(out[-1][4])  # an error, not a crash
  ok = out[:-1]
  assert all(o[4] is None and set(o[3]) == {"hps", "clipscore", "aes"} for o in ok)
  prompts = [p for _, p, _ in items[:-1]]
  for name in ("hps", "clipscore"):
    want = scorers[name].score(images, prompts)
    np.testing.assert_allclose([o[3][name] for o in ok], want, atol=1e-4)
  np.testing.assert_allclose([o[3]["aes"] for o in ok], scorers["aes"].score(images), atol=1e-5)


# ------------------------------------------------------------------------------------------------ the command
def _hpsv2_argv(models, tree, out, *extra):
  return [
    "benchmark", "--protocol", "hpsv2", "--prompts", str(tree / "prompts"), "--images", str(tree / "images"),
    "--checkpoint", f"hps={models['hps']}", "--out", str(out), "--chunks", "10", "--batch-size", "16", *extra,
  ]  # fmt: skip


def test_hpsv2_leaderboard_matches_hand_computed(models, scorers, hpsv2_tree, tmp_path, capsys):
  out = tmp_path / "out"
  rc, stdout, err = _run(_hpsv2_argv(models, hpsv2_tree, out), capsys)
  assert rc == 0, err
  board = json.loads((out / "leaderboard.json").read_text())
  assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (out / "leaderboard.md").read_text().strip() == stdout.strip()
  rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
  assert len(rows) == 2 * len(STYLES) * N_PROMPTS
  # per-image scores are Scorer.score of the same images and prompts
  want = scorers["hps"].score([r["image"] for r in rows], [r["prompt"] for r in rows])
  np.testing.assert_allclose([r["hps"] for r in rows], want, atol=1e-4)
  # the aggregates, by hand: per style 10 chunks of 2 consecutive prompts, mean and std (ddof=0) of chunk means
  assert board["protocol"] == "hpsv2" and board["groups"] == STYLES
  assert board["settings"]["chunks"] == 10 and board["settings"]["decodes"] == len(rows)
  assert "pad 32px" in board["scorers"]["hps"]["preprocess"] and "100 * cosine" in board["scorers"]["hps"]["scale"]
  for g in board["generators"]:
    assert g["complete"] and g["images"] == {"expected": 80, "scored": 80, "missing": 0, "failed": 0}
    agg = g["scores"]["hps"]
    mine = [r for r in rows if r["generator"] == g["name"]]
    for s in STYLES:
      v = np.array([r["hps"] for r in sorted(mine, key=lambda r: r["index"]) if r["group"] == s])
      chunk_means = v.reshape(10, 2).mean(axis=1)
      assert agg["styles"][s]["mean"] == pytest.approx(chunk_means.mean(), abs=1e-9)
      assert agg["styles"][s]["std"] == pytest.approx(np.std(chunk_means), abs=1e-9)
      assert f"{agg['styles'][s]['mean']:.2f} ± {agg['styles'][s]['std']:.4f}" in stdout
    assert agg["average"]["mean"] == pytest.approx(np.mean([r["hps"] for r in mine]), abs=1e-9)
  avgs = [g["scores"]["hps"]["score"] for g in board["generators"]]
  assert avgs == sorted(avgs, reverse=True) and [g["rank"] for g in board["generators"]] == [1, 2]
  assert "Protocol: HPSv2 benchmark" in stdout and "| Rank | Generator | anime |" in stdout


def test_hpsv2_missing_and_extra_images_are_named_exit_1(models, hpsv2_tree, tmp_path, capsys):
  tree = tmp_path / "tree"
  import shutil

  shutil.copytree(hpsv2_tree, tree)
  (tree / "images" / "sd21" / "anime" / "00003.jpg").unlink()
  shutil.rmtree(tree / "images" / "sd21" / "photo")
  (tree / "images" / "sd14" / "anime" / "notes.txt").write_text("x")
  (tree / "images" / "sd14" / "anime" / "00003.jpg").write_bytes(b"broken")  # unreadable: counted too
  out = tmp_path / "out"
  rc, stdout, err = _run(_hpsv2_argv(models, tree, out, "--no-plot"), capsys)
  assert rc == 1, err
  assert "done: 138 images scored, 21 missing, 1 failed (incomplete: sd14, sd21)" in err
  assert f"missing {tree / 'images' / 'sd21' / 'anime' / '00003.jpg'}" in err
  assert f"missing folder {tree / 'images' / 'sd21' / 'photo'} (20 images)" in err
  assert f"extra {tree / 'images' / 'sd14' / 'anime' / 'notes.txt'}" in err
  assert f"failed {tree / 'images' / 'sd14' / 'anime' / '00003.jpg'}: " in err
  board = json.loads((out / "leaderboard.json").read_text())
  gens = {g["name"]: g for g in board["generators"]}
  assert gens["sd21"]["images"] == {"expected": 80, "scored": 59, "missing": 21, "failed": 0}
  assert gens["sd14"]["images"] == {"expected": 80, "scored": 79, "missing": 0, "failed": 1}
  assert not gens["sd21"]["complete"] and gens["sd21"]["scores"]["hps"]["styles"]["photo"]["mean"] is None
  assert board["extra_files"] == [str(tree / "images" / "sd14" / "anime" / "notes.txt")]
  assert "sd21 (incomplete: 21 missing, 0 failed)" in stdout and "n/a" in stdout
  assert not (out / "leaderboard.png").exists()


def test_imagereward_layout_and_numbers(models, tmp_path, capsys):
  rng = np.random.default_rng(3)
  prompts = [{"id": f"00{i}-0001", "prompt": f"a photo of thing {i}"} for i in range(4)]
  (tmp_path / "bench").mkdir()
  (tmp_path / "bench" / "benchmark-prompts.json").write_text(json.dumps(prompts))
  for gen in ("a", "b"):
    for p in prompts:
      for k in range(3):
        _write_image(tmp_path / "gen" / gen / f"{p['id']}_{k}.png", rng)
  out = tmp_path / "out"
  argv = [
    "benchmark", "--protocol", "imagereward", "--prompts", str(tmp_path / "bench"), "--images",
    str(tmp_path / "gen"), "--checkpoint", f"hps={models['hps']}", "--aesthetic", f"aes={models['aes']}",
    "--clip-checkpoint", models["hps"], "--images-per-prompt", "3", "--out", str(out),
  ]  # fmt: skip
  rc, stdout, err = _run(argv, capsys)
  assert rc == 0, err
  board = json.loads((out / "leaderboard.json").read_text())
  rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
  assert len(rows) == 24 and board["settings"]["decodes"] == 24  # one decode per image for both scorers
  for g in board["generators"]:
    for name in ("hps", "aes"):
      per_prompt = [np.mean([r[name] for r in rows if r["generator"] == g["name"] and r["group"] == p["id"]])
                    for p in prompts]  # fmt: skip
      assert g["scores"][name]["mean"] == pytest.approx(np.mean(per_prompt), abs=1e-9)
  assert "clip 32px" in board["scorers"]["aes"]["preprocess"]  # the aesthetic head's own default
  assert "| Rank | Generator | hps | aes | Images |" in stdout
  assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_mean_protocol_jsonl(models, hpsv2_tree, tmp_path, capsys):
  imgs = sorted((hpsv2_tree / "images" / "sd14" / "photo").glob("*.jpg"))[:6]
  rows = [{"image": str(p), "prompt": f"p{i}", "generator": "g1" if i < 3 else "g2"} for i, p in enumerate(imgs)]
  rows.append({"image": "nope.jpg", "prompt": "p", "generator": "g2"})
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "out"
  argv = ["benchmark", "--protocol", "mean", "--prompts", str(tmp_path / "rows.jsonl"), "--checkpoint",
          f"hps={models['hps']}", "--out", str(out), "--bootstrap", "200"]  # fmt: skip
  rc, stdout, err = _run(argv, capsys)
  assert rc == 1 and f"missing {tmp_path / 'nope.jpg'}" in err
  board = json.loads((out / "leaderboard.json").read_text())
  scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
  for g in board["generators"]:
    v = np.array([r["hps"] for r in scores if r["generator"] == g["name"]])
    a = g["scores"]["hps"]
    assert a["mean"] == pytest.approx(v.mean(), abs=1e-9) and a["n"] == 3
    assert a["ci_low"] <= a["mean"] <= a["ci_high"]
  assert {g["name"]: g["complete"] for g in board["generators"]} == {"g1": True, "g2": False}
  assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
  "case, message",
  [
    ("not_a_list", "anime.json: expected a non-empty JSON list of prompt strings"),
    ("bad_json", "anime.json: not valid JSON"),
    ("uneven", "style anime (15 prompts): 15 items do not split into 10 equal chunks"),
    ("aesthetic_without_clip", "--aesthetic needs --clip-checkpoint"),
    ("bad_preprocess", "--preprocess hps=square: expected pad or clip"),
    ("out_in_images", "is inside --images"),
  ],
)
def test_bad_input_is_one_line_exit_2(case, message, models, tmp_path, capsys):
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  (tmp_path / "images" / "g" / "anime").mkdir(parents=True)
  text = {"not_a_list": '{"a": 1}', "bad_json": "[1,", "uneven": json.dumps(["p"] * 15)}.get(case, '["p"]')
  (prompts / "anime.json").write_text(text)
  argv = ["benchmark", "--protocol", "hpsv2", "--prompts", str(prompts), "--images", str(tmp_path / "images"),
          "--checkpoint", f"hps={models['hps']}", "--out", str(tmp_path / "out"), "--no-plot"]  # fmt: skip
  if case == "aesthetic_without_clip":
    argv += ["--aesthetic", f"aes={models['aes']}"]
  if case == "bad_preprocess":
    argv += ["--preprocess", "hps=square"]
  if case == "out_in_images":
    argv[argv.index("--out") + 1] = str(tmp_path / "images" / "results")
  rc, _, err = _run(argv, capsys)
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2 and len(lines) == 1 and lines[0].startswith("hps-jax benchmark: error: "), err
  assert message in lines[0]
  assert not (tmp_path / "out").exists() and not (tmp_path / "images" / "results").exists()  # nothing written


def test_hpsv2_style_selection(hpsv2_tree, tmp_path):
  prompts = hpsv2_tree / "prompts"
  assert list(bm.hpsv2_styles(prompts)) == STYLES  # HPSv2's four, drawbench.json beside them is not a style
  assert list(bm.hpsv2_styles(prompts, ["photo", "drawbench"])) == ["photo", "drawbench"]
  assert list(bm.hpsv2_styles(prompts / "anime.json")) == ["anime"]
  (tmp_path / "x.json").write_text('["p"]')
  (tmp_path / "y.json").write_text('["q"]')
  assert list(bm.hpsv2_styles(tmp_path)) == ["x", "y"]  # not HPSv2's: every .json
  with pytest.raises(bm.InputError, match="no photo.json"):
    bm.hpsv2_styles(tmp_path, ["photo"])


def test_imagereward_prompt_id_cannot_leave_the_generator_folder(tmp_path):
  (tmp_path / "g").mkdir()
  (tmp_path / "p.json").write_text(json.dumps([{"id": "../../etc/x", "prompt": "p"}]))
  with pytest.raises(bm.InputError, match="cannot name an image file"):
    bm.imagereward_layout(tmp_path / "p.json", {"g": str(tmp_path / "g")})
