"""HPS labelling of generated images for the LoRA adaptation of Stable Diffusion (paper Sec. 5, `hps-jax label`).

Every (image, prompt) is scored with a preference model, HPS = 100 * cos(image, prompt) as the Scorer returns it.
Per prompt with n images, softmax over that prompt's HPS at temperature 1:

* the best image I* is kept as **preferred** when softmax(HPS)[I*] > alpha / n (alpha = 2 in the paper);
* the worst image is kept as **non_preferred** when softmax(-HPS)[I_worst] > alpha / n; its caption becomes
  `"Weird image. " + prompt`;
* ties pick the first image in input order; if best and worst are the same image (all scores equal) neither is
  kept. Since a softmax entry is at most 1, prompts with n <= alpha can never pass and are not scored.

The official release (tgxs002/align_sd `select_training_images.py`) also drops near-constant images before the
softmax (max horizontal neighbour difference < 10 on the uint8 RGB image; the release takes the signed
difference, here its absolute value) and prompts left with fewer than 4 images: preset `release`. Preset `paper`
(the default) applies neither.

Manifest (JSONL), one row per training image, `{"image", "caption", "kind"}` with kind `preferred`,
`non_preferred` or `regularization`: prompts in order of first appearance (preferred row before non_preferred),
then the regularization images in file order. Images selected from zip archives are written out under
`<manifest folder>/images/<zip path under ROOT without .zip>/<member name>` (original bytes, not re-encoded) and
referenced by that path relative to the manifest's folder; images that already are files (JSONL input,
regularization) are referenced by absolute path. Either way `manifest_dir / image` opens the file.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

from hps_jax.data.diffusiondb import ArchiveReader, DiffusionDBError, MemberError
from hps_jax.data.images import ImageError, load_image
from hps_jax.data.pairs import jsonl_objects

KINDS = ("preferred", "non_preferred", "regularization")


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """The labelling rule. `blur_threshold` 0 and `min_images` 0 switch those filters off."""

  alpha: float = 2.0
  blur_threshold: int = 0
  min_images: int = 0
  negative_prefix: str = "Weird image. "

  def validate(self):
    if not self.alpha > 0:
      raise ValueError(f"alpha must be > 0, got {self.alpha}")
    if self.blur_threshold < 0 or self.min_images < 0:
      raise ValueError("blur threshold and min images must be >= 0 (0 = off)")
    return self


PRESETS = {
  "paper": LabelConfig(),
  "release": LabelConfig(blur_threshold=10, min_images=4),
}


# ------------------------------------------------------------------------------------------------------------
# the rule (pure numpy)
# ------------------------------------------------------------------------------------------------------------
def softmax(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


def select(hps, alpha: float = 2.0) -> tuple[int | None, int | None]:
  """(best index or None, worst index or None) among one prompt's HPS values (module docstring)."""
  hps = np.asarray(hps, np.float64)
  if hps.ndim != 1:
    raise ValueError(f"expected one prompt's scores as a 1-d array, got shape {hps.shape}")
  n = hps.shape[0]
  if n < 2:
    return None, None
  b, w = int(np.argmax(hps)), int(np.argmin(hps))  # first occurrence on ties
  best = b if softmax(hps)[b] > alpha / n else None
  worst = w if softmax(-hps)[w] > alpha / n else None
  if best is not None and best == worst:
    return None, None
  return best, worst


def selectable(n: int, config: LabelConfig) -> bool:
  """Whether a prompt with n images can yield a selection at all (n > alpha, n >= 2, n >= min_images)."""
  return n >= 2 and n > config.alpha and n >= config.min_images


def max_neighbour_diff(image: np.ndarray) -> int:
  """max |I[:, x+1, :] - I[:, x, :]| over a uint8 (H, W, C) image, as an int (0 for a 1-pixel-wide image)."""
  image = np.asarray(image)
  if image.shape[1] < 2:
    return 0
  return int(np.abs(np.diff(image.astype(np.int16), axis=1)).max())


def is_blurry(image: np.ndarray, threshold: int) -> bool:
  """Near-constant image test of the release: max horizontal neighbour difference < threshold (0 = off)."""
  return threshold > 0 and max_neighbour_diff(image) < threshold


@dataclasses.dataclass
class Selection:
  prompt: str
  n: int
  best: Hashable | None
  worst: Hashable | None


