"""`hps-jax study report`: the report's numbers are analysis.py's on the same votes (win rates, agreement, kappa,
Bradley-Terry), a simulated preference of 0.7 lies in its interval, the HTML is self-contained with its plots
embedded, the definitions are written in it, --exclude-failed-checks leaves out the careless participants, a
--scorer's model agreement is analysis.model_agreement on its saved scores, bad vote lines are named skips (exit 1),
degenerate studies say why instead of NaN, and bad inputs are one line (exit 2)."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main
from hps_jax.study import analysis as sa
from hps_jax.study.create import image_path, load_study

N_BOOT = 200


def _make_study(root: Path, systems, n: int, checks: int = 0):
  """A study of `systems`, each with images SYSTEM/k.png of prompt k (k < n), made by `study create` from JSONL
  manifests: image ids are then exactly simulate()'s ("{system}/{k}.png")."""
  args = ["study", "create"]
  for i, s in enumerate(systems):
    folder = root / s
    folder.mkdir(parents=True)
    rows = []
    for k in range(n):
      pixels = np.random.default_rng(100 * i + k).integers(0, 256, (12, 16, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f"{k}.png")
      rows.append({"image": f"{k}.png", "prompt": f"a photo of thing {k}"})
    (folder / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args += ["--system", f"{s}={folder / 'images.jsonl'}"]
  out = root / "study.json"
  args += ["--out", str(out)] + (["--checks", str(checks), "--allow-tie"] if checks else [])
  assert main(args) == 0
  return out, load_study(out)


def _on_study(votes, study):
  """simulate()'s votes with the study's pair ids (and its check pairs' images)."""
  by_images = {frozenset(p["images"]): p["id"] for p in study.test_pairs}
  checks = study.check_pairs
  out = []
  for v in votes:
    if v.is_check:
      pair = checks[int(v.pair_id.split("-")[1])]
      image = pair["images"][0]
      system = study.images[image]["system"]
      out.append(
        dataclasses.replace(
          v, pair_id=pair["id"], system_left=system, system_right=system, image_left=image, image_right=image
        )
      )
    else:
      out.append(dataclasses.replace(v, pair_id=by_images[frozenset((v.image_left, v.image_right))]))
  return out


def _write_votes(path: Path, votes, extra_lines=()):
  lines = [
    json.dumps({**dataclasses.asdict(v), "response_ms": 1234, "created": "2024-05-01T12:00:00+00:00"}) for v in votes
  ]
  path.write_text("\n".join([*lines, *extra_lines]) + "\n")
  return path


def _report(tmp_path, votes_file, study_file, *extra):
  out = tmp_path / "report"
  argv = ["study", "report", str(votes_file), "--study", str(study_file), "--out", str(out)]
  rc = main(argv + ["--bootstrap", str(N_BOOT), "--seed", "3", *extra])
  data = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
  return rc, out, data


def _no_nan(text: str):
  def refuse(constant):
    raise AssertionError(f"report.json holds {constant}")

  json.loads(text, parse_constant=refuse)


THREE = {("adapted", "base"): 0.7, ("adapted", "other"): 0.6, ("base", "other"): 0.5}


def test_report_matches_analysis_and_is_self_contained(tmp_path, capsys):
  study_file, study = _make_study(tmp_path / "s", ["adapted", "base", "other"], 40, checks=2)
  votes = _on_study(sa.simulate(THREE, 40, 16, seed=1, raters_per_pair=6, n_checks=2), study)
  rc, out, rep = _report(tmp_path, _write_votes(tmp_path / "votes.jsonl", votes), study_file)
  captured = capsys.readouterr()
  assert rc == 0, captured.err

  # win rates: exactly analysis.win_rates on the same votes, bootstrap included; the truth lies in the interval
  expected = sa.win_rates(votes, n_boot=N_BOOT, seed=3)
  assert rep["win_rates"]["available"]
  got = {(w["system_a"], w["system_b"]): w for w in rep["win_rates"]["pairs"]}
  assert set(got) == set(expected)
  for key, w in expected.items():
    assert got[key] == dataclasses.asdict(w)
  ab = got[("adapted", "base")]
  assert ab["ci_low"] <= 0.7 <= ab["ci_high"]
  assert 0 <= ab["p_value"] <= 1 and 0 <= ab["p_value_pairs"] <= 1

  # Fig. 8, Bradley-Terry and agreement: analysis.py's numbers
  fig8 = rep["votes_per_pair"]
  pv = sa.votes_per_pair(votes, fig8["system"], against=fig8["against"])
  assert fig8["histogram"] == pv.histogram.tolist() and fig8["share_majority"] == pv.share_majority
  assert fig8["share_other_majority"] == pv.share_other_majority
  bt = sa.bradley_terry(votes, n_boot=N_BOOT, seed=3)
  assert rep["bradley_terry"]["systems"] == list(bt.systems)
  np.testing.assert_array_equal(rep["bradley_terry"]["strength"], bt.strength)
  np.testing.assert_array_equal(rep["bradley_terry"]["ci_low"], bt.ci_low)
  human = sa.human_agreement(votes)
  assert rep["agreement"]["human"]["mean"] == human.mean and rep["agreement"]["human"]["std"] == human.std
  assert rep["agreement"]["fleiss_kappa"]["kappa"] == sa.fleiss_kappa(votes).kappa
  assert rep["agreement"]["krippendorff_alpha"]["alpha"] == sa.krippendorff_alpha(votes).alpha
  assert rep["attention_checks"]["participants"]["p000"] == {"seen": 2, "failed": 0}
  assert rep["attention_checks"]["excluded"] == []

  # the outputs: plots that open, a self-contained HTML with them embedded, the definitions in the report
  for name in ("fig8_votes_per_pair.png", "win_matrix.png", "bradley_terry.png"):
    with Image.open(out / name) as im:
      assert im.width > 0 and im.height > 0
  page = (out / "report.html").read_text()
  assert page.count("data:image/png;base64,") == 3
  assert "http://" not in page and "https://" not in page
  assert "<link" not in page and "<script" not in page
  for text in (page, (out / "report.md").read_text()):
    assert "cluster bootstrap" in text  # the bootstrap unit
    assert "half a win" in text  # how ties count
    assert "mean zero" in text and "virtual ties" in text  # BT normalization and prior
    assert "tie against a side 0.5" in text  # what agreement means
  assert set(rep["definitions"]) >= {"ties", "bootstrap", "bradley_terry", "human_agreement", "model_agreement"}
  _no_nan((out / "report.json").read_text())

  # the headline on stdout, the written report on stderr
  assert re.match(
    r"adapted vs base: adapted preferred in \d+\.\d% of \d+ votes \(95% CI .*p = .*Fleiss' kappa", captured.out
  )
  assert f"to {out / 'report.html'}" in captured.err


def test_exclude_failed_checks_removes_careless_participants(tmp_path, capsys):
  study_file, study = _make_study(tmp_path / "s", ["adapted", "base"], 30, checks=3)
  votes = _on_study(
    sa.simulate({("adapted", "base"): 0.7}, 30, 20, seed=2, raters_per_pair=8, n_checks=3, careless=0.3), study
  )
  careless = sorted(p for p, r in sa.check_failures(votes).items() if r.failed)
  assert careless  # the simulation has some
  votes_file = _write_votes(tmp_path / "votes.jsonl", votes)
  rc, _, rep = _report(tmp_path, votes_file, study_file, "--exclude-failed-checks")
  assert rc == 0
  assert rep["attention_checks"]["excluded"] == careless
  kept = sa.exclude_failed(votes)
  assert rep["counts"]["votes"] == len(kept)
  assert rep["counts"]["participants"] == 20 - len(careless)
  expected = sa.win_rates(kept, n_boot=N_BOOT, seed=3)[("adapted", "base")]
  assert rep["win_rates"]["pairs"][0] == dataclasses.asdict(expected)
  assert not set(careless) & set(rep["agreement"]["human"]["per_participant"])
  assert rep["attention_checks"]["participants"][careless[0]]["failed"] > 0  # still listed with their record

  rc, _, rep = _report(tmp_path, votes_file, study_file)  # without the flag: everybody counts
  assert rc == 0 and rep["attention_checks"]["excluded"] == [] and rep["counts"]["participants"] == 20
  capsys.readouterr()


def test_scorer_model_agreement(tmp_path, capsys):
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.preference.scorer import Scorer

  ckpt = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / "ckpt")
  study_file, study = _make_study(tmp_path / "s", ["adapted", "base"], 6)
  votes = _on_study(sa.simulate({("adapted", "base"): 0.7}, 6, 5, seed=4), study)
  rc, _, rep = _report(tmp_path, _write_votes(tmp_path / "votes.jsonl", votes), study_file, "--scorer", f"tiny={ckpt}")
  assert rc == 0, capsys.readouterr().err
  scores = rep["model_scores"]["tiny"]["scores"]
  images = sorted({v.image_left for v in votes} | {v.image_right for v in votes})
  assert sorted(scores) == images
  direct = Scorer.from_checkpoint(ckpt).score(
    [str(image_path(study, i)) for i in images], [study.images[i]["prompt"] for i in images]
  )
  np.testing.assert_allclose([scores[i] for i in images], direct, rtol=1e-5, atol=1e-5)
  model = rep["agreement"]["models"]["tiny"]
  expected = sa.model_agreement(votes, scores)
  assert model["available"] and model["mean"] == expected.mean and model["std"] == expected.std
  assert model["per_participant"] == expected.per_participant
  assert "tiny vs human" in (tmp_path / "report" / "report.md").read_text()


def test_bad_vote_lines_are_named_skips(tmp_path, capsys):
  study_file, study = _make_study(tmp_path / "s", ["adapted", "base"], 8)
  votes = _on_study(sa.simulate({("adapted", "base"): 0.7}, 8, 4, seed=5), study)
  dup = json.dumps(dataclasses.asdict(votes[0]))
  unknown = json.dumps({**dataclasses.asdict(votes[1]), "pair_id": "t9999"})
  bad_choice = json.dumps({**dataclasses.asdict(votes[2]), "participant": "zz", "choice": "both"})
  votes_file = _write_votes(
    tmp_path / "votes.jsonl", votes, ["{not json", '{"participant": "x"}', dup, unknown, bad_choice, "[1, 2]"]
  )
  rc, _, rep = _report(tmp_path, votes_file, study_file)
  err = capsys.readouterr().err
  assert rc == 1
  n = len(votes)
  for line in range(n + 1, n + 7):
    assert f"skipped {votes_file}:{line}:" in err
  assert "second vote" in err and "t9999" in err and "both" in err
  assert rep["counts"]["votes"] == n and rep["counts"]["lines_skipped"] == 6
  assert rep["win_rates"]["pairs"][0] == dataclasses.asdict(
    sa.win_rates(votes, n_boot=N_BOOT, seed=3)[("adapted", "base")]
  )


def test_degenerate_studies_say_why(tmp_path, capsys):
  study_file, study = _make_study(tmp_path / "s", ["adapted", "base"], 8)
  rc, out, rep = _report(tmp_path, _write_votes(tmp_path / "empty.jsonl", []), study_file)
  assert rc == 0, capsys.readouterr().err
  for section in (
    rep["win_rates"],
    rep["votes_per_pair"],
    rep["bradley_terry"],
    rep["agreement"]["human"],
    rep["agreement"]["fleiss_kappa"],
    rep["agreement"]["krippendorff_alpha"],
  ):
    assert section["available"] is False and section["reason"]
  assert not (out / "fig8_votes_per_pair.png").exists() and rep["plots"] == {}
  assert "no votes" in capsys.readouterr().out
  _no_nan((out / "report.json").read_text())
  assert "Not computable" in (out / "report.html").read_text()

  # one vote per pair: win rates exist, but nobody shares a pair, so agreement and kappa are not computable
  votes = _on_study(sa.simulate({("adapted", "base"): 0.7}, 8, 3, seed=6, raters_per_pair=1), study)
  rc, out, rep = _report(tmp_path, _write_votes(tmp_path / "single.jsonl", votes), study_file)
  assert rc == 0
  assert rep["win_rates"]["available"] and (out / "fig8_votes_per_pair.png").exists()
  assert not rep["agreement"]["human"]["available"] and "two participants" in rep["agreement"]["human"]["reason"]
  assert not rep["agreement"]["fleiss_kappa"]["available"]
  assert not rep["bradley_terry"]["available"] and "3 or more systems" in rep["bradley_terry"]["reason"]
  assert "Fleiss' kappa not computable" in capsys.readouterr().out
  _no_nan((out / "report.json").read_text())


@pytest.mark.parametrize("what", ["missing_study", "database_url", "bad_scorer"])
def test_bad_inputs_are_one_line(tmp_path, capsys, what):
  study_file, study = _make_study(tmp_path / "s", ["adapted", "base"], 4)
  capsys.readouterr()
  votes_file = _write_votes(tmp_path / "votes.jsonl", _on_study(sa.simulate({("adapted", "base"): 0.7}, 4, 2), study))
  args = {
    "missing_study": [str(votes_file), "--study", str(tmp_path / "nope.json")],
    "database_url": [str(tmp_path / "absent.sqlite"), "--study", str(study_file)],
    "bad_scorer": [str(votes_file), "--study", str(study_file), "--scorer", "noequals"],
  }[what]
  assert main(["study", "report", *args, "--out", str(tmp_path / "r")]) == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("hps-jax study: error: "), lines
  assert {"missing_study": "nope.json", "database_url": "absent.sqlite", "bad_scorer": "NAME=CKPT"}[what] in lines[0]
  assert not (tmp_path / "r" / "report.json").exists()


def test_report_reads_the_study_database_directly(tmp_path, capsys):
  """VOTES may be the server's SQLite file (or a database URL): the same report as from its JSONL export."""
  pytest.importorskip("sqlalchemy")
  from hps_jax.study import store

  study_file, _ = _make_study(tmp_path / "s", ["adapted", "base"], 6)
  study = load_study(study_file)
  db_file = tmp_path / "votes.sqlite"
  db = store.open_store(store.sqlite_url(str(db_file)), study)
  for i in range(4):
    code = db.join(f"person{i}")
    while not (nxt := db.next_assignment(code)).done:
      db.record_vote(code, nxt.pair_id, "left" if (i + len(nxt.pair_id)) % 3 else "right", response_ms=900)
  exported = db.export_votes()
  db.close()
  votes_file = tmp_path / "votes.jsonl"
  votes_file.write_text("".join(json.dumps(r) + "\n" for r in exported))
  reports = {}
  for name, source in (("db", db_file), ("url", store.sqlite_url(str(db_file))), ("jsonl", votes_file)):
    assert main(["study", "report", str(source), "--study", str(study_file), "--out", str(tmp_path / name)]) == 0
    reports[name] = json.loads((tmp_path / name / "report.json").read_text())
  capsys.readouterr()
  assert reports["db"]["counts"]["votes"] == len(exported) == 4 * 6
  for name in ("db", "url"):
    assert reports[name]["win_rates"] == reports["jsonl"]["win_rates"]
    assert reports[name]["agreement"] == reports["jsonl"]["agreement"]
