"""A synthetic, learnable preference dataset: deterministic, offline, fast.

Each record has a prompt naming a coloured shape ("a photo of a red circle") and 2-4 rendered images of one shape
each on a noisy background; exactly one image shows the named colour AND shape: the chosen one (rank 0).
Distractors have the right shape in a wrong colour (rank 1), or a wrong shape (rank 2) — so the graded ranks make
pairwise accuracy meaningful, and a model must read both words of the prompt to get the n-way choice right.
Record i of a split is a pure function of (seed, split, i): splits never overlap, access order does not matter.

Records follow the shared schema of `hps_jax.data.pipeline`: {"id", "prompt", "images": [PNG bytes], "ranks",
"chosen"}. `write_jsonl` writes a split in the generic `preference_jsonl` layout (image files + {split}.jsonl).
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {
  "red": (220, 40, 40),
  "green": (40, 180, 60),
  "blue": (40, 70, 220),
  "yellow": (235, 210, 40),
  "purple": (150, 60, 190),
  "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "{c} {s}", "an image showing a {c} {s}", "a picture of one {c} {s}")


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  if shape == "circle":
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  if shape == "square":
    return (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
  if shape == "triangle":  # upward, apex at top
    top, bottom = cy - r, cy + r * 0.8
    half = (y - top) / (bottom - top) * r
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
  raise ValueError(shape)


def render(color: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """One (size, size, 3) uint8 image: a gray noisy background and the shape, with jittered position and size."""
  bg = rng.integers(70, 140)
  img = np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255)
  r = size * rng.uniform(0.25, 0.36)
  cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
  m = _mask(shape, size, cx, cy, r)
  col = np.asarray(COLORS[color], np.float32) + rng.normal(0, 8, 3)
  img[m] = np.clip(col + rng.normal(0, 6, (int(m.sum()), 3)), 0, 255)
  return img.astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def make_record(rng: np.random.Generator, image_size: int, n_images: int, record_id: str = "") -> dict:
  colors, shapes = list(COLORS), list(SHAPES)
  color, shape = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]
  other_colors = [c for c in colors if c != color]
  other_shapes = [s for s in shapes if s != shape]
  items = [(color, shape, 0)]
  for j in range(n_images - 1):
    if j == 0 or rng.random() < 0.5:  # at least one right-shape / wrong-colour distractor
      items.append((other_colors[rng.integers(len(other_colors))], shape, 1))
    else:
      items.append((colors[rng.integers(len(colors))], other_shapes[rng.integers(len(other_shapes))], 2))
  order = rng.permutation(n_images)
  items = [items[i] for i in order]
  prompt = TEMPLATES[rng.integers(len(TEMPLATES))].format(c=color, s=shape)
  images = [_png(render(c, s, image_size, rng)) for c, s, _ in items]
  ranks = np.asarray([rk for _, _, rk in items], np.int32)
  return {
    "id": record_id,
    "prompt": prompt,
    "images": images,
    "ranks": ranks,
    "chosen": int(np.argmin(ranks)),
    "attributes": [(c, s) for c, s, _ in items],
  }


class SyntheticPreference:
  """Random-access source of `num_records` synthetic preference records."""

  def __init__(
    self,
    num_records: int,
    seed: int = 0,
    split: str = "train",
    image_size: int = 48,
    min_images: int = 2,
    max_images: int = 4,
  ):
    if not 2 <= min_images <= max_images:
      raise ValueError(f"need 2 <= min_images <= max_images, got {min_images}, {max_images}")
    self.num_records, self.seed, self.split, self.image_size = int(num_records), int(seed), split, int(image_size)
    self.min_images, self.max_images = min_images, max_images
    self._split_code = zlib.crc32(split.encode("utf-8"))

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if i < 0:
      i += self.num_records
    if not 0 <= i < self.num_records:
      raise IndexError(f"record {i} out of range [0, {self.num_records})")
    rng = np.random.default_rng([self.seed, self._split_code, i])
    n = int(rng.integers(self.min_images, self.max_images + 1))
    rec = make_record(rng, self.image_size, n, f"{self.split}-{i}")
    rec.pop("attributes")
    return rec

  def __repr__(self):
    return f"SyntheticPreference({self.num_records}, seed={self.seed}, split={self.split!r})"


def write_jsonl(source, out_dir, split: str) -> Path:
  """Writes every record's images (PNG) and `{split}.jsonl` lines {"id", "prompt", "images": [relative paths],
  "chosen", "ranks"} under out_dir; returns the JSONL path."""
  out = Path(out_dir)
  (out / split).mkdir(parents=True, exist_ok=True)
  path = out / f"{split}.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(len(source)):
      rec = source[i]
      names = []
      for j, data in enumerate(rec["images"]):
        name = f"{split}/{i:06d}_{j}.png"
        (out / name).write_bytes(data)
        names.append(name)
      f.write(
        json.dumps(
          {
            "id": rec["id"],
            "prompt": rec["prompt"],
            "images": names,
            "chosen": int(rec["chosen"]),
            "ranks": [int(r) for r in rec["ranks"]],
          }
        )
        + "\n"
      )
  return path


def write_generated(source, out_dir, name: str = "generated") -> Path:
  """Every record's images as PNG files plus `{name}.jsonl` rows {"image", "prompt"} (paths relative to out_dir):
  a stand-in for a generator's outputs, the input `hps-jax label` scores (several images per prompt)."""
  out = Path(out_dir)
  (out / name).mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(len(source)):
      rec = source[i]
      for j, data in enumerate(rec["images"]):
        file = f"{name}/{i:06d}_{j}.png"
        (out / file).write_bytes(data)
        f.write(json.dumps({"image": file, "prompt": rec["prompt"]}) + "\n")
  return path


def write_lora_manifest(source, out_dir, negative_prefix: str = "Weird image. ") -> Path:
  """A LoRA training manifest labelled by the records' ground truth instead of a scorer: per record the chosen
  image as `preferred` and the worst-ranked one as `non_preferred` (caption prefixed), rows {"image", "caption",
  "kind"} in `manifest.jsonl` under out_dir (the layout `hps-jax label` writes)."""
  out = Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  path = out / "manifest.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(len(source)):
      rec = source[i]
      worst = int(np.argmax(rec["ranks"]))
      for j, kind, caption in (
        (rec["chosen"], "preferred", rec["prompt"]),
        (worst, "non_preferred", negative_prefix + rec["prompt"]),
      ):
        file = f"images/{i:06d}_{j}.png"
        (out / file).write_bytes(rec["images"][j])
        f.write(json.dumps({"image": file, "caption": caption, "kind": kind}) + "\n")
  return path
