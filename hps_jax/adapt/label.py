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

At dataset scale (`hps-jax label`, the last section): the input is read as a stream of units (DiffusionDB parts,
blocks of JSONL rows, webdataset shards). A first pass over the listing (`survey`: no image bytes for zip parts)
counts each prompt's images; a second pass streams this process's share of the candidates (parts / shards k with
k % N == process index, JSONL rows by index modulo N) through the scorer, chunk by chunk, into a per-process score
log where every candidate gets exactly one row (scored, skipped, blurry), fsynced per chunk: `--resume` continues
after the last complete chunk. The selection is made at the end from the merged logs in global record order, so the
manifest, the extracted images and `--scores` are the same bytes whether the run was interrupted or split over
processes.
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

from hps_jax.data.diffusiondb import (
  DEFAULT_LIMITS,
  ArchiveLimits,
  ArchiveReader,
  DiffusionDBError,
  MemberError,
  Record,
)
from hps_jax.data.images import ImageError, load_image
from hps_jax.data.pairs import jsonl_objects
from hps_jax.data.paths import OutsidePathError, collision_key, confine, safe_basename, safe_member_path, text_problem
from hps_jax.errors import InputError
from hps_jax.files import atomic_write

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
  """Every scored image as {image, prompt, hps, kind} (kind None when not selected), written atomically.
  `records`: index -> Record (a list or a dict)."""
  kind = {s.best: "preferred" for s in selections if s.best is not None}
  kind.update({s.worst: "non_preferred" for s in selections if s.worst is not None})
  with atomic_write(path) as f:
    for i, prompt, hps in scored:
      f.write(
        json.dumps({"image": records[i].where, "prompt": prompt, "hps": hps, "kind": kind.get(i)}, ensure_ascii=False)
        + "\n"
      )


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
  records,
  selections: Sequence[Selection],
  out_dir: Path,
  skips,
  *,
  limits: ArchiveLimits = DEFAULT_LIMITS,
  read: Callable | None = None,
) -> tuple[list, dict]:
  """Writes the selected archive members under out_dir/images/ (original bytes, safe and distinct names: module
  docstring); -> (the selections whose images could be written, index -> manifest path: relative to out_dir for
  extracted members, absolute for files). Members are read in index order, with `read(record) -> bytes` when given
  (webdataset shards: `ShardReader`), else from their zip."""
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
        data = read(r) if read is not None else reader.read(r)
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
  """The manifest JSONL, written atomically (fsynced, then renamed into place)."""
  with atomic_write(out) as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------------------
# dataset scale: streamed, resumable, multi-process labelling (`hps-jax label` uses these)
# ------------------------------------------------------------------------------------------------------------
# One pass over the input's listing (no image bytes) -> `Survey`: how many images each prompt has, so which images
# are candidates (their prompt can pass the rule). A second pass streams this process's share of the candidates
# through the scorer, chunk by chunk; every candidate becomes exactly one row of the process's score log (scored,
# skipped with its reason, or blurry), appended and fsynced per chunk (`hps_jax.files.JsonlAppender`), so a killed
# run resumes after its last complete chunk. The selection, the extracted images and the manifest are computed at
# the end from the complete logs, in global record order: the same bytes whether the run was interrupted or not and
# whatever the number of processes.
@dataclasses.dataclass
class Survey:
  """The whole input's listing, compactly: per unit (DiffusionDB part or block of JSONL rows) the prompt id of
  each record, the number of images per prompt id, and a digest of every (where, prompt) (a resume checks it)."""

  by_index: bool  # records are shared between processes by index (JSONL) rather than by unit (zip parts)
  images: int = 0
  prompt_ids: dict[str, int] = dataclasses.field(default_factory=dict)
  counts: list[int] = dataclasses.field(default_factory=list)
  units: list[np.ndarray] = dataclasses.field(default_factory=list)
  digest: str = ""

  def selectable(self, config: LabelConfig) -> np.ndarray:
    """Per prompt id: whether its images are scored (`selectable`)."""
    return np.array([selectable(n, config) for n in self.counts], bool)

  def share_masks(self, config: LabelConfig, process_index: int = 0, process_count: int = 1) -> Iterable[np.ndarray]:
    """Per unit: which of its records are candidates of this process's share. Parts (zip archives, shards) go to
    process `unit % process_count`; JSONL records to process `index % process_count`."""
    ok, start = self.selectable(config), 0
    for u, ids in enumerate(self.units):
      mask = ok[ids] if len(ids) else np.zeros(0, bool)
      if self.by_index:
        mask &= np.arange(start, start + len(ids)) % process_count == process_index
      elif u % process_count != process_index:
        mask = np.zeros_like(mask)
      start += len(ids)
      yield mask

  def share_size(self, config: LabelConfig, process_index: int = 0, process_count: int = 1) -> int:
    return int(sum(m.sum() for m in self.share_masks(config, process_index, process_count)))


