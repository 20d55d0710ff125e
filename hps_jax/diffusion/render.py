"""Rendering many (prompt, seed) jobs with one compiled batch shape, best-of-N selection by a score, and contact
sheets (grids) of the results: the library behind `hps-jax sample` and `hps-jax eval-generator`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hps_jax import files


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


def save_image(image: np.ndarray, path) -> None:
  """A uint8 image written atomically (format by the path's extension): an interrupted run leaves no partial file."""
  path = Path(path)
  with files.atomic_path(path, suffix=path.suffix) as tmp:
    Image.fromarray(np.asarray(image)).save(tmp)


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


@dataclasses.dataclass(frozen=True)
class GridLayout:
  """Where the tiles of a labelled A/B grid are: tiles are the images upscaled `scale` times (nearest), below a
  `header` strip with the column labels; each row is a tile row followed by a `caption` strip; columns are `gap`
  pixels apart."""

  tile_h: int
  tile_w: int
  scale: int
  header: int = 28
  caption: int = 26
  gap: int = 8

  def box(self, row: int, col: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the tile in `row`, `col`."""
    top = self.header + row * (self.tile_h + self.caption)
    left = col * (self.tile_w + self.gap)
    return top, left, top + self.tile_h, left + self.tile_w


def labelled_grid(
  columns: Sequence[Sequence[np.ndarray]], labels: Sequence[str], captions: Sequence[str], min_tile: int = 256
) -> tuple[np.ndarray, GridLayout]:
  """One row per image index: the images of every column side by side (e.g. base | adapted from the same seed),
  the column labels on top and each row's caption (its prompt) under it. Small images are enlarged (integer
  nearest-neighbour factor) so tiles are at least `min_tile` pixels tall. -> (uint8 image, layout)."""
  h, w = columns[0][0].shape[:2]
  scale = max(1, -(-min_tile // h))
  layout = GridLayout(tile_h=h * scale, tile_w=w * scale, scale=scale)
  n_rows, n_cols = len(columns[0]), len(columns)
  width = n_cols * layout.tile_w + (n_cols - 1) * layout.gap
  height = layout.header + n_rows * (layout.tile_h + layout.caption)
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=16)
  for c, label in enumerate(labels):
    left = c * (layout.tile_w + layout.gap)
    text = _fit(draw, label, font, layout.tile_w - 4)
    draw.text((left + layout.tile_w // 2, layout.header // 2), text, fill=(0, 0, 0), font=font, anchor="mm")
  for r in range(n_rows):
    for c in range(n_cols):
      top, left, _, _ = layout.box(r, c)
      tile = np.repeat(np.repeat(np.asarray(columns[c][r], np.uint8), scale, axis=0), scale, axis=1)
      canvas.paste(Image.fromarray(tile), (left, top))
    text = _fit(draw, captions[r] if r < len(captions) else "", font, width - 8)
    draw.text(
      (4, layout.header + r * (layout.tile_h + layout.caption) + layout.tile_h + 5), text, fill=(0, 0, 0), font=font
    )
  return np.asarray(canvas), layout


def _fit(draw, text: str, font, width: int) -> str:
  """`text`, shortened with an ellipsis to fit `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "…", font=font) > width:
    text = text[:-1]
  return text + "…"
