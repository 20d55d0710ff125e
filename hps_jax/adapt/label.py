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

Archive member names are untrusted: a member name is used as the output name only when it is a plain relative
path (`hps_jax.data.paths.safe_member_path`) and no other extracted image already took that name (compared
case-insensitively, so `A.png` / `a.png` do not meet on macOS either); any other member (`../x.png`, `/x.png`,
`a\\b.png`, a name taken) is written as `images/<part>/<sha256 prefix>-<safe basename>`, named by its content.
Every extracted file is therefore inside `<manifest folder>/images/` and distinct members never share a file, so
a "Weird image." row can never point at a preferred image. Files are written atomically (a temporary file renamed
into place, which replaces rather than follows a link left there).

Paths read from files (JSONL images, regularization file names, manifest rows) are confined to the folder of the
file that names them unless `allow_outside=True` (`--allow-outside-paths`): see `hps_jax.data.paths`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

from hps_jax.data.diffusiondb import DEFAULT_LIMITS, ArchiveLimits, ArchiveReader, DiffusionDBError, MemberError
from hps_jax.data.images import ImageError, load_image
from hps_jax.data.pairs import jsonl_objects
from hps_jax.data.paths import OutsidePathError, collision_key, confine, safe_basename, safe_member_path, text_problem
from hps_jax.errors import InputError

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


def _raise(where: str, why: str):
  raise InputError(f"{where}: {why}")


def read_manifest(path, *, allow_outside: bool = False) -> list[dict]:
  """Manifest rows with `image` resolved against the manifest's folder. A training manifest must be whole: a
  malformed row, a caption that is not valid Unicode, an unknown kind or an image path escaping the manifest's
  folder (relative paths; absolute ones are taken as written, see hps_jax.data.paths) raises InputError naming
  the line; `allow_outside=True` (`--allow-outside-paths`) lets relative paths leave the folder."""
  p = Path(path)
  rows = []
  for where, row in jsonl_objects(p, _raise):
    if not isinstance(row, dict) or not {"image", "caption", "kind"} <= set(row):
      raise InputError(f'{where}: expected {{"image", "caption", "kind"}}')
    if not isinstance(row["caption"], str) or text_problem(row["caption"]) is not None:
      why = text_problem(row["caption"]) if isinstance(row["caption"], str) else "not a string"
      raise InputError(f'{where}: "caption" is {why}')
    if row["kind"] not in KINDS:
      raise InputError(f'{where}: "kind" must be one of {", ".join(KINDS)}, got {row["kind"]!r:.80}')
    try:
      image = confine(row["image"], p.parent, allow_outside=allow_outside)
    except OutsidePathError as e:
      raise InputError(f"{where}: {e}") from e
    rows.append({**row, "image": image})
  return rows


# ------------------------------------------------------------------------------------------------------------
# regularization images
# ------------------------------------------------------------------------------------------------------------
def read_regularization(
  path, skip: Callable[[str, str], None], *, allow_outside: bool = False
) -> list[tuple[str, str, str]]:
  """(absolute image path, caption, where) for a folder with `metadata.jsonl` (Hugging Face imagefolder) or a
  JSONL file of {"file_name", "caption"} rows; file names resolve against the JSONL's folder and must stay inside
  it unless `allow_outside` (absolute ones are taken as written). Bad rows go to `skip`."""
  p = Path(path)
  meta = p / "metadata.jsonl" if p.is_dir() else p
  if p.is_dir() and not meta.is_file():
    raise InputError(f'{p}: no metadata.jsonl (expected {{"file_name", "caption"}} rows, the imagefolder layout)')
  if not meta.exists():
    raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(meta))
  out = []
  for where, row in jsonl_objects(meta, skip):
    if (
      not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("caption"), str)
    ):
      skip(where, 'expected an object with string fields "file_name" and "caption"')
      continue
    if text_problem(row["caption"]) is not None:
      skip(where, f'"caption" is {text_problem(row["caption"])}')
      continue
    try:
      image = confine(row["file_name"], meta.parent, allow_outside=allow_outside, what="file_name")
    except OutsidePathError as e:
      skip(where, str(e))
      continue
    out.append((os.path.abspath(image), row["caption"], where))
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
  records,
  candidates,
  scorer,
  config: LabelConfig,
  skips,
  progress,
  batch_size: int,
  *,
  limits: ArchiveLimits = DEFAULT_LIMITS,
) -> tuple[list, int]:
  """HPS of the candidate (index, record) pairs -> ([(index, prompt, hps)], number of blurry images dropped).
  Archive members are read on this thread and decoded in a pool while the previous chunk is scored; unreadable or
  non-finite ones go to `skips`. `progress(total, desc)` is a progress-bar context manager."""
  scored: list[tuple[int, str, float]] = []
  blurry = 0
  work = lambda src: _prepare(src, scorer.preprocess, config.blur_threshold)  # noqa: E731
  with (
    ArchiveReader(limits) as reader,
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


class _Names:
  """Output names of extracted members: the member's own name when safe and free, else content-addressed."""

  def __init__(self, out_dir: Path):
    self.out_dir = out_dir
    self.files: dict[str, str] = {}  # collision key -> sha256 of the bytes written there
    self.dirs: set[str] = set()

  def _free(self, rel: PurePosixPath, digest: str) -> bool:
    key = collision_key(rel)
    if key in self.files:
      return self.files[key] == digest  # the same bytes: sharing the file is harmless
    if key in self.dirs or any(collision_key(d) in self.files for d in rel.parents):
      return False
    target = self.out_dir / rel
    if target.is_dir() or any((self.out_dir / d).exists() and not (self.out_dir / d).is_dir() for d in rel.parents):
      return False  # left there by something else (an earlier run); never replaced
    return True

  def assign(self, part: str, member: str, digest: str) -> PurePosixPath | None:
    base = PurePosixPath("images") / (safe_member_path(part) or safe_basename(part))
    name, safe = safe_member_path(member), safe_basename(member)
    candidates = [base / name] if name is not None else []
    candidates += [base / f"{digest[:16]}-{safe}"] + [base / f"{digest[:16]}-{k}-{safe}" for k in range(1, 10)]
    for rel in candidates:
      if self._free(rel, digest):
        self.files[collision_key(rel)] = digest
        self.dirs.update(collision_key(d) for d in rel.parents)
        return rel
    return None


def _write_atomic(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:50]}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def extract_selected(
  records, selections: Sequence[Selection], out_dir: Path, skips, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> tuple[list, dict]:
  """Writes the selected archive members under out_dir/images/ (original bytes, safe and distinct names: module
  docstring); -> (the selections whose images could be written, index -> manifest path: relative to out_dir for
  extracted members, absolute for files)."""
  out_dir = Path(out_dir)
  paths: dict[int, str] = {}
  names = _Names(out_dir)
  selected = sorted({k for s in selections for k in (s.best, s.worst) if k is not None})
  with ArchiveReader(limits) as reader:
    for i in selected:
      r = records[i]
      if r.archive is None:
        paths[i] = os.path.abspath(r.name)
        continue
      try:
        data = reader.read(r)
      except (MemberError, DiffusionDBError) as e:  # it was readable a moment ago; report rather than crash
        skips.add(r.where, str(e))
        continue
      rel = names.assign(r.part or "archive", r.name, hashlib.sha256(data).hexdigest())
      if rel is None:
        skips.add(r.where, f"no free output name under {out_dir / 'images'} (files of an earlier run are in the way)")
        continue
      _write_atomic(out_dir / rel, data)
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
