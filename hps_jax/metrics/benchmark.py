"""Generator benchmarks with the protocols published numbers use: layouts of prompts and images, aggregation, and
the leaderboard (dict, markdown table, bar chart).

Protocols (each reader returns a `Layout`: every expected image as an `Entry`, plus the missing and the
unexpected files, named; nothing is silently averaged over):

* ``hpsv2`` (HPS v2's benchmark, `hpsv2/evaluation.py` of tgxs002/HPSv2): prompts are ``<style>.json`` files, each a
  JSON list of prompt strings (anime, concept-art, paintings, photo: 800 each); generator G's image for prompt i of a
  style is ``G/<style>/{i:05d}.jpg``. Per style, the scores (100 * cosine) of the prompts in file order are cut into
  10 consecutive chunks of 80; the style's score is the mean of the chunk means and its spread the std of the chunk
  means (np.std, ddof=0), as the reference prints them. "Average" is the mean over every image of every style
  (for complete styles of equal size: the mean of the style means). Where an image is missing, its chunk mean is
  taken over the chunk's remaining images and the generator is marked incomplete (the reference silently
  substitutes the next image instead).
* ``imagereward`` (ImageReward's benchmark, `test-benchmark.py` of THUDM/ImageReward): one JSON list of
  ``{"id", "prompt"}`` (100 prompts; `benchmark/benchmark-prompts.json`), K images per prompt per generator at
  ``G/<id>_<k>.png``, k = 0..K-1 (K = 10). Score = the mean over prompts of each prompt's mean score.
* ``mean``: a JSONL of ``{"image", "prompt", "generator"}`` rows (or one JSONL of ``{"image", "prompt"}`` rows per
  generator); score = the mean over images, with the std over images (ddof=0) and a seeded 95% percentile
  bootstrap confidence interval of the mean.

Image paths built from names in files (prompt ids, JSONL rows) are confined to their root
(`hps_jax.data.paths.confine`). A number that cannot be computed (no image scored) is None, never NaN.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from hps_jax import files
from hps_jax.data.pairs import jsonl_objects
from hps_jax.data.paths import OutsidePathError, confine, text_problem
from hps_jax.errors import InputError
from hps_jax.plotting import pyplot

PROTOCOLS = ("hpsv2", "imagereward", "mean")
HPSV2_CHUNKS = 10  # 10 chunks of 80 of the 800 prompts of a style
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
IMAGEREWARD_PER_PROMPT = 10
IMAGEREWARD_PROMPTS_FILE = "benchmark-prompts.json"
# the file a slot accepts, in order of preference (the protocols' own extension first)
HPSV2_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGEREWARD_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

DESCRIPTIONS = {
  "hpsv2": "HPSv2 benchmark: per style, the mean of {chunks} consecutive chunks of the style's prompts (in file "
  "order) and the std of the chunk means (np.std, ddof=0); Average = mean over every image",
  "imagereward": "ImageReward benchmark: mean over prompts of each prompt's mean score over its {per_prompt} images",
  "mean": "mean over images; std over images (ddof=0); {confidence:.0%} percentile bootstrap CI of the mean "
  "({resamples} resamples, seed {seed})",
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One expected image: its generator, group (HPSv2 style, ImageReward prompt id, 'all' for JSONL), index in the
  group (prompt index, image number, row number), prompt and path."""

  generator: str
  group: str
  index: int
  prompt: str
  image: str


