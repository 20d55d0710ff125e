"""The report of a human A/B preference study (`hps-jax study report`): every statistic of `hps_jax.study.analysis`
on the votes of one study, written as report.json (every number), report.md (tables), report.html (self-contained:
inline CSS, plots embedded as base64 PNG) and the plots as PNG files.

Inputs: the study file (`hps_jax.study.create.load_study`) and the votes, read by `load_votes`: a votes JSONL export,
one JSON object per line with the `analysis.Vote` fields (participant, pair_id, system_left, system_right,
image_left, image_right, choice, is_check, expected) and optionally response_ms, created and user_agent (read past).
Every vote is checked against the study: its pair must be one of the study's pairs, with that pair's two images
and their systems, and its kind (test / check) must match. A bad line is a named skip; the report is built from the
rest.

report.json (``"format": "hps-jax-study-report/1"``); every section that cannot be computed is
``{"available": false, "reason": "..."}`` instead of its numbers (no NaN, no infinity anywhere)::

  {
    "format", "created", "hps_jax_version", "study", "votes_source",
    "settings": {"bootstrap", "seed", "level", "exclude_failed_checks", "bt_prior"},
    "definitions": {NAME: TEXT},            # taken from analysis.py's docstrings
    "counts": {"lines_read", "lines_skipped", "votes_excluded", "votes", "comparison_votes", "check_votes",
               "participants", "pairs", "systems": [...]},
    "attention_checks": {"participants": {P: {"seen", "failed"}}, "excluded": [P...], "exclude_failed_checks"},
    "win_rates": {"available", "pairs": [{system_a, system_b, n_votes, n_pairs, wins_a, wins_b, ties, win_rate,
                  ci_low, ci_high, p_value, p_value_pairs}]},
    "votes_per_pair": {"available", "system", "against", "n_pairs", "histogram": [pairs with k votes for system],
                       "share_majority", "share_other_majority", "share_neither"},
    "bradley_terry": {"available", "systems", "strength", "ci_low", "ci_high", "prior",
                      "win_matrix": [[share or null]], "n_votes": [[int]]},
    "agreement": {"human": {"available", "mean", "std", "n_participants", "per_participant", "n_comparisons",
                            "excluded"},
                  "models": {NAME: {same fields, "checkpoint"}},
                  "fleiss_kappa": {"available", "kappa", "raters", "n_items", "n_dropped", "p_observed",
                                   "p_expected"},
                  "krippendorff_alpha": {"available", "alpha", "n_units", "n_values", "d_observed", "d_expected"}},
    "model_scores": {NAME: {"checkpoint", "scores": {IMAGE_ID: score}}},
    "plots": {FILE: what},
    "headline": "..."
  }
"""

from __future__ import annotations

import base64
import datetime
import html
import inspect
import io
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from hps_jax import __version__
from hps_jax.data.pairs import jsonl_objects
from hps_jax.errors import InputError, check_stop
from hps_jax.plotting import pyplot, require_matplotlib
from hps_jax.study import analysis as sa
from hps_jax.study.create import Study, image_path

FORMAT = "hps-jax-study-report/1"
LEVEL = 0.95
BT_PRIOR = 0.1
FIG8 = "fig8_votes_per_pair.png"
WIN_MATRIX = "win_matrix.png"
BT_PLOT = "bradley_terry.png"
OUTPUTS = ("report.json", "report.md", "report.html", FIG8, WIN_MATRIX, BT_PLOT)


