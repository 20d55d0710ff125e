"""`hps_jax.metrics.correlation` and `hps-jax correlate`: the coefficients equal scipy.stats (global and within
prompts, with ties), the bootstrap is seeded, undefined values are named (never NaN), score files are joined on
(image, prompt) with every left-out image named, and scores computed from --input equal `Scorer.score`."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from hps_jax.cli import main
from hps_jax.errors import InputError
from hps_jax.metrics.correlation import correlate

METHODS = ("pearson", "spearman", "kendall")
SCIPY = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}


def _fixture(seed=0):
  """Three scores with many ties (rounded to 0.5) over prompts of 1 to 6 images; prompt p3 has a constant 'b'."""
  rng = np.random.default_rng(seed)
  sizes = [4, 6, 1, 5, 3, 2, 6, 4, 5, 3]
  prompts = [f"p{i}" for i, k in enumerate(sizes) for _ in range(k)]
  n = len(prompts)
  a = np.round(2 * rng.normal(size=n)) / 2
  b = np.round(2 * (a + rng.normal(size=n))) / 2
  c = np.round(rng.normal(size=n))
  b[[i for i, p in enumerate(prompts) if p == "p3"]] = 1.5
  return {"a": a, "b": b, "c": c}, prompts


def _groups(prompts, m=3):
  by = {}
  for i, p in enumerate(prompts):
    by.setdefault(p, []).append(i)
  return [np.array(ix) for ix in by.values() if len(ix) >= m]


def _pair(report, x, y):
  return next(e for e in report["pairs"] if (e["x"], e["y"]) == (x, y))


def test_global_coefficients_and_p_values_equal_scipy():
  cols, prompts = _fixture()
  report = correlate(cols, prompts, n_boot=50, seed=0)
  assert [(e["x"], e["y"]) for e in report["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
  for e in report["pairs"]:
    x, y = cols[e["x"]], cols[e["y"]]
    for m in METHODS:
      ref = SCIPY[m](x, y)
      got = e["global"][m]
      assert got["value"] == pytest.approx(ref.statistic, abs=1e-12)
      assert got["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)
      assert got["n"] == len(x)


def test_within_prompt_coefficients_equal_scipy_definitions():
  cols, prompts = _fixture()
  groups = _groups(prompts)
  report = correlate(cols, prompts, n_boot=50, seed=0)
  assert report["n_prompts"] == 10 and report["n_prompts_eligible"] == len(groups) == 8
  assert report["n_images_eligible"] == sum(g.size for g in groups)
  for e in report["pairs"]:
    x, y = cols[e["x"]], cols[e["y"]]
    pooled, mean = e["within_prompt"]["pooled"], e["within_prompt"]["mean"]

    # pooled Pearson: Pearson of the values centered on their prompt's mean
    cx = np.concatenate([x[g] - x[g].mean() for g in groups])
    cy = np.concatenate([y[g] - y[g].mean() for g in groups])
    assert pooled["pearson"]["value"] == pytest.approx(stats.pearsonr(cx, cy).statistic, abs=1e-12)
    # pooled Spearman: the same on within-prompt average ranks
    rx = np.concatenate([stats.rankdata(x[g]) - stats.rankdata(x[g]).mean() for g in groups])
    ry = np.concatenate([stats.rankdata(y[g]) - stats.rankdata(y[g]).mean() for g in groups])
    assert pooled["spearman"]["value"] == pytest.approx(stats.pearsonr(rx, ry).statistic, abs=1e-12)
    # t-tests with N - P - 1 degrees of freedom
    df = cx.size - len(groups) - 1
    for m, r in (("pearson", pooled["pearson"]["value"]), ("spearman", pooled["spearman"]["value"])):
      t = r * math.sqrt(df / (1 - r * r))
      assert pooled[m]["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    # pooled Kendall: tau-b over the pairs of images of the same prompt (brute force)
    s = na = nb = 0
    for g in groups:
      for i in range(g.size):
        for j in range(i + 1, g.size):
          dx, dy = np.sign(x[g[i]] - x[g[j]]), np.sign(y[g[i]] - y[g[j]])
          s, na, nb = s + dx * dy, na + (dx != 0), nb + (dy != 0)
    assert pooled["kendall"]["value"] == pytest.approx(s / math.sqrt(na * nb), abs=1e-12)

    # mean over prompts of scipy's own coefficient (prompts with a constant score left out)
    for m in METHODS:
      per = [SCIPY[m](x[g], y[g]).statistic for g in groups if np.ptp(x[g]) > 0 and np.ptp(y[g]) > 0]
      assert mean[m]["value"] == pytest.approx(np.mean(per), abs=1e-12)
      assert mean[m]["n"] == len(per)
      assert mean[m]["p_value"] == pytest.approx(stats.ttest_1samp(per, 0.0).pvalue, abs=1e-12)
      if "b" in (e["x"], e["y"]):
        assert mean[m]["n_prompts_left_out"] == 1 and "constant" in mean[m]["notes"][0]


def test_one_prompt_pooled_p_values_equal_scipy():
  rng = np.random.default_rng(4)
  x = np.round(rng.normal(size=40), 1)
  y = np.round(x + rng.normal(size=40), 1)
  report = correlate({"x": x, "y": y}, ["only"] * 40, n_boot=20)
  pooled = report["pairs"][0]["within_prompt"]["pooled"]
  refs = {"pearson": stats.pearsonr(x, y), "spearman": stats.spearmanr(x, y)}
  refs["kendall"] = stats.kendalltau(x, y, method="asymptotic")
  for m, ref in refs.items():
    assert pooled[m]["value"] == pytest.approx(ref.statistic, abs=1e-12)
    assert pooled[m]["p_value"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    assert pooled[m]["ci"] is None and "one eligible prompt" in pooled[m]["notes"][0]


def test_bootstrap_is_seeded_and_contains_the_estimate():
  rng = np.random.default_rng(1)
  x = rng.normal(size=90)
  cols = {"x": x, "y": x + 0.5 * rng.normal(size=90)}
  prompts = [f"p{i // 3}" for i in range(90)]
  one = correlate(cols, prompts, n_boot=300, seed=7)
  assert one == correlate(cols, prompts, n_boot=300, seed=7)
  other = correlate(cols, prompts, n_boot=300, seed=8)
  assert other["pairs"][0]["global"]["pearson"]["ci"] != one["pairs"][0]["global"]["pearson"]["ci"]
  e = one["pairs"][0]
  stats_ = [e["global"][m] for m in METHODS] + [e["within_prompt"][k][m] for k in ("pooled", "mean") for m in METHODS]
  for s in stats_:
    lo, hi = s["ci"]
    assert 0 < lo <= s["value"] <= hi < 1
    assert "notes" not in s


def test_constant_score_is_undefined_never_nan():
  cols, prompts = _fixture()
  cols["k"] = np.full(len(prompts), 3.0)
  report = correlate(cols, prompts, n_boot=30)
  text = json.dumps(report, allow_nan=False)  # raises on NaN / inf
  assert "NaN" not in text
  e = _pair(report, "a", "k")
  for m in METHODS:
    assert e["global"][m]["value"] is None
    assert e["global"][m]["undefined"] == "k is constant (every image scores 3)"
    assert e["within_prompt"]["pooled"][m]["undefined"] == "k is constant within every eligible prompt"
  want = stats.pearsonr(cols["a"], cols["b"]).statistic  # the other pair is still computed, and equals scipy
  assert _pair(report, "a", "b")["global"]["pearson"]["value"] == pytest.approx(want, abs=1e-12)
  with pytest.raises(InputError, match="non-finite"):
    correlate({"a": [1.0, 2.0, float("nan")], "b": [1.0, 2.0, 3.0]})


# ------------------------------------------------------------------------------------------------------- CLI
def _write(path: Path, rows) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def _score_rows(n_prompts=8, per=4, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for p in range(n_prompts):
    for k in range(per):
      cos = float(rng.normal(0.25, 0.03))
      rows.append({"image": f"img/{p}_{k}.png", "prompt": f"prompt {p}", "hps": 100 * cos + float(rng.normal())})
      rows[-1]["cosine"] = cos
  return rows


def test_cli_scores_two_fields_of_one_file(tmp_path, capsys):
  rows = _score_rows()
  f = _write(tmp_path / "s.jsonl", rows)
  out = tmp_path / "out"
  rc = main(
    ["correlate", "--scores", f"clip={f}:cosine", "--scores", f"hps={f}", "--bootstrap", "200", "--out", str(out)]
  )
  cap = capsys.readouterr()
  assert rc == 0, cap.err
  report = json.loads((out / "correlation.json").read_text())
  x, y = np.array([r["cosine"] for r in rows]), np.array([r["hps"] for r in rows])
  e = _pair(report, "clip", "hps")
  assert e["global"]["pearson"]["value"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
  assert report["inputs"] == {"clip": {"file": str(f), "field": "cosine"}, "hps": {"file": str(f), "field": "hps"}}
  assert report["n_images"] == 32 and report["n_prompts"] == 8 and report["settings"]["bootstrap"] == 200
  md = (out / "correlation.md").read_text()
  assert md in cap.out and "| clip | hps | Pearson r |" in md
  png = (out / "scatter.png").read_bytes()
  assert len(png) > 10_000
  with Image.open(io.BytesIO(png)) as im:
    assert im.format == "PNG" and im.size[0] > 300


def test_cli_joins_files_and_names_the_images_left_out(tmp_path, capsys):
  rows = _score_rows()
  hps = _write(tmp_path / "hps.jsonl", rows)
  clip_rows = [{"image": r["image"], "prompt": r["prompt"], "hps": r["cosine"]} for r in rows]
  clip_rows[3] = {"image": rows[3]["image"], "prompt": rows[3]["prompt"], "error": "cannot identify image file"}
  del clip_rows[5]
  clip = _write(tmp_path / "clip.jsonl", clip_rows)
  aes = _write(tmp_path / "aes.jsonl", [{"image": r["image"], "aesthetic": i % 7 + 0.5} for i, r in enumerate(rows)])
  out = tmp_path / "out"
  argv = ["correlate", "--scores", f"hps={hps}", "--scores", f"clip={clip}", "--scores", f"aes={aes}"]
  rc = main([*argv, "--bootstrap", "50", "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 1
  assert "done: 30 images processed, 2 skipped" in err
  assert f"skipped {rows[3]['image']} (prompt 'prompt 0'): {clip}:4: cannot identify image file" in err
  assert f"skipped {rows[5]['image']} (prompt 'prompt 1'): not in {clip}" in err
  report = json.loads((out / "correlation.json").read_text())
  assert report["n_images"] == 30 and len(report["skipped"]) == 2
  assert report["inputs"]["aes"] == {"file": str(aes), "field": "aesthetic"}
  keep = [r for i, r in enumerate(rows) if i not in (3, 5)]
  a = np.array([i % 7 + 0.5 for i, r in enumerate(rows) if i not in (3, 5)])
  ref = stats.kendalltau([r["hps"] for r in keep], a)
  assert _pair(report, "hps", "aes")["global"]["kendall"]["value"] == pytest.approx(ref.statistic, abs=1e-12)
  assert (out / "scatter.png").stat().st_size > 10_000  # the scatter matrix of three scores


def test_cli_refuses_duplicates_and_non_finite_values_naming_the_line(tmp_path, capsys):
  rows = _score_rows(n_prompts=2)
  good = _write(tmp_path / "good.jsonl", rows)
  dup = _write(tmp_path / "dup.jsonl", [*rows[:3], rows[1], *rows[3:]])
  rc = main(["correlate", "--scores", f"a={good}", "--scores", f"b={dup}:cosine"])
  err = capsys.readouterr().err
  assert rc == 2 and f"{dup}:4: duplicate row for image img/0_1.png with prompt 'prompt 0' (first at line 2)" in err
  bad = [dict(r) for r in rows]
  lines = [json.dumps(r) for r in bad]
  lines[2] = lines[2].replace(json.dumps(bad[2]["hps"]), "NaN")
  nan = _write(tmp_path / "nan.jsonl", lines)
  rc = main(["correlate", "--scores", f"a={good}:cosine", "--scores", f"b={nan}"])
  err = capsys.readouterr().err
  assert rc == 2 and f"{nan}:3: hps is nan (non-finite): refused" in err
  rc = main(["correlate", "--scores", f"a={good}:cosine", "--scores", f"b={good}:nope"])
  assert rc == 2 and f"{good}:1: no field 'nope'" in capsys.readouterr().err
  rc = main(["correlate", "--scores", f"a={good}"])
  assert rc == 2 and "at least two scores" in capsys.readouterr().err


def test_cli_constant_score(tmp_path, capsys):
  rows = _score_rows()
  for r in rows:
    r["flat"] = 5.0
  f = _write(tmp_path / "s.jsonl", rows)
  out = tmp_path / "out"
  rc = main(["correlate", "--scores", f"hps={f}", "--scores", f"flat={f}:flat", "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2
  assert f"score flat ({f}:flat) is constant over all 32 images (every image scores 5): no correlation" in err
  assert not (out / "correlation.json").exists()
  rc = main(
    ["correlate", "--scores", f"hps={f}", "--scores", f"clip={f}:cosine", "--scores", f"flat={f}:flat"]
    + ["--bootstrap", "30", "--out", str(out)]
  )
  cap = capsys.readouterr()
  assert rc == 1
  assert f"skipped score flat ({f}:flat): constant over all 32 images" in cap.err
  text = (out / "correlation.json").read_text()
  report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
  assert _pair(report, "hps", "flat")["global"]["spearman"]["undefined"] == "flat is constant (every image scores 5)"
  assert _pair(report, "hps", "clip")["global"]["spearman"]["value"] > 0.5
  assert "flat is constant (every image scores 5)" in cap.out  # the table names why a cell is n/a


# --------------------------------------------------------------------------------------------- --input mode
@pytest.fixture(scope="module")
def clip_checkpoints(tmp_path_factory):
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.models.clip import CLIP, CLIPConfig

  d = tmp_path_factory.mktemp("correlate_ckpt")
  return [save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(seed)), d / f"clip{seed}") for seed in (0, 1)]


def test_cli_input_scores_equal_scorer_score(tmp_path, capsys, clip_checkpoints):
  from hps_jax.preference.scorer import Scorer

  rng = np.random.default_rng(0)
  rows = []
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows.append({"image": f"{i}.png", "prompt": f"a photo of thing {i // 3}"})
  (tmp_path / "broken.png").write_bytes(b"not a png")
  rows.append({"image": "broken.png", "prompt": "a photo of thing 0"})
  pairs = _write(tmp_path / "pairs.jsonl", rows)
  ck0, ck1 = clip_checkpoints
  out = tmp_path / "out"
  rc = main(
    ["correlate", "--input", str(pairs), "--checkpoint", f"hps={ck0}", "--checkpoint", f"clip={ck1}"]
    + ["--batch-size", "4", "--bootstrap", "50", "--out", str(out)]
  )
  err = capsys.readouterr().err
  assert rc == 1 and "done: 12 images processed, 1 skipped" in err and "broken.png" in err
  got = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
  images = [str(tmp_path / r["image"]) for r in rows[:12]]
  prompts = [r["prompt"] for r in rows[:12]]
  assert [g["image"] for g in got] == images and [g["prompt"] for g in got] == prompts
  for name, ck in (("hps", ck0), ("clip", ck1)):
    ref = Scorer.from_checkpoint(str(ck), batch_size=4).score(images, prompts)
    np.testing.assert_allclose([g[name] for g in got], ref, rtol=1e-6, atol=1e-5)
  report = json.loads((out / "correlation.json").read_text())
  ref = stats.pearsonr([g["hps"] for g in got], [g["clip"] for g in got]).statistic
  assert _pair(report, "hps", "clip")["global"]["pearson"]["value"] == pytest.approx(ref, abs=1e-12)
  # the written scores feed --scores mode back, to the same numbers
  again = tmp_path / "again"
  s = out / "scores.jsonl"
  rc = main(
    ["correlate", "--scores", f"hps={s}:hps", "--scores", f"clip={s}:clip", "--bootstrap", "50"] + ["--out", str(again)]
  )
  assert rc == 0
  back = json.loads((again / "correlation.json").read_text())
  assert back["pairs"] == report["pairs"]