@dataclasses.dataclass
class Layout:
  protocol: str
  generators: dict[str, str]  # name -> its folder or JSONL file
  groups: list[str]  # styles / prompt ids / ['all'], in order
  entries: list[Entry]  # every expected image, in order (missing ones included)
  missing: list[Entry] = dataclasses.field(default_factory=list)
  missing_dirs: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (folder, images expected in it)
  extra: list[str] = dataclasses.field(default_factory=list)  # unexpected files / folders, never scored

  @property
  def present(self) -> list[Entry]:
    gone = set(self.missing)
    return [e for e in self.entries if e not in gone]

  def group_sizes(self, generator: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in self.entries:
      if e.generator == generator:
        out[e.group] = out.get(e.group, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------------------
# layout readers
# ------------------------------------------------------------------------------------------------------------
def generators_from_root(root) -> dict[str, str]:
  """{name: folder} of every (non-hidden) sub-folder of `root`, sorted by name; InputError when there is none."""
  r = Path(root)
  if not r.is_dir():
    raise InputError(f"{r}: not a folder (expected one sub-folder of images per generator)")
  gens = {d.name: str(d) for d in sorted(r.iterdir()) if d.is_dir() and not d.name.startswith(".")}
  if not gens:
    raise InputError(f"{r}: no generator folders in it (expected one sub-folder of images per generator)")
  return gens


def _load_json(path: Path):
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: not UTF-8 text ({e.reason})") from e
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
  except RecursionError as e:
    raise InputError(f"{path}: not valid JSON (nested too deeply)") from e


def read_prompt_list(path) -> list[str]:
  """An HPSv2 style file: a non-empty JSON list of prompt strings."""
  p = Path(path)
  data = _load_json(p)
  if not isinstance(data, list) or not data:
    got = "an empty list" if data == [] else f"a JSON {type(data).__name__}"
    raise InputError(f"{p}: expected a non-empty JSON list of prompt strings, got {got}")
  for i, v in enumerate(data):
    if not isinstance(v, str) or text_problem(v):
      why = text_problem(v) if isinstance(v, str) else f"a {type(v).__name__}"
      raise InputError(f"{p}: entry {i} is not a prompt string ({why})")
  return data


def hpsv2_styles(prompts, styles: Sequence[str] | None = None) -> dict[str, list[str]]:
  """{style: prompts} from one ``<style>.json`` file or a folder of them: the `styles` named (each file must
  exist), else HPSv2's four (`HPSV2_STYLES`) when the folder holds all of them (HPSv2's benchmark folder also holds
  other prompt sets, e.g. drawbench.json), else every .json in it, sorted."""
  p = Path(prompts)
  if not p.exists():
    raise FileNotFoundError(2, "No such file or directory", str(p))
  if not p.is_dir():
    if styles and list(styles) != [p.stem]:
      raise InputError(f"{p}: one style file ({p.stem}), but styles {', '.join(styles)} were asked for")
    return {p.stem: read_prompt_list(p)}
  found = {f.stem: f for f in sorted(p.iterdir()) if f.suffix == ".json" and f.is_file() and f.name[0] != "."}
  if styles:
    absent = [s for s in styles if s not in found]
    if absent:
      raise InputError(f"{p}: no {absent[0]}.json (styles there: {', '.join(found) or 'none'})")
    names = list(styles)
  elif all(s in found for s in HPSV2_STYLES):
    names = list(HPSV2_STYLES)
  else:
    names = list(found)
  if not names:
    raise InputError(f"{p}: no <style>.json prompt files in it (HPSv2: {', '.join(s + '.json' for s in HPSV2_STYLES)})")
  return {s: read_prompt_list(found[s]) for s in names}


def _listing(folder: Path) -> set[str] | None:
  """The non-hidden names in a folder, or None when it does not exist."""
  if not folder.is_dir():
    return None
  return {n for n in os.listdir(folder) if not n.startswith(".")}


def _slot(names: set[str], stem: str, extensions) -> str | None:
  return next((stem + ext for ext in extensions if stem + ext in names), None)


def _check_generators(generators: dict[str, str]) -> None:
  for name, d in generators.items():
    if not Path(d).is_dir():
      raise InputError(f"generator {name}: {d} is not a folder")


def hpsv2_layout(prompts, generators: dict[str, str], styles: Sequence[str] | None = None) -> Layout:
  """Expected ``G/<style>/{i:05d}.jpg`` for every generator G and prompt i of every style (`hpsv2_styles`); a
  .jpeg / .png / .webp file of the same stem is accepted in place of the .jpg. Unexpected files and folders are
  listed in `extra`."""
  styles = hpsv2_styles(prompts, styles)
  _check_generators(generators)
  layout = Layout("hpsv2", dict(generators), list(styles), [])
  for gen, d in generators.items():
    root = Path(d)
    for name in sorted(_listing(root) or ()):
      if not ((root / name).is_dir() and name in styles):
        layout.extra.append(str(root / name) + ("/" if (root / name).is_dir() else ""))
    for style, texts in styles.items():
      folder = root / style
      names = _listing(folder)
      if names is None:
        layout.missing_dirs.append((str(folder), len(texts)))
      used = set()
      for i, prompt in enumerate(texts):
        stem = f"{i:05d}"
        found = _slot(names, stem, HPSV2_EXTENSIONS) if names is not None else None
        entry = Entry(gen, style, i, prompt, str(folder / (found or stem + HPSV2_EXTENSIONS[0])))
        layout.entries.append(entry)
        if found is None:
          layout.missing.append(entry)
        else:
          used.add(found)
      layout.extra.extend(str(folder / n) for n in sorted((names or set()) - used))
  return layout


def read_imagereward_prompts(path) -> list[tuple[str, str]]:
  """ImageReward's prompt file (a folder holding `benchmark-prompts.json`, or the file): a JSON list of
  {"id": str, "prompt": str} with unique ids -> [(id, prompt)]."""
  p = Path(path)
  if p.is_dir():
    p = p / IMAGEREWARD_PROMPTS_FILE
  if not p.exists():
    raise FileNotFoundError(2, "No such file or directory", str(p))
  data = _load_json(p)
  if not isinstance(data, list) or not data:
    raise InputError(f'{p}: expected a non-empty JSON list of {{"id", "prompt"}} objects')
  out, seen = [], set()
  for i, row in enumerate(data):
    ok = isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("prompt"), str)
    if not ok:
      raise InputError(f'{p}: entry {i} is not an object with string fields "id" and "prompt"')
    pid = row["id"]
    if not pid or text_problem(pid) or text_problem(row["prompt"]) or "/" in pid or "\\" in pid or pid in (".", ".."):
      raise InputError(f"{p}: entry {i} has id {pid!r}, which cannot name an image file")
    if pid in seen:
      raise InputError(f"{p}: id {pid!r} appears twice")
    seen.add(pid)
    out.append((pid, row["prompt"]))
  return out


def imagereward_layout(prompts, generators: dict[str, str], per_prompt: int = IMAGEREWARD_PER_PROMPT) -> Layout:
  """Expected ``G/<id>_<k>.png`` (k = 0..per_prompt-1; .jpg / .jpeg / .webp of the same stem accepted) for every
  generator G and prompt id; other files in G are listed in `extra`."""
  if per_prompt < 1:
    raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
  rows = read_imagereward_prompts(prompts)
  _check_generators(generators)
  layout = Layout("imagereward", dict(generators), [pid for pid, _ in rows], [])
  for gen, d in generators.items():
    root = Path(d)
    names = _listing(root) or set()
    used = set()
    for pid, prompt in rows:
      for k in range(per_prompt):
        stem = f"{pid}_{k}"
        try:
          confine(stem + IMAGEREWARD_EXTENSIONS[0], root, what="image name")
        except OutsidePathError as e:
          raise InputError(f"{prompts}: prompt id {pid!r}: {e}") from e
        found = _slot(names, stem, IMAGEREWARD_EXTENSIONS)
        entry = Entry(gen, pid, k, prompt, str(root / (found or stem + IMAGEREWARD_EXTENSIONS[0])))
        layout.entries.append(entry)
        if found is None:
          layout.missing.append(entry)
        else:
          used.add(found)
    layout.extra.extend(str(root / n) + ("/" if (root / n).is_dir() else "") for n in sorted(names - used))
  return layout


def jsonl_layout(
  rows_file: str | None = None, generators: dict[str, str] | None = None, *, allow_outside: bool = False
) -> Layout:
  """The `mean` protocol's images: `rows_file`, a JSONL of {"image", "prompt", "generator"} rows, and/or one
  JSONL of {"image", "prompt"} rows per generator (`generators`: name -> file; an `hps-jax sample` output folder
  stands for its samples.jsonl, whose rows name their image "file"). Relative image paths are resolved
  against their file's folder and confined to it (unless `allow_outside`); a malformed row is an InputError naming
  its file and line (a benchmark's definition must be whole); a path that does not exist is a missing image."""
  sources = [(rows_file, None)] if rows_file else []
  sources += [(f, name) for name, f in (generators or {}).items()]
  if not sources:
    raise InputError("the mean protocol needs a JSONL of image rows (--prompts FILE.jsonl or --generator NAME=FILE)")
  layout = Layout("mean", {}, ["all"], [])
  counts: dict[str, int] = {}

  def bad_line(where, why):
    raise InputError(f"{where}: {why}")

  for path, fixed in sources:
    p = Path(path)
    if p.is_dir() and (p / "samples.jsonl").is_file():  # an `hps-jax sample` output folder
      p = p / "samples.jsonl"
    if not p.exists():
      raise FileNotFoundError(2, "No such file or directory", str(p))
    before = len(layout.entries)
    for where, row in jsonl_objects(p, bad_line):
      if isinstance(row, dict) and "image" not in row and isinstance(row.get("file"), str):
        row = {**row, "image": row["file"]}  # `hps-jax sample`'s samples.jsonl names its images "file"
      keys = ("image", "prompt") + (("generator",) if fixed is None else ())
      if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in keys):
        bad_line(where, f"expected an object with string fields {', '.join(repr(k) for k in keys)}")
      gen = fixed if fixed is not None else row["generator"]
      if not gen.strip() or text_problem(gen) or text_problem(row["prompt"]):
        bad_line(where, "the generator name or the prompt is not usable text")
      try:
        image = confine(row["image"], p.parent, allow_outside=allow_outside)
      except OutsidePathError as e:
        bad_line(where, str(e))
      layout.generators.setdefault(gen, str(p))
      entry = Entry(gen, "all", counts.get(gen, 0), row["prompt"], image)
      counts[gen] = entry.index + 1
      layout.entries.append(entry)
      if not Path(image).is_file():
        layout.missing.append(entry)
    if len(layout.entries) == before:
      raise InputError(f"{p}: no rows (expected one JSON object per line)")
  return layout