# ------------------------------------------------------------------------------------------------------ votes in
DB_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def load_votes(source, skip: Callable[[str, str], None], study: Study | None = None) -> tuple[list[sa.Vote], int]:
  """The votes of `source` and how many records were read. `source` is a votes JSONL export (a path ending in
  .jsonl, as `hps-jax study export` writes it), the study server's SQLite file (.sqlite / .sqlite3 / .db) or a
  database URL (`postgresql+psycopg://...`, read through `hps_jax.study.store`, which needs the `study` extra).
  Each bad record goes to `skip(where, why)`: not JSON, not a vote (a missing or invalid field), a second vote of
  one participant on one pair, or (with `study`) a pair, image or system that is not the study's."""
  text = str(source)
  if "://" in text or text.lower().endswith(DB_SUFFIXES):
    records = _database_votes(text)
  elif text.lower().endswith(".jsonl"):
    records = jsonl_objects(text, skip)
  else:
    raise InputError(
      f"VOTES {text}: expected a votes .jsonl export, the study's SQLite file ({', '.join(DB_SUFFIXES)}) or a "
      "database URL"
    )
  by_pair = {p["id"]: p for p in study.pairs} if study is not None else None
  votes: list[sa.Vote] = []
  first_seen: dict[tuple[str, str], str] = {}
  lines = 0
  for where, row in records:
    lines += 1
    check_stop()
    if not isinstance(row, dict):
      skip(where, "expected a JSON object with the vote fields")
      continue
    try:
      vote = sa.Vote.from_record(row)
    except InputError as e:
      skip(where, str(e))
      continue
    key = (vote.participant, vote.pair_id)
    if key in first_seen:
      skip(where, f"a second vote of {vote.participant!r} on pair {vote.pair_id!r} (first at {first_seen[key]})")
      continue
    if by_pair is not None:
      problem = _study_problem(vote, by_pair, study)
      if problem is not None:
        skip(where, problem)
        continue
    first_seen[key] = where
    votes.append(vote)
  return votes, lines


def _database_votes(source: str) -> list[tuple[str, dict]]:
  """(where, vote record) of every vote in a study database (what `study export` would write)."""
  try:
    from hps_jax.study import store
  except ImportError as e:
    raise InputError(f"VOTES {source}: reading a study database needs pip install 'hps_jax[study]' ({e})") from None
  if "://" not in source:
    if not Path(source).is_file():
      raise InputError(f"VOTES {source}: no such database file")
    source = store.sqlite_url(str(Path(source).resolve()))
  db = store.open_store(source, create=False)
  try:
    rows = db.export_votes()
  finally:
    db.close()
  return [(f"{source} vote {i + 1}", row) for i, row in enumerate(rows)]


def _study_problem(vote: sa.Vote, by_pair: Mapping[str, dict], study: Study) -> str | None:
  pair = by_pair.get(vote.pair_id)
  if pair is None:
    return f"pair {vote.pair_id!r} is not a pair of the study {study.path}"
  if sorted([vote.image_left, vote.image_right]) != sorted(pair["images"]):
    return f"the images {vote.image_left!r} / {vote.image_right!r} are not pair {vote.pair_id!r}'s {pair['images']}"
  if bool(vote.is_check) != (pair["kind"] == "check"):
    return f"is_check is {vote.is_check} but pair {vote.pair_id!r} is a {pair['kind']} pair"
  if not vote.is_check:
    for system, image in ((vote.system_left, vote.image_left), (vote.system_right, vote.image_right)):
      if study.images[image].get("system") != system:
        return f"image {image!r} is system {study.images[image].get('system')!r}'s, not {system!r}"
  return None


# -------------------------------------------------------------------------------------------------- model scores
def model_scores(study: Study, votes: list[sa.Vote], checkpoint, *, batch_size: int = 32) -> dict[str, float]:
  """{image id: score} of a preference model (`Scorer.from_pretrained(checkpoint)`: a checkpoint path or a
  published model's name) over the images of the comparison votes, each scored once against its prompt in the
  study file. An image without a prompt, or one that cannot be read, is an InputError."""
  from hps_jax.preference.scorer import Scorer  # JAX: only when a model is asked for

  ids = sorted({img for v in votes if not v.is_check for img in (v.image_left, v.image_right)})
  items = []
  for image_id in ids:
    prompt = study.images[image_id].get("prompt")
    if not isinstance(prompt, str) or not prompt:
      raise InputError(f"image {image_id!r} has no prompt in the study file: a model cannot score it")
    items.append((str(image_path(study, image_id)), prompt))
  try:
    scorer = Scorer.from_pretrained(checkpoint, batch_size=batch_size)
  except InputError:
    raise
  except ValueError as e:  # CheckpointError, WeightsError, a tokenizer mismatch: one line
    raise InputError(f"{checkpoint}: {e}") from e
  out = {}
  for image_id, row in zip(ids, scorer.iter_scores(items)):
    check_stop()
    if "error" in row:
      raise InputError(f"image {image_id!r}: {row['error']}")
    out[image_id] = float(row["hps"])
  return out