def select_by_prompt(
  scored: Iterable[tuple[Hashable, str, float]], config: LabelConfig
) -> tuple[list[Selection], Counter]:
  """Groups (key, prompt, hps) by prompt (first-appearance order) and applies the rule to each group.
  Returns one Selection per prompt that kept at least one image, and counts: prompts, prompts_below_min_images,
  prompts_n_le_alpha (n <= alpha: nothing can pass)."""
  groups: dict[str, list[tuple[Hashable, float]]] = {}
  for key, prompt, hps in scored:
    groups.setdefault(prompt, []).append((key, hps))
  out, stats = [], Counter(prompts=len(groups))
  for prompt, items in groups.items():
    n = len(items)
    if n < config.min_images:
      stats["prompts_below_min_images"] += 1
      continue
    if not selectable(n, config):
      stats["prompts_n_le_alpha"] += 1
      continue
    b, w = select([h for _, h in items], config.alpha)
    if b is not None or w is not None:
      out.append(Selection(prompt, n, items[b][0] if b is not None else None, items[w][0] if w is not None else None))
  return out, stats


def manifest_rows(
  selections: Sequence[Selection], image_path: Callable[[Hashable], str], negative_prefix: str = "Weird image. "
) -> list[dict]:
  rows = []
  for s in selections:
    if s.best is not None:
      rows.append({"image": image_path(s.best), "caption": s.prompt, "kind": "preferred"})
    if s.worst is not None:
      rows.append({"image": image_path(s.worst), "caption": negative_prefix + s.prompt, "kind": "non_preferred"})
  return rows


def read_manifest(path) -> list[dict]:
  """Manifest rows with `image` resolved against the manifest's folder."""
  p = Path(path)
  rows = []
  for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
    if line.strip():
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from e
      if not isinstance(row, dict) or not {"image", "caption", "kind"} <= set(row):
        raise ValueError(f'{p}:{n}: expected {{"image", "caption", "kind"}}')
      rows.append({**row, "image": str(p.parent / row["image"])})
  return rows


# ------------------------------------------------------------------------------------------------------------
# regularization images
# ------------------------------------------------------------------------------------------------------------
def read_regularization(path, skip: Callable[[str, str], None]) -> list[tuple[str, str, str]]:
  """(absolute image path, caption, where) for a folder with `metadata.jsonl` (Hugging Face imagefolder) or a
  JSONL file of {"file_name", "caption"} rows; file names resolve against the JSONL's folder."""
  p = Path(path)
  meta = p / "metadata.jsonl" if p.is_dir() else p
  if p.is_dir() and not meta.is_file():
    raise ValueError(f'{p}: no metadata.jsonl (expected {{"file_name", "caption"}} rows, the imagefolder layout)')
  if not meta.exists():
    raise FileNotFoundError(f"{meta}: no such file or directory")
  out = []
  for where, row in jsonl_objects(meta, skip):
    if (
      not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("caption"), str)
    ):
      skip(where, 'expected an object with string fields "file_name" and "caption"')
      continue
    out.append((os.path.abspath(meta.parent / row["file_name"]), row["caption"], where))
  return out


# ------------------------------------------------------------------------------------------------------------
# labelling a set of records
# ------------------------------------------------------------------------------------------------------------
def _prepare(src, preprocess, blur_threshold: int):
  """Worker: decode, blur test, preprocess -> (pixels or None, blurry, error message or None)."""
  try:
    img = load_image(src)
  except ImageError as e:
    return None, False, e.message
  if is_blurry(img, blur_threshold):
    return None, True, None
  return preprocess.apply(img), False, None


def _chunks(items, size):
  for start in range(0, len(items), size):
    yield items[start : start + size]


def _decoded(chunks, reader, pool, work, skips):
  """Reads (main thread) and decodes (pool) chunk k+1 while the caller scores chunk k."""
  pending = None
  for chunk in chunks:
    futures = []
    for i, r in chunk:
      try:
        futures.append((i, r, pool.submit(work, reader.read(r))))
      except (MemberError, DiffusionDBError) as e:
        skips.add(r.where, str(e))
        futures.append((i, r, None))
    if pending is not None:
      yield [(i, r, f.result() if f is not None else None) for i, r, f in pending]
    pending = futures
  if pending is not None:
    yield [(i, r, f.result() if f is not None else None) for i, r, f in pending]