# ------------------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------------------
def _finite_or_none(x) -> float | None:
  return float(x) if x is not None and math.isfinite(float(x)) else None


def chunk_bounds(n: int, chunks: int | None = None, chunk_size: int | None = None, *, allow_uneven: bool = False):
  """[(lo, hi)] of consecutive chunks covering n items: `chunks` of them, or chunks of `chunk_size` (one of the two;
  default HPSv2's 10). Unless `allow_uneven`, n must split evenly (ValueError otherwise); uneven chunks have sizes
  (i+1)n//c - in//c (by count) or a shorter last chunk (by size)."""
  if chunks is not None and chunk_size is not None:
    raise ValueError("give chunks or chunk_size, not both")
  if chunk_size is not None:
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if n % chunk_size and not allow_uneven:
      raise ValueError(f"{n} items do not split into chunks of {chunk_size}")
    return [(lo, min(n, lo + chunk_size)) for lo in range(0, n, chunk_size)]
  c = HPSV2_CHUNKS if chunks is None else chunks
  if c < 1 or c > n:
    raise ValueError(f"need 1 <= chunks <= {n} items, got {c} chunks")
  if n % c and not allow_uneven:
    raise ValueError(f"{n} items do not split into {c} equal chunks")
  return [(i * n // c, (i + 1) * n // c) for i in range(c)]


def hpsv2_aggregate(
  scores_by_style: dict[str, Sequence[float]],
  chunks: int | None = None,
  *,
  chunk_size: int | None = None,
  allow_uneven: bool = False,
) -> dict:
  """HPSv2's aggregation. `scores_by_style`: per style, one score per prompt in the style file's order (NaN for a
  missing image). Per style: chunk means of the consecutive chunks (`chunk_bounds`: 10 equal chunks by default,
  a style whose prompt count does not split evenly is refused unless `allow_uneven`), the style's mean (of the
  chunk means) and std (np.std of the chunk means, ddof=0); a chunk's mean is over its present images, a chunk
  with none is left out. `average`: the mean over every present image of every style."""
  styles, every = {}, []
  for style, values in scores_by_style.items():
    v = np.asarray(values, np.float64).reshape(-1)
    try:
      bounds = chunk_bounds(len(v), chunks, chunk_size, allow_uneven=allow_uneven)
    except ValueError as e:
      raise ValueError(
        f"style {style!r}: {e} (HPSv2: 800 prompts in 10 chunks of 80; allow uneven chunks to go on)"
      ) from e
    present = np.isfinite(v)
    means = [float(v[lo:hi][present[lo:hi]].mean()) if present[lo:hi].any() else None for lo, hi in bounds]
    kept = [m for m in means if m is not None]
    every.append(v[present])
    styles[style] = {
      "mean": float(np.mean(kept)) if kept else None,
      "std": float(np.std(kept)) if kept else None,
      "chunk_means": means,
      "chunks": len(bounds),
      "chunk_size": bounds[0][1] - bounds[0][0] if bounds else 0,
      "n": int(present.sum()),
      "missing": int((~present).sum()),
    }
  allv = np.concatenate(every) if every else np.zeros(0)
  missing = sum(s["missing"] for s in styles.values())
  average = float(allv.mean()) if allv.size else None
  return {
    "score": average,
    "styles": styles,
    "average": {"mean": average, "n": int(allv.size)},
    "missing": missing,
    "complete": missing == 0,
  }


def imagereward_aggregate(scores_by_prompt: dict[str, Sequence[float]]) -> dict:
  """ImageReward's aggregation: the mean over prompts of each prompt's mean score (NaN = a missing image, left out
  of its prompt's mean; a prompt with no image is left out). Also the std of the prompt means (ddof=0)."""
  prompt_means, n, missing = {}, 0, 0
  for pid, values in scores_by_prompt.items():
    v = np.asarray(values, np.float64).reshape(-1)
    present = np.isfinite(v)
    n += int(present.sum())
    missing += int((~present).sum())
    prompt_means[pid] = float(v[present].mean()) if present.any() else None
  kept = [m for m in prompt_means.values() if m is not None]
  mean = float(np.mean(kept)) if kept else None
  return {
    "score": mean,
    "mean": mean,
    "std_over_prompts": float(np.std(kept)) if kept else None,
    "n_prompts": len(kept),
    "n": n,
    "missing": missing,
    "complete": missing == 0,
    "prompt_means": prompt_means,
  }


def bootstrap_ci(values, *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean: `resamples` resamplings with replacement from a
  `np.random.default_rng(seed)` stream (drawn in blocks, so memory stays bounded for large sets)."""
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0:
    raise ValueError("no values to bootstrap")
  rng = np.random.default_rng(seed)
  block = max(1, min(resamples, 4_000_000 // v.size))
  means = []
  for start in range(0, resamples, block):
    k = min(block, resamples - start)
    means.append(v[rng.integers(0, v.size, (k, v.size))].mean(axis=1))
  means = np.concatenate(means)
  alpha = (1.0 - confidence) / 2
  lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
  return float(lo), float(hi)


def mean_aggregate(values, *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
  """Mean and std (ddof=0) over images (NaN = missing, left out) with a seeded percentile bootstrap CI."""
  v = np.asarray(values, np.float64).reshape(-1)
  present = v[np.isfinite(v)]
  missing = int(v.size - present.size)
  out = {"score": None, "mean": None, "std": None, "ci_low": None, "ci_high": None, "n": int(present.size)}
  if present.size:
    lo, hi = bootstrap_ci(present, resamples=resamples, seed=seed, confidence=confidence)
    out.update(score=float(present.mean()), mean=float(present.mean()), std=float(present.std()), ci_low=lo, ci_high=hi)
  out.update(missing=missing, complete=missing == 0, confidence=confidence)
  return out


def aggregate(layout: Layout, scores: dict[Entry, dict[str, float]], scorer_names: Sequence[str], **kw) -> dict:
  """{generator: {scorer: aggregate}} of the layout's protocol; `scores`: the values of each scored entry (an entry
  without values, missing or unreadable, counts as missing). `kw`: the protocol aggregation's options (hpsv2:
  chunks / chunk_size / allow_uneven; mean: resamples / seed / confidence)."""
  out = {}
  for gen in layout.generators:
    entries = [e for e in layout.entries if e.generator == gen]
    out[gen] = {}
    for name in scorer_names:
      by_group: dict[str, list[float]] = {}
      for e in entries:
        v = scores.get(e, {}).get(name)
        by_group.setdefault(e.group, []).append(math.nan if v is None else v)
      if layout.protocol == "hpsv2":
        out[gen][name] = hpsv2_aggregate(by_group, **kw)
      elif layout.protocol == "imagereward":
        out[gen][name] = imagereward_aggregate(by_group)
      else:
        out[gen][name] = mean_aggregate(by_group.get("all", []), **kw)
  return out


# ------------------------------------------------------------------------------------------------------------
# leaderboard
# ------------------------------------------------------------------------------------------------------------
def _sort_key(score):
  return (score is None, -(score or 0.0))


def leaderboard(
  layout: Layout,
  aggregates: dict[str, dict[str, dict]],
  scorers: dict[str, dict],
  *,
  failed: dict[str, int] | None = None,
  settings: dict | None = None,
) -> dict:
  """The leaderboard: generators sorted by the first scorer's score (best first), each with its image counts,
  completeness and every scorer's aggregate (`failed`: per generator, the images present but not scored:
  unreadable, or given a non-finite score); `scorers`: name -> description (source, preprocessing, scale);
  `settings`: the run's options (protocol options, paths), recorded as given."""
  first = next(iter(scorers))
  failed = failed or {}
  rows = []
  for gen, by_scorer in aggregates.items():
    expected = sum(1 for e in layout.entries if e.generator == gen)
    missing = sum(1 for e in layout.missing if e.generator == gen)
    bad = failed.get(gen, 0)
    rows.append(
      {
        "name": gen,
        "source": layout.generators.get(gen),
        "complete": missing == 0 and bad == 0,
        "images": {"expected": expected, "scored": expected - missing - bad, "missing": missing, "failed": bad},
        "scores": by_scorer,
      }
    )
  rows.sort(key=lambda r: _sort_key(r["scores"][first]["score"]))
  for rank, row in enumerate(rows, 1):
    row["rank"] = rank
  return {
    "protocol": layout.protocol,
    "groups": layout.groups if layout.protocol == "hpsv2" else None,
    "ranked_by": first,
    "scorers": scorers,
    "settings": settings or {},
    "generators": rows,
    "extra_files": list(layout.extra),
  }


