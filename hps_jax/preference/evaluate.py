"""Preference accuracy (the paper's Table 2 metric) and friends, from per-image scores grouped by prompt.

n-way accuracy: fraction of prompts whose chosen (best-ranked) image gets the strictly highest score — a tie for
the top counts as wrong, so a constant scorer gets 0, not 1/n. The random-guess expectation is the mean of 1/n.
Pairwise accuracy: over all image pairs of a prompt with different ranks, the fraction the scores order correctly
(a tie counts half).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np


def preference_report(scores: Sequence[np.ndarray], ranks: Sequence[np.ndarray]) -> dict:
  """scores[i], ranks[i]: arrays of one prompt's images (lower rank = better; rank ties allowed)."""
  if len(scores) != len(ranks):
    raise ValueError(f"{len(scores)} score groups but {len(ranks)} rank groups")
  per_n = defaultdict(lambda: {"num_prompts": 0, "correct": 0, "inv_n": 0.0, "pairs": 0, "pairs_right": 0.0})
  for s, r in zip(scores, ranks):
    s, r = np.asarray(s, np.float64), np.asarray(r)
    if s.ndim != 1 or s.shape != r.shape or len(s) < 2:
      raise ValueError(f"each prompt needs >= 2 images with one score and rank each, got {s.shape} and {r.shape}")
    n = len(s)
    best = np.flatnonzero(r == r.min())
    top = np.flatnonzero(s == s.max())
    acc = per_n[n]
    acc["num_prompts"] += 1
    acc["correct"] += int(len(top) == 1 and top[0] in best)
    acc["inv_n"] += 1.0 / n
    i, j = np.triu_indices(n, 1)
    differ = r[i] != r[j]
    i, j = i[differ], j[differ]
    agree = np.sign(s[i] - s[j]) == np.sign(r[j] - r[i])
    ties = s[i] == s[j]
    acc["pairs"] += len(i)
    acc["pairs_right"] += float(agree.sum() + 0.5 * ties.sum())

  def summary(a):
    return {
      "accuracy": a["correct"] / a["num_prompts"],
      "random_expectation": a["inv_n"] / a["num_prompts"],
      "pairwise_accuracy": a["pairs_right"] / a["pairs"] if a["pairs"] else float("nan"),
      "num_prompts": a["num_prompts"],
      "num_pairs": a["pairs"],
    }

  total = {k: sum(a[k] for a in per_n.values()) for k in ("num_prompts", "correct", "inv_n", "pairs", "pairs_right")}
  if not total["num_prompts"]:
    raise ValueError("no prompts to evaluate")
  out = summary(total)
  out["per_n"] = {str(n): summary(per_n[n]) for n in sorted(per_n)}
  return out


def markdown_table(report: dict, title: str = "") -> str:
  rows = [("all", report)] + [(f"n={n}", r) for n, r in report["per_n"].items()]
  lines = ([f"### {title}", ""] if title else []) + [
    "| subset | prompts | accuracy | random guess | pairwise accuracy |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, r in rows:
    lines.append(
      f"| {name} | {r['num_prompts']} | {r['accuracy']:.4f} | {r['random_expectation']:.4f} | "
      f"{r['pairwise_accuracy']:.4f} |"
    )
  return "\n".join(lines) + "\n"