# ---------------------------------------------------------------------------------------------------- statistics
def _clean(doc: str | None) -> str:
  return re.sub(r"\s+", " ", inspect.cleandoc(doc or "")).replace("``", "").replace("`", "").strip()


def definitions() -> dict[str, str]:
  """What every number means, in analysis.py's own words (its docstrings), so the report cannot drift from the
  code."""
  module = sa.__doc__ or ""
  general = module.split("Definitions used throughout:", 1)[-1]
  bullets = [_clean(b) for b in re.split(r"\n- ", "\n" + general.strip()) if b.strip()]
  bt_doc = inspect.cleandoc(sa.bradley_terry.__doc__ or "")
  return {
    "votes": _clean(module.split("Definitions used throughout:", 1)[0].split("\n\n", 1)[-1]),
    "ties": bullets[0] if bullets else "",
    "bootstrap": bullets[1] if len(bullets) > 1 else "",
    "spread": bullets[2] if len(bullets) > 2 else "",
    "undefined": bullets[3] if len(bullets) > 3 else "",
    "win_rate": _clean(sa.WinRate.__doc__),
    "votes_per_pair": _clean(sa.PairVotes.__doc__),
    "bradley_terry": _clean(sa.BradleyTerry.__doc__) + " " + _clean(bt_doc),
    "human_agreement": _clean(sa.human_agreement.__doc__),
    "model_agreement": _clean(sa.model_agreement.__doc__),
    "fleiss_kappa": _clean(sa.fleiss_kappa.__doc__),
    "krippendorff_alpha": _clean(sa.krippendorff_alpha.__doc__),
    "attention_checks": _clean(sa.check_failures.__doc__),
  }


def _section(compute: Callable[[], dict]) -> dict:
  """{"available": true, ...} or {"available": false, "reason": why} when the statistic is undefined."""
  try:
    return {"available": True, **compute()}
  except InputError as e:
    return {"available": False, "reason": str(e)}


def _agreement_dict(a: sa.Agreement) -> dict:
  return {
    "mean": a.mean,
    "std": a.std,
    "n_participants": len(a.per_participant),
    "per_participant": a.per_participant,
    "n_comparisons": a.n_comparisons,
    "excluded": list(a.excluded),
  }


def build_report(
  votes: list[sa.Vote],
  *,
  study: Study,
  votes_source: str,
  scores: Mapping[str, tuple[str, Mapping[str, float]]] | None = None,
  n_boot: int = 2000,
  seed: int = 0,
  exclude_failed_checks: bool = False,
  lines_read: int | None = None,
  lines_skipped: int = 0,
) -> dict:
  """The report's content (report.json). `scores`: {model name: (checkpoint, {image id: score})}."""
  scores = dict(scores or {})
  votes = sa.as_votes(votes)
  checks = sa.check_failures(votes)
  excluded = sorted(p for p, r in checks.items() if r.failed > 0) if exclude_failed_checks else []
  n_loaded = len(votes)
  if excluded:
    votes = sa.exclude_failed(votes, 0)
  comparisons = [v for v in votes if not v.is_check]
  systems = sorted({s for v in comparisons for s in (v.system_left, v.system_right)})

  win = _section(
    lambda: {
      "pairs": [
        {k: getattr(w, k) for k in sa.WinRate.__dataclass_fields__}
        for w in sa.win_rates(votes, n_boot=n_boot, seed=seed, level=LEVEL).values()
      ]
    }
  )
  fig8 = _section(lambda: _fig8(votes, win))
  if len(systems) >= 3:
    bt = _section(lambda: _bradley_terry(votes, n_boot, seed))
  else:
    bt = {
      "available": False,
      "reason": f"Bradley-Terry strengths and the win matrix are for 3 or more systems; the votes compare "
      f"{len(systems)} ({', '.join(systems) or 'none'}): the win rate says it all",
    }
  models = {}
  for name, (checkpoint, model) in scores.items():
    models[name] = {
      "checkpoint": str(checkpoint),
      **_section(lambda m=model: _agreement_dict(sa.model_agreement(votes, m))),
    }

  report = {
    "format": FORMAT,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "hps_jax_version": __version__,
    "study": str(study.path),
    "votes_source": votes_source,
    "settings": {
      "bootstrap": n_boot,
      "seed": seed,
      "level": LEVEL,
      "exclude_failed_checks": exclude_failed_checks,
      "bt_prior": BT_PRIOR,
    },
    "definitions": definitions(),
    "counts": {
      "lines_read": len(votes) + lines_skipped if lines_read is None else lines_read,
      "lines_skipped": lines_skipped,
      "votes": len(votes),
      "votes_excluded": n_loaded - len(votes),
      "comparison_votes": len(comparisons),
      "check_votes": len(votes) - len(comparisons),
      "participants": len({v.participant for v in votes}),
      "pairs": len({v.pair_id for v in comparisons}),
      "systems": systems,
    },
    "attention_checks": {
      "participants": {p: {"seen": r.seen, "failed": r.failed} for p, r in checks.items()},
      "excluded": excluded,
      "exclude_failed_checks": exclude_failed_checks,
    },
    "win_rates": win,
    "votes_per_pair": fig8,
    "bradley_terry": bt,
    "agreement": {
      "human": _section(lambda: _agreement_dict(sa.human_agreement(votes))),
      "models": models,
      "fleiss_kappa": _section(lambda: _fields(sa.fleiss_kappa(votes))),
      "krippendorff_alpha": _section(lambda: _fields(sa.krippendorff_alpha(votes))),
    },
    "model_scores": {
      name: {"checkpoint": str(c), "scores": dict(sorted(s.items()))} for name, (c, s) in scores.items()
    },
    "plots": {},
  }
  report["headline"] = headline(report)
  return report