def _fmt(x, digits: int = 2) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  align = ["---:" if i == 0 or i > 1 else ":---" for i in range(len(header))]
  return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _gen_cell(row) -> str:
  if row["complete"]:
    return row["name"]
  im = row["images"]
  return f"{row['name']} (incomplete: {im['missing']} missing, {im['failed']} failed)"


def markdown(board: dict) -> str:
  """The leaderboard as markdown: what was measured (protocol, each scorer's preprocessing and scale), then the
  table(s): HPSv2, one per scorer (mean ± std of each style, Average); ImageReward and mean, one with a column per
  scorer."""
  lines = [f"## Leaderboard ({board['protocol']})", ""]
  if board["settings"].get("description"):
    lines += [f"Protocol: {board['settings']['description']}.", ""]
  for name, info in board["scorers"].items():
    lines.append(
      f"- `{name}`: {info.get('source')}; preprocessing: {info.get('preprocess')}; scale: {info.get('scale')}"
    )
  lines.append("")
  gens = board["generators"]
  if board["protocol"] == "hpsv2":
    for name in board["scorers"]:
      header = ["Rank", "Generator"] + [g for g in board["groups"]] + ["Average"]
      rows = []
      for row in gens:
        agg = row["scores"][name]
        cells = [f"{_fmt(agg['styles'][g]['mean'])} ± {_fmt(agg['styles'][g]['std'], 4)}" for g in board["groups"]]
        rows.append([str(row["rank"]), _gen_cell(row)] + cells + [_fmt(agg["average"]["mean"])])
      lines += [f"### {name}", ""] + _table(header, rows) + [""]
  elif board["protocol"] == "imagereward":
    header = ["Rank", "Generator"] + list(board["scorers"]) + ["Images"]
    rows = [
      [str(r["rank"]), _gen_cell(r)]
      + [_fmt(r["scores"][n]["mean"], 4) for n in board["scorers"]]
      + [str(r["images"]["scored"])]
      for r in gens
    ]
    lines += _table(header, rows) + [""]
  else:
    conf = next(iter(gens[0]["scores"].values()))["confidence"] if gens else 0.95
    header = ["Rank", "Generator"] + [f"{n} (± std) [{conf:.0%} CI]" for n in board["scorers"]] + ["Images"]
    rows = []
    for r in gens:
      cells = []
      for n in board["scorers"]:
        a = r["scores"][n]
        cells.append(f"{_fmt(a['mean'])} (± {_fmt(a['std'])}) [{_fmt(a['ci_low'])}, {_fmt(a['ci_high'])}]")
      rows.append([str(r["rank"]), _gen_cell(r)] + cells + [str(r["images"]["scored"])])
    lines += _table(header, rows) + [""]
  return "\n".join(lines)