def survey(units: Iterable[Iterable], *, by_index: bool) -> Survey:
  """The `Survey` of a stream of record units (`hps_jax.data.diffusiondb.iter_record_units`)."""
  s, h = Survey(by_index=by_index), hashlib.sha256()
  for records in units:
    ids = []
    for r in records:
      pid = s.prompt_ids.setdefault(r.prompt, len(s.prompt_ids))
      if pid == len(s.counts):
        s.counts.append(0)
      s.counts[pid] += 1
      ids.append(pid)
      h.update(json.dumps([r.where, r.prompt], ensure_ascii=False).encode("utf-8") + b"\n")
    s.units.append(np.asarray(ids, np.int32))
    s.images += len(ids)
    h.update(b"-- unit --\n")
  s.digest = h.hexdigest()
  return s


def share(
  units: Iterable[Iterable], s: Survey, config: LabelConfig, process_index: int = 0, process_count: int = 1, done=()
) -> Iterable[tuple[int, object]]:
  """(global record index, record) of this process's candidates not in `done`, streamed from a second pass over
  the same units (lists or streams); a unit holding none of them is not read at all. Raises InputError when the
  input no longer matches its survey (changed while being read)."""
  start, u = 0, -1
  for u, (records, mask) in enumerate(zip(units, s.share_masks(config, process_index, process_count))):
    if mask.any():
      n = 0
      for k, r in enumerate(records):
        if k < len(mask) and mask[k] and start + k not in done:
          yield start + k, r
        n += 1
      if n != len(mask):
        raise InputError(f"the input changed while it was being labelled (unit {u}: {n} records, was {len(mask)})")
    start += len(mask)
  if u + 1 != len(s.units):
    raise InputError(f"the input changed while it was being labelled ({u + 1} units, was {len(s.units)})")


def _batches(items: Iterable, size: int):
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _skip_row(i: int, where: str, why: str) -> dict:
  return {"i": i, "where": where, "skip": why}


def _score_chunk(pending, scorer) -> list[dict]:
  rows, ok = {}, []
  for i, r, fut in pending:
    if isinstance(fut, str):  # could not be read
      rows[i] = _skip_row(i, r.where, fut)
      continue
    pixels, is_blur, err = fut.result()
    if err is not None:
      rows[i] = _skip_row(i, r.where, err)
    elif is_blur:
      rows[i] = {"i": i, "blurry": True}
    else:
      ok.append((i, r, pixels))
  if ok:
    cos = scorer.cosine_arrays(np.stack([p for _, _, p in ok]), scorer.tokenize([r.prompt for _, r, _ in ok]))
    for (i, r, _), c in zip(ok, np.asarray(cos, np.float64)):
      if np.isfinite(c):
        rows[i] = {"i": i, "hps": 100.0 * float(c), "prompt": r.prompt, "name": r.name, "archive": r.archive}
        if r.part is not None:
          rows[i]["part"] = r.part
      else:
        rows[i] = _skip_row(i, r.where, "non-finite score")
  return [rows[i] for i, _, _ in pending]


def label_chunks(
  candidates: Iterable[tuple[int, object]],
  scorer,
  config: LabelConfig,
  batch_size: int,
  *,
  limits: ArchiveLimits = DEFAULT_LIMITS,
) -> Iterable[list[dict]]:
  """Score-log rows of the candidates, one list per chunk of `batch_size` candidates, in candidate order; every
  candidate gets exactly one row: `{"i", "hps", "prompt", "name", "archive"[, "part"]}` when scored,
  `{"i", "where", "skip"}` when it could not be read / decoded / scored, `{"i", "blurry": true}` when the blur
  filter dropped it. Chunk k+1 is read (this thread) and decoded (a pool) while chunk k is scored."""
  work = lambda src: _prepare(src, scorer.preprocess, config.blur_threshold)  # noqa: E731
  with ArchiveReader(limits) as reader, cf.ThreadPoolExecutor(scorer.workers) as pool:
    pending = None
    for chunk in _batches(candidates, batch_size):
      futures = []
      for i, r in chunk:
        try:
          src = r.data if r.data is not None else reader.read(r)
          futures.append((i, r, pool.submit(work, src)))
        except (MemberError, DiffusionDBError) as e:
          futures.append((i, r, str(e)))
      if pending is not None:
        yield _score_chunk(pending, scorer)
      pending = futures
    if pending is not None:
      yield _score_chunk(pending, scorer)