def _fields(obj) -> dict:
  return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def _fig8(votes: list[sa.Vote], win: dict) -> dict:
  """Fig. 8 for the pair of systems with the most image pairs (the first in name order on a draw: with an equal
  design, the first pair of systems by name), seen from the side the votes prefer (the first system when even)."""
  if not win["available"]:
    raise InputError(win["reason"])
  top = max(win["pairs"], key=lambda w: w["n_pairs"])  # max keeps the first of equals: name order
  system, against = (top["system_a"], top["system_b"]) if top["win_rate"] >= 0.5 else (top["system_b"], top["system_a"])
  pv = sa.votes_per_pair(votes, system, against=against)
  return {
    "system": system,
    "against": against,
    "n_pairs": len(pv.pair_ids),
    "histogram": [int(x) for x in pv.histogram],
    "share_majority": pv.share_majority,
    "share_other_majority": pv.share_other_majority,
    "share_neither": max(0.0, 1.0 - pv.share_majority - pv.share_other_majority),
  }


def _bradley_terry(votes, n_boot: int, seed: int) -> dict:
  bt = sa.bradley_terry(votes, n_boot=n_boot, seed=seed, prior=BT_PRIOR, level=LEVEL)
  matrix = [
    [None if bt.win_rate.mask[i, j] else float(bt.win_rate.data[i, j]) for j in range(len(bt.systems))]
    for i in range(len(bt.systems))
  ]
  return {
    "systems": list(bt.systems),
    "strength": [float(x) for x in bt.strength],
    "ci_low": [float(x) for x in bt.ci_low],
    "ci_high": [float(x) for x in bt.ci_high],
    "prior": bt.prior,
    "win_matrix": matrix,
    "n_votes": bt.n_votes.tolist(),
  }


def _pct(x: float) -> str:
  return f"{100.0 * x:.1f}"


def _p(p: float) -> str:
  return "p < 1e-300" if p == 0.0 else f"p = {p:.2g}"


def pair_sentence(w: Mapping) -> str:
  """'a vs b: a preferred in 71.3% of 2000 votes (95% CI 68.2–74.1%, p = 3e-12)', from the preferred side."""
  a, b, rate, low, high = w["system_a"], w["system_b"], w["win_rate"], w["ci_low"], w["ci_high"]
  if rate < 0.5:
    a, b, rate, low, high = b, a, 1.0 - rate, 1.0 - high, 1.0 - low
  return (
    f"{a} vs {b}: {a} preferred in {_pct(rate)}% of {w['n_votes']} votes "
    f"({round(100 * LEVEL)}% CI {_pct(low)}–{_pct(high)}%, {_p(w['p_value'])})"
  )


