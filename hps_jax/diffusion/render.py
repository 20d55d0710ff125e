"""Rendering many (prompt, seed) jobs with one compiled batch shape, best-of-N selection by a score, and contact
sheets (grids) of the results: the library behind `hps-jax sample` and `hps-jax eval-generator`."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def render(
  sd, jobs: Sequence[tuple[str, int]], cfg, negative: str, batch_size: int, advance: Callable[[int], object] = None
) -> list[np.ndarray]:
  """uint8 images of (prompt, seed) jobs, in one compiled batch shape (the last chunk is padded with copies of
  its last job, whose images are dropped). `advance(n)` is called after each chunk (a progress bar's update)."""
  images = []
  for start in range(0, len(jobs), batch_size):
    chunk = list(jobs[start : start + batch_size])
    pad = chunk + [chunk[-1]] * (batch_size - len(chunk))
    images.extend(sd.sample([p for p, _ in pad], [s for _, s in pad], cfg, negative_prompt=negative)[: len(chunk)])
    if advance is not None:
      advance(len(chunk))
  return images


def best_of_jobs(slots: Sequence[tuple[str, int]], n: int) -> list[tuple[str, int]]:
  """The n candidate jobs of every (prompt, slot seed): candidate c of a slot has seed slot_seed * n + c (for n = 1
  the slot's own seed), so candidates never collide across slots."""
  return [(prompt, seed * n + c) for prompt, seed in slots for c in range(n)]


def pick_best(scores: Sequence[float] | None, num_slots: int, n: int) -> list[int]:
  """Per slot, the index (into the candidate list of `best_of_jobs`) of its highest-scoring candidate; the first
  candidate on ties, and the first of each slot when there are no scores."""
  if scores is None:
    return [i * n for i in range(num_slots)]
  return [max(range(i * n, (i + 1) * n), key=lambda c: scores[c]) for i in range(num_slots)]


def contact_sheet(images: Sequence[np.ndarray], cols: int) -> np.ndarray:
  """uint8 images (all the same size) tiled row-major into one image with `cols` columns."""
  rows = -(-len(images) // cols)
  h, w = images[0].shape[:2]
  sheet = np.zeros((rows * h, cols * w, 3), np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
  return sheet