def plot(board: dict, path) -> None:
  """A bar chart PNG (written atomically), one panel per scorer: HPSv2, a group of bars per generator (one per style,
  with the std over chunks as error bar, and the Average); ImageReward, one bar per generator (error bar: std of
  the prompt means); mean, one bar per generator (error bar: the bootstrap CI)."""
  plt = pyplot()
  gens = board["generators"]
  names = list(board["scorers"])
  fig, axes = plt.subplots(len(names), 1, figsize=(max(6.0, 1.6 * len(gens) + 2), 3.6 * len(names)), squeeze=False)
  x = np.arange(len(gens))
  for ax, name in zip(axes[:, 0], names):
    aggs = [r["scores"][name] for r in gens]
    if board["protocol"] == "hpsv2":
      series = [
        (g, [a["styles"][g]["mean"] for a in aggs], [a["styles"][g]["std"] for a in aggs]) for g in board["groups"]
      ]
      series.append(("Average", [a["average"]["mean"] for a in aggs], None))
      width = 0.8 / len(series)
      for k, (label, means, stds) in enumerate(series):
        m = np.array([np.nan if v is None else v for v in means])
        err = None if stds is None else np.array([0.0 if v is None else v for v in stds])
        ax.bar(x - 0.4 + width * (k + 0.5), m, width, yerr=err, capsize=2, label=label)
      ax.legend(fontsize=7, ncol=min(len(series), 5))
    else:
      m = np.array([np.nan if a["mean"] is None else a["mean"] for a in aggs])
      if board["protocol"] == "imagereward":
        err = np.array([a["std_over_prompts"] or 0.0 for a in aggs])
      else:
        lo = np.array([a["ci_low"] if a["ci_low"] is not None else np.nan for a in aggs])
        hi = np.array([a["ci_high"] if a["ci_high"] is not None else np.nan for a in aggs])
        err = np.nan_to_num(np.stack([m - lo, hi - m]))
      ax.bar(x, m, 0.6, yerr=err, capsize=3)
    finite = [v for a in aggs for v in _chart_values(a, board["protocol"]) if v is not None]
    if finite:  # bars start near the data, not at 0 (HPS values of one benchmark differ by little)
      lo_v, hi_v = min(finite), max(finite)
      pad = 0.15 * (hi_v - lo_v) or 0.5
      ax.set_ylim(lo_v - pad, hi_v + (3 if board["protocol"] == "hpsv2" else 1) * pad)  # room for the legend
    ax.set_xticks(x, [r["name"] + ("" if r["complete"] else " *") for r in gens], fontsize=8)
    ax.set_title(f"{name} ({board['scorers'][name].get('unit', '')})", fontsize=9)
  fig.suptitle(f"{board['protocol']} leaderboard" + (" (* incomplete)" if any(not r["complete"] for r in gens) else ""))
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  with files.atomic_write(path, "wb") as f:
    f.write(buf.getvalue())


def _chart_values(agg: dict, protocol: str) -> list:
  if protocol == "hpsv2":
    out = [agg["average"]["mean"]]
    for s in agg["styles"].values():
      if s["mean"] is not None:
        out += [s["mean"] - (s["std"] or 0), s["mean"] + (s["std"] or 0)]
    return out
  if protocol == "imagereward":
    m, s = agg["mean"], agg["std_over_prompts"] or 0
    return [] if m is None else [m - s, m + s]
  return [agg["ci_low"], agg["ci_high"], agg["mean"]]