def headline(report: dict) -> str:
  """The summary printed to stdout: the win rate of each pair of systems (the one with the most image pairs first,
  then name order) and Fleiss' kappa, or why they are missing."""
  win = report["win_rates"]
  if not win["available"]:
    return f"no win rates: {win['reason']}"
  pairs = sorted(win["pairs"], key=lambda w: -w["n_pairs"])  # stable: name order among equals
  kappa = report["agreement"]["fleiss_kappa"]
  tail = f"Fleiss' kappa {kappa['kappa']:.2f}" if kappa["available"] else "Fleiss' kappa not computable"
  lines = [pair_sentence(w) for w in pairs]
  lines[0] += f"; {tail}"
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- plots
def check_matplotlib() -> None:
  require_matplotlib("the study report's plots")


def _png(fig) -> bytes:
  plt = pyplot()
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return buf.getvalue()


def fig8_caption(fig8: dict) -> str:
  return (
    f"{fig8['system']} got the majority of votes on {_pct(fig8['share_majority'])}% of the {fig8['n_pairs']} image "
    f"pairs against {fig8['against']}, {fig8['against']} on {_pct(fig8['share_other_majority'])}% "
    f"(neither: {_pct(fig8['share_neither'])}%)"
  )


def plots(report: dict) -> dict[str, bytes]:
  """{file name: PNG bytes} of the plots the report's numbers allow."""
  plt = pyplot()
  out = {}
  fig8 = report["votes_per_pair"]
  if fig8["available"]:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    hist = fig8["histogram"]
    ax.bar(range(len(hist)), hist, color="#4c72b0")
    ax.set_xticks(range(len(hist)))
    ax.set_xlabel(f"votes for {fig8['system']}'s image")
    ax.set_ylabel("image pairs")
    ax.set_title(f"{fig8['system']} vs {fig8['against']}: votes per image pair", fontsize=10)
    fig.text(0.5, 0.01, fig8_caption(fig8), ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out[FIG8] = _png(fig)
  bt = report["bradley_terry"]
  if bt["available"]:
    systems, k = bt["systems"], len(bt["systems"])
    matrix = np.array([[np.nan if x is None else x for x in row] for row in bt["win_matrix"]])
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.0 * k + 1.8))
    im = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="RdBu")
    for i in range(k):
      for j in range(k):
        text = "–" if np.isnan(matrix[i, j]) else f"{100 * matrix[i, j]:.0f}%"
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(k), systems, rotation=30, ha="right")
    ax.set_yticks(range(k), systems)
    ax.set_xlabel("against")
    ax.set_ylabel("share of votes won by")
    fig.colorbar(im, ax=ax, fraction=0.046)
    out[WIN_MATRIX] = _png(fig)
    order = np.argsort(bt["strength"])[::-1]
    s = np.array(bt["strength"])[order]
    low, high = np.array(bt["ci_low"])[order], np.array(bt["ci_high"])[order]
    fig, ax = plt.subplots(figsize=(6, 0.5 * k + 1.5))
    ax.errorbar(s, range(k), xerr=[np.maximum(s - low, 0), np.maximum(high - s, 0)], fmt="o", capsize=4)
    ax.set_yticks(range(k), [systems[i] for i in order])
    ax.invert_yaxis()
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set_xlabel(f"Bradley-Terry log-strength (mean 0), {round(100 * LEVEL)}% bootstrap CI")
    out[BT_PLOT] = _png(fig)
  return out


# ------------------------------------------------------------------------------------------------- text outputs
def _cell(x) -> str:
  return str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return lines


