"""Preference accuracy (the paper's Table 2 metric) and friends, from per-image scores grouped by prompt, and the
sharded scoring of a preference dataset's image slots (HPS / CLIP cosine, aesthetic rating) that feeds it.

n-way accuracy: fraction of prompts whose chosen (best-ranked) image gets the strictly highest score — a tie for
the top counts as wrong, so a constant scorer gets 0, not 1/n. The random-guess expectation is the mean of 1/n.
Pairwise accuracy: over all image pairs of a prompt with different ranks, the fraction the scores order correctly
(a tie counts half).

Several scorers side by side make the paper's Table 2 (`table2_order`, `comparison_table`): rows random, CLIP
baselines, aesthetic, HPS models, with columns n-way accuracy, random-guess expectation, pairwise accuracy, prompts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from hps_jax import parallel
from hps_jax.data import pipeline
from hps_jax.errors import InputError
from hps_jax.models.clip import CLIP, normalize
from hps_jax.preference.loss import prompt_image_cosines


def preference_report(scores: Sequence[np.ndarray], ranks: Sequence[np.ndarray]) -> dict:
  """scores[i], ranks[i]: arrays of one prompt's images (lower rank = better; rank ties allowed)."""
  if len(scores) != len(ranks):
    raise ValueError(f"{len(scores)} score groups but {len(ranks)} rank groups")
  bad = sum(int(not np.isfinite(np.asarray(s, np.float64)).all()) for s in scores)
  if bad:  # an argmax over NaN scores would still "pick" an image: never report such an accuracy
    raise InputError(
      f"the scorer produced non-finite scores (NaN / inf) for {bad} of {len(scores)} prompts: check the checkpoint's "
      "weights; no accuracy is reported"
    )
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


# The row order of the paper's Table 2: the chance baseline, zero-shot CLIP models, the aesthetic predictor, then
# the preference models (HPS); rows of one kind keep the order they were given in.
TABLE2_KINDS = ("random", "clip", "aesthetic", "hps")


def table2_order(kinds: Sequence[str]) -> list[int]:
  """Indices that put rows of the given kinds (each one of TABLE2_KINDS) in the paper's order, stable within a
  kind."""
  unknown = sorted(set(kinds) - set(TABLE2_KINDS))
  if unknown:
    raise ValueError(f"unknown scorer kinds {unknown}; expected {TABLE2_KINDS}")
  return sorted(range(len(kinds)), key=lambda i: TABLE2_KINDS.index(kinds[i]))


def comparison_table(rows: Sequence[dict], title: str = "") -> str:
  """The paper's Table 2 layout, one row per scorer in the order given: each row a `preference_report` with a
  "scorer" name (and, optionally, "preprocess" and "image_size", listed under the table). Accuracies in %."""

  def pct(x):
    return f"{100 * x:.2f}"

  lines = ([f"### {title}", ""] if title else []) + [
    "| scorer | n-way accuracy (%) | random guess (%) | pairwise accuracy (%) | prompts |",
    "|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['scorer']} | {pct(r['accuracy'])} | {pct(r['random_expectation'])} | {pct(r['pairwise_accuracy'])} | "
      f"{r['num_prompts']} |"
    )
  prep = [
    f"{r['scorer']}: {r['preprocess']}" + (f" {r['image_size']}px" if "image_size" in r else "")
    for r in rows
    if "preprocess" in r
  ]
  if prep:
    lines += ["", "Preprocessing (mode, model input size): " + "; ".join(prep) + "."]
  return "\n".join(lines) + "\n"


def slot_scores(score_batch: Callable, source, transform, batch_size: int, progress: bool = False, desc: str = "eval"):
  """Runs `score_batch(batch) -> (B, K) scores` over the source in order; returns per-prompt (scores, ranks)
  lists of the valid image slots."""
  ds = pipeline.eval_dataset(source, transform, batch_size=batch_size)
  scores, ranks = [], []
  bar = None
  if progress and jax.process_index() == 0:
    bar = tqdm(total=len(source), desc=desc, unit="prompt", dynamic_ncols=True)
  for batch in ds:
    batch, n = pipeline.pad_batch(batch, batch_size)
    s = np.asarray(score_batch(batch))[:n]
    for row in range(n):
      m = batch["mask"][row]
      scores.append(s[row][m])
      ranks.append(batch["ranks"][row][m])
    if bar is not None:
      bar.update(n)
  if bar is not None:
    bar.close()
  return scores, ranks


def _slot_score_fn(model, per_image: Callable, mesh, batch_size: int) -> Callable:
  """batch -> (B, K) scores. `per_image(model, pixels (B,K,S,S,3), ids (B,T)) -> (B, K)`; the batch (the same full
  batch on every process) is sharded over the mesh's batch axes, params keep whatever sharding they have."""
  mesh = mesh if mesh is not None else parallel.local_mesh()
  if batch_size % parallel.batch_divisor(mesh):
    raise ValueError(
      f"eval batch size {batch_size} must be a multiple of the {parallel.batch_divisor(mesh)} batch shards"
    )
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, pixels, ids):
    out = per_image(nnx.merge(graphdef, state), pixels, ids)
    return jax.lax.with_sharding_constraint(out, parallel.replicated(mesh))

  def score(batch):
    pixels, ids = parallel.put_global(mesh, (batch["pixels"], batch["ids"]))
    return fn(state, pixels, ids)

  return score


def clip_score_fn(model: CLIP, mesh=None, batch_size: int = 16) -> Callable:
  """HPS / CLIP: the cosine of each image slot with its prompt."""
  return _slot_score_fn(model, prompt_image_cosines, mesh, batch_size)


def aesthetic_score_fn(clip_model: CLIP, head, mesh=None, batch_size: int = 16) -> Callable:
  """The LAION aesthetic rating of each image slot (the prompt is ignored)."""

  def per_image(models, pixels, ids):
    clip, mlp = models
    b, k = pixels.shape[:2]
    emb = normalize(clip.encode_image(pixels.reshape((b * k,) + pixels.shape[2:])))
    return mlp(emb).reshape(b, k)

  return _slot_score_fn((clip_model, head), per_image, mesh, batch_size)


def evaluate_clip(model: CLIP, source, transform, *, batch_size: int, mesh=None, progress: bool = False) -> dict:
  scores, ranks = slot_scores(clip_score_fn(model, mesh, batch_size), source, transform, batch_size, progress)
  return preference_report(scores, ranks)