def read_log(path) -> Iterable[dict]:
  """The rows of a complete score log (every line whole). Raises InputError naming a bad line."""
  with open(path, "rb") as f:
    for n, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if not isinstance(row, dict) or not isinstance(row.get("i"), int):
        raise InputError(f"{path}:{n}: not a score-log row (a JSON object with an integer 'i')")
      yield row


@dataclasses.dataclass
class Merged:
  """The score logs of every process, in global record order."""

  scored: list[tuple[int, str, float]]  # (index, prompt, hps)
  records: dict[int, object]  # index -> Record of every scored image (enough to read it again)
  skipped: list[tuple[str, str]]  # (where, why)
  blurry: int
  rows: list[int]  # rows per log


def merge_logs(paths: Sequence) -> Merged:
  """Merges score logs (`label_chunks` rows) by record index. An index met twice (overlapping shares, a log
  written twice) raises InputError naming both logs."""
  owner: dict[int, int] = {}
  rows: list[dict] = []
  counts = []
  for k, path in enumerate(paths):
    n = 0
    for row in read_log(path):
      i = row["i"]
      if i in owner:
        raise InputError(f"{path}: image {i} is also in {paths[owner[i]]} (the shares overlap)")
      owner[i] = k
      rows.append(row)
      n += 1
    counts.append(n)
  rows.sort(key=lambda r: r["i"])
  m = Merged([], {}, [], 0, counts)
  for row in rows:
    i = row["i"]
    if "hps" in row:
      m.scored.append((i, row["prompt"], float(row["hps"])))
      m.records[i] = Record(name=row["name"], prompt=row["prompt"], archive=row.get("archive"), part=row.get("part"))
    elif row.get("blurry"):
      m.blurry += 1
    else:
      m.skipped.append((str(row.get("where")), str(row.get("skip"))))
  return m


# ------------------------------------------------------------------------------------------------------------
# webdataset shards as a label input (`hps-jax label --shards`)
# ------------------------------------------------------------------------------------------------------------
class _SkipTo:
  """`hps_jax.data.webdataset` reports skips to an object with `add(what, why)`: forward them."""

  def __init__(self, skip: Callable[[str, str], None]):
    self.add = skip


def shard_part(shard: Path, shards: Sequence[Path]) -> str:
  """A shard's name under images/ for its extracted samples: its path relative to the shards' common folder,
  without `.tar` (e.g. `laion/00003`)."""
  parents = [str(Path(os.path.abspath(s)).parent) for s in shards]
  base = os.path.commonpath(parents) if parents else str(Path(shard).parent)
  return PurePosixPath(Path(os.path.relpath(os.path.abspath(shard), base)).as_posix()).with_suffix("").as_posix()


def _shard_records(shard: Path, part: str, skip, limits: ArchiveLimits):
  from hps_jax.data import webdataset as wds

  if not os.path.exists(shard):
    skip(str(shard), "no such shard")
    return
  for s in wds.iter_shard(shard, _SkipTo(skip), limits):
    name = f"{s.key}.{s.ext}"
    if s.caption is None:
      skip(f"{shard}:{name}", "no caption (the .txt member is the prompt)")
      continue
    yield Record(name=name, prompt=s.caption, archive=str(shard), part=part, data=s.image)


def shard_units(shards: Sequence[Path], skip, *, limits: ArchiveLimits = DEFAULT_LIMITS):
  """One unit per shard (`survey` / `share`), each a stream of Records carrying their image bytes (memory: one
  sample at a time); prompt = the sample's caption, so the images of one prompt share a caption. Shard k belongs
  to process k % N (`hps_jax.data.webdataset.shard_share`)."""
  for shard in shards:
    yield _shard_records(Path(shard), shard_part(Path(shard), shards), skip, limits)


class ShardReader:
  """Reads selected samples back from their shards (`extract_selected(read=...)`): records must come in shard and
  sample order (index order), each shard is streamed once."""

  def __init__(self, limits: ArchiveLimits = DEFAULT_LIMITS):
    self.limits = limits
    self._shard: str | None = None
    self._it = None

  def __call__(self, record) -> bytes:
    from hps_jax.data import webdataset as wds

    if record.archive != self._shard:
      self._shard = record.archive
      self._it = wds.iter_shard(Path(record.archive), _SkipTo(lambda *_: None), self.limits)
    for s in self._it:
      if f"{s.key}.{s.ext}" == record.name:
        return s.image
    self._shard = None
    raise MemberError(f"sample {record.name} is no longer in {record.archive}")