def _sections(report: dict) -> list[tuple[str, list[str], list[list], str]]:
  """(title, table header, rows, note) of every section, shared by the markdown and the HTML."""
  out = []
  c = report["counts"]
  out.append(
    (
      "Votes",
      [
        "lines read",
        "skipped",
        "excluded",
        "votes",
        "comparison votes",
        "check votes",
        "participants",
        "pairs",
        "systems",
      ],
      [
        [
          c["lines_read"],
          c["lines_skipped"],
          c["votes_excluded"],
          c["votes"],
          c["comparison_votes"],
          c["check_votes"],
          c["participants"],
          c["pairs"],
          ", ".join(c["systems"]),
        ]
      ],
      "",
    )
  )
  win = report["win_rates"]
  rows = []
  if win["available"]:
    for w in win["pairs"]:
      rows.append(
        [
          w["system_a"],
          w["system_b"],
          w["n_votes"],
          w["n_pairs"],
          w["wins_a"],
          w["wins_b"],
          w["ties"],
          f"{_pct(w['win_rate'])}%",
          f"{_pct(w['ci_low'])}–{_pct(w['ci_high'])}%",
          f"{w['p_value']:.3g}",
          f"{w['p_value_pairs']:.3g}",
        ]
      )
  out.append(
    (
      "Win rates",
      [
        "A",
        "B",
        "votes",
        "pairs",
        "A wins",
        "B wins",
        "ties",
        "A's win rate",
        f"{round(100 * LEVEL)}% CI",
        "p (votes)",
        "p (pairs)",
      ],
      rows,
      "" if win["available"] else f"Not computable: {win['reason']}",
    )
  )
  fig8 = report["votes_per_pair"]
  if fig8["available"]:
    rows = [[k, n] for k, n in enumerate(fig8["histogram"])]
    note = fig8_caption(fig8) + "."
  else:
    rows, note = [], f"Not computable: {fig8['reason']}"
  out.append(("Votes per image pair (Fig. 8)", [f"votes for {fig8.get('system', 'A')}", "image pairs"], rows, note))
  bt = report["bradley_terry"]
  if bt["available"]:
    rows = [
      [s, f"{x:.3f}", f"{lo:.3f} – {hi:.3f}"]
      for s, x, lo, hi in zip(bt["systems"], bt["strength"], bt["ci_low"], bt["ci_high"])
    ]
    out.append(("Bradley-Terry strengths", ["system", "log-strength", f"{round(100 * LEVEL)}% CI"], rows, ""))
    rows = [[s] + ["–" if x is None else f"{_pct(x)}%" for x in row] for s, row in zip(bt["systems"], bt["win_matrix"])]
    out.append(("Win matrix (row's share of the votes against the column)", ["", *bt["systems"]], rows, ""))
  else:
    out.append(("Bradley-Terry strengths", [], [], f"Not computed: {bt['reason']}"))
  ag = report["agreement"]
  rows, notes = [], []

  def agreement_row(name, a):
    if a["available"]:
      rows.append([name, f"{_pct(a['mean'])}% ± {_pct(a['std'])}%", a["n_participants"]])
    else:
      notes.append(f"{name}: not computable: {a['reason']}")

  agreement_row("human vs human", ag["human"])
  for name, a in ag["models"].items():
    agreement_row(f"{name} vs human", a)
  k, al = ag["fleiss_kappa"], ag["krippendorff_alpha"]
  if k["available"]:
    rows.append(["Fleiss' kappa", f"{k['kappa']:.3f}", f"{k['n_items']} pairs × {k['raters']} votes"])
  else:
    notes.append(f"Fleiss' kappa: not computable: {k['reason']}")
  if al["available"]:
    rows.append(["Krippendorff's alpha", f"{al['alpha']:.3f}", f"{al['n_units']} pairs, {al['n_values']} votes"])
  else:
    notes.append(f"Krippendorff's alpha: not computable: {al['reason']}")
  out.append(
    ("Agreement (Table 3)", ["", "mean ± std over participants", "participants / items"], rows, " ".join(notes))
  )
  checks = report["attention_checks"]
  rows = [
    [p, r["seen"], r["failed"], "yes" if p in checks["excluded"] else ""] for p, r in checks["participants"].items()
  ]
  if checks["exclude_failed_checks"]:
    note = (
      f"Participants who failed any attention check are excluded from every statistic: "
      f"{', '.join(checks['excluded']) or 'none'}."
    )
  else:
    note = "Nobody is excluded (pass --exclude-failed-checks to leave out participants who failed a check)."
  out.append(("Attention checks", ["participant", "seen", "failed", "excluded"], rows, note))
  return out