def _safe_member(name: str) -> PurePosixPath:
  p = PurePosixPath(name)
  return p if not p.is_absolute() and ".." not in p.parts else PurePosixPath(p.name)


def check_regularization(items, skips, workers: int, progress) -> list[dict]:
  """Decodes every regularization image once (so the trainer never meets a broken one); bad ones are skipped."""

  def check(item):
    try:
      load_image(item[0])
      return None
    except ImageError as e:
      return e.message

  rows = []
  with cf.ThreadPoolExecutor(workers) as pool, progress(len(items), "regularization") as bar:
    for (path, caption, where), err in zip(items, pool.map(check, items)):
      bar.update(1)
      if err is not None:
        skips.add(f"{where} ({path})", err)
      else:
        rows.append({"image": path, "caption": caption, "kind": "regularization"})
  return rows


def write_scores(path, scored, records, selections) -> None:
  """Every scored image as {image, prompt, hps, kind} (kind None when not selected)."""
  kind = {s.best: "preferred" for s in selections if s.best is not None}
  kind.update({s.worst: "non_preferred" for s in selections if s.worst is not None})
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for i, prompt, hps in scored:
      f.write(
        json.dumps({"image": records[i].where, "prompt": prompt, "hps": hps, "kind": kind.get(i)}, ensure_ascii=False)
        + "\n"
      )


def score_records(
  records, candidates, scorer, config: LabelConfig, skips, progress, batch_size: int
) -> tuple[list, int]:
  """HPS of the candidate (index, record) pairs -> ([(index, prompt, hps)], number of blurry images dropped).
  Archive members are read on this thread and decoded in a pool while the previous chunk is scored; unreadable or
  non-finite ones go to `skips`. `progress(total, desc)` is a progress-bar context manager."""
  scored: list[tuple[int, str, float]] = []
  blurry = 0
  work = lambda src: _prepare(src, scorer.preprocess, config.blur_threshold)  # noqa: E731
  with (
    ArchiveReader() as reader,
    cf.ThreadPoolExecutor(scorer.workers) as pool,
    progress(len(candidates), "labelling") as bar,
  ):
    for chunk in _decoded(_chunks(candidates, batch_size), reader, pool, work, skips):
      ok = []
      for i, r, res in chunk:
        if res is None:
          continue
        pixels, is_blur, err = res
        if err is not None:
          skips.add(r.where, err)
        elif is_blur:
          blurry += 1
        else:
          ok.append((i, r, pixels))
      if ok:
        cos = scorer.cosine_arrays(np.stack([p for _, _, p in ok]), scorer.tokenize([r.prompt for _, r, _ in ok]))
        for (i, r, _), c in zip(ok, np.asarray(cos, np.float64)):
          if np.isfinite(c):
            scored.append((i, r.prompt, 100.0 * float(c)))
          else:
            skips.add(r.where, "non-finite score")
      bar.update(len(chunk))
  return scored, blurry


def extract_selected(records, selections: Sequence[Selection], out_dir: Path, skips) -> tuple[list, dict]:
  """Writes the selected archive members under out_dir/images/ (original bytes); -> (the selections whose images
  could be written, index -> manifest path: relative to out_dir for extracted members, absolute for files)."""
  paths: dict[int, str] = {}
  selected = sorted({k for s in selections for k in (s.best, s.worst) if k is not None})
  with ArchiveReader() as reader:
    for i in selected:
      r = records[i]
      if r.archive is None:
        paths[i] = os.path.abspath(r.name)
        continue
      rel = PurePosixPath("images") / r.part / _safe_member(r.name)
      try:
        data = reader.read(r)
      except (MemberError, DiffusionDBError) as e:  # it was readable a moment ago; report rather than crash
        skips.add(r.where, str(e))
        continue
      (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
      (out_dir / rel).write_bytes(data)
      paths[i] = rel.as_posix()
  kept = [
    dataclasses.replace(s, best=s.best if s.best in paths else None, worst=s.worst if s.worst in paths else None)
    for s in selections
  ]
  return [s for s in kept if s.best is not None or s.worst is not None], paths


def write_manifest(rows: Sequence[dict], out: Path) -> None:
  """The manifest JSONL, written atomically."""
  tmp = out.with_name(out.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, out)