DEFINITION_TITLES = {
  "votes": "Votes",
  "ties": "Ties and agreement",
  "bootstrap": "Bootstrap unit",
  "spread": "Spread over participants",
  "undefined": "Undefined values",
  "win_rate": "Win rate and p-values",
  "votes_per_pair": "Votes per image pair",
  "bradley_terry": "Bradley-Terry normalization and prior",
  "human_agreement": "Human vs human agreement",
  "model_agreement": "Model vs human agreement",
  "fleiss_kappa": "Fleiss' kappa",
  "krippendorff_alpha": "Krippendorff's alpha",
  "attention_checks": "Attention checks",
}


def markdown(report: dict) -> str:
  lines = [f"# Study report: {_cell(report['study'])}", "", "```", report["headline"], "```", ""]
  for title, header, rows, note in _sections(report):
    lines += [f"## {title}", ""]
    if rows:
      lines += _table(header, rows) + [""]
    if note:
      lines += [_cell(note), ""]
  if report["plots"]:
    lines += ["## Plots", ""] + [f"![{what}]({name})" for name, what in report["plots"].items()] + [""]
  lines += ["## Definitions", ""]
  lines += [f"- **{DEFINITION_TITLES.get(k, k)}**: {_cell(v)}" for k, v in report["definitions"].items()] + [""]
  lines += [f"Bootstrap: {report['settings']['bootstrap']} replicates, seed {report['settings']['seed']}.", ""]
  return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre.headline { background: #f6f8fa; padding: 0.8em; white-space: pre-wrap; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #444; }
dt { font-weight: bold; margin-top: 0.5em; } dd { margin-left: 1em; font-size: 0.9em; }
.note { font-size: 0.9em; color: #555; }
"""


def html_page(report: dict, images: Mapping[str, bytes]) -> str:
  e = html.escape
  parts = [
    "<!DOCTYPE html>",
    '<html lang="en"><head><meta charset="utf-8">',
    f"<title>Study report: {e(Path(report['study']).name)}</title>",
    f"<style>{CSS}</style></head><body>",
    f"<h1>Study report: {e(report['study'])}</h1>",
    f'<pre class="headline">{e(report["headline"])}</pre>',
  ]
  for title, header, rows, note in _sections(report):
    parts.append(f"<h2>{e(title)}</h2>")
    if rows:
      parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
      parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
      parts.append("</table>")
    if note:
      parts.append(f'<p class="note">{e(note)}</p>')
  if images:
    parts.append("<h2>Plots</h2>")
    for name, data in images.items():
      encoded = base64.b64encode(data).decode("ascii")
      what = report["plots"].get(name, name)
      parts.append(
        f'<figure><img alt="{e(what)}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{e(what)} ({e(name)})</figcaption></figure>"
      )
  parts.append("<h2>Definitions</h2><dl>")
  for k, v in report["definitions"].items():
    parts.append(f"<dt>{e(DEFINITION_TITLES.get(k, k))}</dt><dd>{e(v)}</dd>")
  s = report["settings"]
  parts.append(
    f'</dl><p class="note">Bootstrap: {s["bootstrap"]} replicates, seed {s["seed"]}; hps-jax '
    f"{e(report['hps_jax_version'])}; created {e(report['created'])}.</p></body></html>"
  )
  return "\n".join(parts) + "\n"


def plot_descriptions(report: dict) -> dict[str, str]:
  out = {}
  if report["votes_per_pair"]["available"]:
    out[FIG8] = "Votes per image pair (Fig. 8): " + fig8_caption(report["votes_per_pair"])
  if report["bradley_terry"]["available"]:
    out[WIN_MATRIX] = "Win matrix: the row system's share of the votes against the column system (ties as half)"
    out[BT_PLOT] = f"Bradley-Terry log-strengths with {round(100 * LEVEL)}% bootstrap intervals"
  return out


def render(report: dict) -> dict[str, bytes]:
  """{file name: content} of every output: the plots the numbers allow, then report.json, report.md and
  report.html (the plots embedded). Sets `report["plots"]`. The caller checks the numbers are finite and writes
  the files atomically."""
  images = plots(report)
  descriptions = plot_descriptions(report)
  report["plots"] = {name: descriptions[name] for name in images}
  out = dict(images)
  out["report.json"] = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
  out["report.md"] = markdown(report).encode("utf-8")
  out["report.html"] = html_page(report, images).encode("utf-8")
  return out
