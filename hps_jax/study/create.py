"""Study files of a human A/B preference study (the paper's user study, Fig. 8 / Table 3): what `hps-jax study
create` writes and what the study server and the report read.

A study file is one JSON object (written atomically), `"format": "hps-jax-study/1"`::

  {
    "format": "hps-jax-study/1",
    "created": "2024-05-01T12:00:00+00:00",        # UTC, seconds
    "hps_jax_version": "0.1.0",
    "systems": ["adapted", "base"],                 # sorted by name; the canonical side order of a pair
    "sources": {"adapted": {"kind": "ab", "path": "/abs/OUTDIR/adapted"}, "base": {...}},
    "settings": {
      "title": "...", "instructions": "...", "consent": null,   # consent: the text of --consent FILE
      "allow_tie": false,                           # false: forced choice; true: "can't decide" is an answer
      "pairs_per_participant": 24,                  # test pairs each participant answers (drawn at serve time)
      "checks": 2,                                  # check pairs, shown to every participant besides
      "pairs_per_prompt": 0,                        # 0: every pair that can be formed
      "seed": 0
    },
    "counts": {"test_pairs": 24, "checks": 2, "left_out_by_pairs_per_prompt": 0},
    "images": [
      {"id": "base/0000_0.png", "path": "base/0000_0.png", "sha256": "<64 hex>", "width": 512, "height": 512,
       "system": "base", "prompt": "a cat", "seed": 0},
      {"id": "broken-001", "path": "checks/broken-001.png", ..., "system": null, "broken_from": "base/0000_0.png"}
    ],
    "pairs": [
      {"id": "t0001", "kind": "test", "prompt": "a cat", "images": ["adapted/0000_0.png", "base/0000_0.png"]},
      {"id": "c001", "kind": "check", "check": "identical", "prompt": "a cat",
       "images": ["base/0000_0.png", "base/0000_0.png"], "expected": "tie"},
      {"id": "c002", "kind": "check", "check": "broken", "prompt": "a cat",
       "images": ["base/0000_0.png", "broken-001"], "expected": "base", "expected_image": "base/0000_0.png"}
    ]
  }

Rules the file keeps (and `load_study` checks):

* **Images** have a stable id (`SYSTEM/RELATIVE_PATH` for a system's image: the path below the system's folder or
  manifest folder; `broken-NNN` for a generated check image), a path relative to the study file's folder when the
  image lies inside it (else absolute), the sha256 of the file computed at creation, the size as displayed (EXIF
  orientation applied), the system (null for a check image), the prompt and the seed (null when unknown). Every
  image was fully decoded once before it was listed.
* **Pairs** list their two image ids in canonical order: the first image's system sorts before the second's. The
  left / right sides are NOT in the file: the server randomizes them per participant and per pair (and draws
  `pairs_per_participant` of the test pairs, in random order).
* **Checks** (attention checks) are pairs of `kind: "check"` with the right answer in `expected`: an identical-image
  check shows one image twice and expects `"tie"` (so it needs `allow_tie`); a broken-image check shows an image
  next to a heavily blurred and noised copy of itself (written under `checks/` next to the study file, with its
  sha256) and expects the intact image's system (`expected_image`: its id). A system cannot be named `tie`.

How images are aligned into pairs (`build_study`):

* `ab_sources` (`hps-jax sample --ab` output: OUTDIR/base/ and OUTDIR/adapted/, each with samples.jsonl): by
  prompt and seed, one image per (prompt, seed) and system. A best-of-N row (`candidates`) is aligned by its
  slot's seed (`candidates[0].seed // N`, the same on both sides), and lists the kept candidate's seed.
* `system_source` of a plain image folder: by file name (the path below the folder, without its extension).
* `system_source` of a folder with samples.jsonl (`hps-jax sample`) or metadata.jsonl (`file_name` + `prompt` /
  `text` / `caption`, the Hugging Face imagefolder layout), or of a JSONL manifest of {"image", "prompt"[, "seed"]}
  rows: by prompt. Within a prompt two systems' images are matched by equal seed first, the rest at random
  (seeded by `seed`, the prompt and the two system names), each image in at most one pair per pair of systems.
* With 3+ systems every pair of systems that has the prompt gets its pairs; `pairs_per_prompt` N > 0 keeps N pairs
  per prompt, drawn round-robin over the pairs of systems in a seeded order (so all pairs of systems get turns).

Nothing is dropped silently: a bad manifest row, a missing or undecodable image, a prompt (or file, or prompt and
seed) missing from some system, and an image left without a partner are each named in `skips`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import os
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from hps_jax import __version__, files
from hps_jax.data.images import IMAGE_EXTENSIONS, ImageError, image_files, load_image
from hps_jax.data.pairs import jsonl_objects
from hps_jax.data.paths import OutsidePathError, confine, text_problem
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError, check_stop

FORMAT = "hps-jax-study/1"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
RESERVED_NAMES = ("tie", "broken")  # an answer; the system of a broken-image check in exported votes
SHA256 = re.compile(r"[0-9a-f]{64}")
CHECKS_DIR = "checks"
MAX_STUDY_BYTES = 256 * 1024 * 1024
MAX_TEXT_CHARS = 100_000  # title, instructions, consent

DEFAULT_TITLE = "Which image do you prefer?"
DEFAULT_INSTRUCTIONS = (
  "Each question shows a prompt and two images generated from it. Choose the image you prefer: the one that matches "
  "the prompt better and looks better overall."
)

# the files a sample folder may carry: name -> (image field, prompt fields)
FOLDER_MANIFESTS = {
  "samples.jsonl": ("file", ("prompt",)),
  "metadata.jsonl": ("file_name", ("prompt", "text", "caption")),
}


def check_name(name: str, what: str = "system name") -> str:
  """A system name: letters, digits, `_ . + -` (not first), at most 64 characters, not a reserved answer."""
  if not isinstance(name, str) or not NAME.fullmatch(name):
    raise InputError(f"{what} {name!r}: expected letters, digits and _ . + - (at most 64 characters)")
  if name.lower() in RESERVED_NAMES:
    raise InputError(f"{what} {name!r} is reserved (it is an answer of the study)")
  return name


# ------------------------------------------------------------------------------------------------------------
# sources: the images of each system, with their alignment keys
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Entry:
  """One image of one system, as read from its source (not yet opened)."""

  system: str
  key: object  # what aligns it with the other systems' images: a file stem, a prompt, or (prompt, seed)
  path: str  # absolute, normalized
  rel: str  # the path below the source's folder (posix), or the absolute path: the image id is SYSTEM/REL
  prompt: str | None = None
  seed: int | None = None
  sha256: str = ""
  width: int = 0
  height: int = 0

  @property
  def id(self) -> str:
    return f"{self.system}/{self.rel}"


@dataclasses.dataclass
class Source:
  """One system's images. `mode` says how they align: "file" (by file name), "prompt", or "prompt_seed"."""

  name: str
  kind: str  # "ab", "folder", "samples" (a folder with samples.jsonl / metadata.jsonl) or "manifest"
  path: str
  mode: str
  entries: list[Entry]


def _rel(path: str, root: str) -> str:
  rel = os.path.relpath(path, root)
  return path.replace(os.sep, "/") if rel == os.pardir or rel.startswith(os.pardir + os.sep) else Path(rel).as_posix()


def _int_or_none(v) -> int | None:
  return v if isinstance(v, int) and not isinstance(v, bool) else None


def _read_rows(
  name: str,
  jsonl: Path,
  image_field: str,
  prompt_fields: tuple[str, ...],
  skips: Skips,
  *,
  allow_outside: bool,
  slot_seeds: bool = False,
) -> list[Entry]:
  """The rows of a JSONL manifest as entries keyed by prompt (or (prompt, slot seed) when `slot_seeds`); a bad row
  is named in `skips` and left out, a file with no usable row is an InputError."""
  root = os.path.abspath(jsonl.parent)
  entries: list[Entry] = []
  seen_paths: dict[str, str] = {}
  seen_keys: dict[object, str] = {}
  rows = 0

  def skip(where: str, why: str) -> None:
    skips.add(f"{name}: {where}", why)

  for where, row in jsonl_objects(jsonl, skip):
    rows += 1
    if not isinstance(row, dict):
      skip(where, f'expected an object with "{image_field}" and "{prompt_fields[0]}"')
      continue
    image = row.get(image_field)
    prompt_field = next((f for f in prompt_fields if f in row), prompt_fields[0])
    prompt = row.get(prompt_field)
    if not isinstance(image, str):
      skip(where, f'expected a string field "{image_field}"')
      continue
    if not isinstance(prompt, str) or not prompt.strip() or text_problem(prompt):
      skip(where, f'expected a non-empty string field "{prompt_field}" (the prompt)')
      continue
    seed = _int_or_none(row.get("seed"))
    if slot_seeds and seed is None:
      skip(where, 'expected an integer field "seed" (`hps-jax sample` writes one)')
      continue
    try:
      path = os.path.abspath(confine(image, root, allow_outside=allow_outside))
    except OutsidePathError as e:
      skip(where, str(e))
      continue
    if path in seen_paths:
      skip(where, f"{image} is listed twice (first at {seen_paths[path]})")
      continue
    key: object = prompt
    if slot_seeds:
      key = (prompt, _slot_seed(row, seed))
      if key in seen_keys:
        skip(where, f"a second image of prompt {prompt!r} seed {key[1]} (first at {seen_keys[key]})")
        continue
      seen_keys[key] = where
    seen_paths[path] = where
    entries.append(Entry(name, key, path, _rel(path, root), prompt, seed))
  if not entries:
    raise InputError(f"{jsonl}: no usable row" + (f", all {rows} skipped" if rows else " (the file is empty)"))
  return entries


def _slot_seed(row: dict, seed: int) -> int:
  """The seed of the row's slot: its own seed, or for a best-of-N row (`candidates`) the slot seed its candidates
  were derived from (candidate c of slot s has seed s * N + c, `hps_jax.diffusion.render.best_of_jobs`)."""
  cands = row.get("candidates")
  if isinstance(cands, list) and cands and isinstance(cands[0], dict):
    first = _int_or_none(cands[0].get("seed"))
    if first is not None:
      return first // len(cands)
  return seed


def ab_sources(
  outdir, names: tuple[str, str] = ("base", "adapted"), *, skips: Skips, allow_outside: bool = False
) -> list[Source]:
  """The two systems of `hps-jax sample --ab` output: OUTDIR/base and OUTDIR/adapted (named `names`), each with
  the samples.jsonl rows written there, aligned by prompt and seed."""
  out = Path(outdir)
  if not out.is_dir():
    raise InputError(f"--ab {outdir}: not a folder (expected the --outdir of `hps-jax sample --ab`)")
  sources = []
  for sub, name in zip(("base", "adapted"), names):
    check_name(name)
    jsonl = out / sub / "samples.jsonl"
    if not jsonl.is_file():
      raise InputError(f"{jsonl}: not found (expected the output of `hps-jax sample --ab`: base/ and adapted/)")
    entries = _read_rows(name, jsonl, "file", ("prompt",), skips, allow_outside=allow_outside, slot_seeds=True)
    sources.append(Source(name, "ab", os.path.abspath(out / sub), "prompt_seed", entries))
  return sources


def system_source(name: str, path, *, skips: Skips, allow_outside: bool = False, exclude: str | None = None) -> Source:
  """One system's images from PATH: a JSONL manifest of {"image", "prompt"} rows, a folder with samples.jsonl or
  metadata.jsonl (aligned by prompt), or a plain image folder (aligned by file name; files below `exclude`, the
  study's own checks folder, are left out)."""
  check_name(name)
  p = Path(path)
  if p.is_file():
    entries = _read_rows(name, p, "image", ("prompt",), skips, allow_outside=allow_outside)
    return Source(name, "manifest", os.path.abspath(p), "prompt", entries)
  if not p.is_dir():
    raise InputError(f"--system {name}={path}: no such file or folder (expected an image folder or a JSONL manifest)")
  for manifest, (image_field, prompt_fields) in FOLDER_MANIFESTS.items():
    if (p / manifest).is_file():
      entries = _read_rows(name, p / manifest, image_field, prompt_fields, skips, allow_outside=allow_outside)
      return Source(name, "samples", os.path.abspath(p), "prompt", entries)
  root = os.path.abspath(p)
  skip_below = os.path.abspath(exclude) + os.sep if exclude else None
  entries, seen = [], {}
  for f in image_files(p):
    path = os.path.abspath(f)
    if skip_below and path.startswith(skip_below):
      continue
    if text_problem(path):  # a file name that is not valid UTF-8: it could not be written to the study file
      shown = os.fsencode(path).decode("utf-8", "backslashreplace")
      skips.add(f"{name}: {shown}", "the file name is not valid Unicode (rename the file)")
      continue
    rel = _rel(path, root)
    key = rel[: -len(f.suffix)] if f.suffix else rel
    if key in seen:
      skips.add(f"{name}: {path}", f"same file name as {seen[key]} (files are matched by name without extension)")
      continue
    seen[key] = path
    entries.append(Entry(name, key, path, rel))
  if not entries:
    raise InputError(f"--system {name}={path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
  return Source(name, "folder", root, "file", entries)


# ------------------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------------------
def sha256_file(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def inspect_image(path) -> tuple[str, int, int]:
  """(sha256, width, height) of an image file that decodes completely and passes PIL's verify; ImageError /
  OSError otherwise. The size is the displayed one (EXIF orientation applied)."""
  digest = sha256_file(path)
  pixels = load_image(path)  # full decode: truncation, bombs and non-images are ImageErrors naming the file
  try:
    with Image.open(path) as im:
      im.verify()
  except Exception as e:  # noqa: BLE001  (PIL's verify raises many kinds: OSError, SyntaxError, struct.error, ...)
    raise ImageError(str(path), f"fails PIL's verify ({type(e).__name__}: {e})") from e
  return digest, int(pixels.shape[1]), int(pixels.shape[0])


def _inspect_all(sources: list[Source], skips: Skips, on_image: Callable[[int], None] | None) -> None:
  for src in sources:
    kept = []
    for e in src.entries:
      check_stop()
      try:
        e.sha256, e.width, e.height = inspect_image(e.path)
        kept.append(e)
      except ImageError as err:
        skips.add(f"{src.name}: {e.path}", err.message)
      except OSError as err:
        skips.add(f"{src.name}: {e.path}", f"cannot read it ({err.strerror or err})")
      if on_image is not None:
        on_image(1)
    src.entries = kept


# ------------------------------------------------------------------------------------------------------------
# pairing
# ------------------------------------------------------------------------------------------------------------
def describe_key(key, mode: str) -> str:
  if mode == "file":
    return f"file {key}"
  if mode == "prompt_seed":
    return f"prompt {key[0]!r} seed {key[1]}"
  return f"prompt {key!r}"


def _match(a: list[Entry], b: list[Entry], rng: random.Random) -> list[tuple[Entry, Entry]]:
  """Pairs of one prompt's images of two systems: equal seeds first (a seed met once on each side), the rest at
  random; each image in at most one pair."""
  seeds_a = collections.Counter(e.seed for e in a if e.seed is not None)
  seeds_b = collections.Counter(e.seed for e in b if e.seed is not None)
  b_by_seed = {e.seed: e for e in b if e.seed is not None and seeds_b[e.seed] == 1}
  pairs, used = [], set()
  for e in a:
    if e.seed is not None and seeds_a[e.seed] == 1 and e.seed in b_by_seed:
      pairs.append((e, b_by_seed[e.seed]))
      used.update((id(e), id(b_by_seed[e.seed])))
  rest_a = [e for e in a if id(e) not in used]
  rest_b = [e for e in b if id(e) not in used]
  rng.shuffle(rest_a)
  rng.shuffle(rest_b)
  return pairs + list(zip(rest_a, rest_b))


def _pair_all(
  sources: list[Source], pairs_per_prompt: int, seed: int, skips: Skips
) -> tuple[list[tuple[object, Entry, Entry]], int]:
  """(key, first, second) test pairs over every aligned key, in a canonical order; and how many pairs that could
  have been formed were left out by `pairs_per_prompt`."""
  mode = sources[0].mode
  systems = sorted(s.name for s in sources)
  by_key: dict[object, dict[str, list[Entry]]] = {}
  for src in sources:
    for e in src.entries:
      by_key.setdefault(e.key, {}).setdefault(src.name, []).append(e)
  out, capped = [], 0
  for key in sorted(by_key):
    group = by_key[key]
    present = [s for s in systems if s in group]
    missing = [s for s in systems if s not in group]
    what = describe_key(key, mode)
    if missing:
      why = f"only in {', '.join(present)}; missing from {', '.join(missing)}"
      skips.add(what, why + ("" if len(present) > 1 else " (nothing to pair it with)"))
    per_systems = []
    for sa, sb in itertools.combinations(present, 2):
      a = sorted(group[sa], key=lambda e: e.rel)
      b = sorted(group[sb], key=lambda e: e.rel)
      rng = random.Random(f"{seed}\x00{sa}\x00{sb}\x00{what}")
      per_systems.append(_match(a, b, rng))
    paired = {id(e) for candidates in per_systems for pair in candidates for e in pair}
    for s in present:
      if len(present) < 2:
        break
      for e in group[s]:
        if id(e) not in paired:
          counts = ", ".join(f"{len(group[t])} in {t}" for t in present)
          skips.add(f"{s}: {e.path}", f"no partner: {what} has {counts}")
    total = sum(len(c) for c in per_systems)
    if pairs_per_prompt and total > pairs_per_prompt:
      capped += total - pairs_per_prompt
      order = list(range(len(per_systems)))
      random.Random(f"{seed}\x00draw\x00{what}").shuffle(order)
      drawn: list[list[tuple[Entry, Entry]]] = [[] for _ in per_systems]
      n = 0
      for turn in itertools.count():
        for i in order:
          if turn < len(per_systems[i]) and n < pairs_per_prompt:
            drawn[i].append(per_systems[i][turn])
            n += 1
        if n >= pairs_per_prompt:
          break
      per_systems = drawn
    out.extend((key, ea, eb) for candidates in per_systems for ea, eb in candidates)
  return out, capped


# ------------------------------------------------------------------------------------------------------------
# attention checks
# ------------------------------------------------------------------------------------------------------------
def check_kinds(checks: int, *, allow_tie: bool, broken: bool) -> list[str]:
  """The kind of each of `checks` attention checks: identical-image checks need `allow_tie` (a forced choice has no
  right answer for them), so a forced-choice study gets broken-image checks only (`broken` must be set); with ties
  allowed and `broken`, identical and broken checks alternate."""
  if checks and not allow_tie and not broken:
    raise InputError(
      "an identical-image check expects 'tie', which a forced choice does not offer: add --allow-tie or --broken-checks"
    )
  if broken and not allow_tie:
    return ["broken"] * checks
  return [("broken" if broken and i % 2 else "identical") for i in range(checks)]


def broken_copy(path, seed: int) -> bytes:
  """A PNG of the image at `path` heavily blurred (radius 1/12 of its shorter side) and noised (Gaussian, sigma 64
  of 255): obviously worse than the original whatever its content; deterministic for a seed."""
  pixels = load_image(path)
  h, w = pixels.shape[:2]
  blurred = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=max(2.0, min(h, w) / 12)))
  noise = np.random.default_rng(seed).normal(0.0, 64.0, size=(h, w, 3))
  noisy = np.clip(np.asarray(blurred, np.float64) + noise, 0, 255).round().astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noisy).save(buf, format="PNG")
  return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
  """The settings of `hps-jax study create` (module docstring)."""

  pairs_per_participant: int = 0  # 0: every test pair
  pairs_per_prompt: int = 0  # 0: every pair that can be formed
  allow_tie: bool = False
  checks: int = 0
  broken_checks: bool = False
  seed: int = 0
  title: str = DEFAULT_TITLE
  instructions: str = DEFAULT_INSTRUCTIONS
  consent: str | None = None


def build_study(
  sources: list[Source],
  out,
  options: Options,
  skips: Skips,
  on_image: Callable[[int], None] | None = None,
) -> tuple[dict, dict[str, bytes]]:
  """The study file's content, and the check images to write ({path relative to the study folder: PNG bytes}).
  Every image is hashed and decoded first (`on_image(1)` after each); skipped inputs go to `skips`. Raises
  InputError when the sources cannot be combined or nothing can be paired."""
  names = [s.name for s in sources]
  if len(sources) < 2:
    raise InputError(f"a study compares two or more systems, got {len(sources)}")
  if len(set(names)) != len(names):
    raise InputError(f"system names must differ, got {', '.join(names)}")
  modes = {s.mode for s in sources}
  if len(modes) > 1:
    by_file = [s.name for s in sources if s.mode == "file"]
    by_prompt = [s.name for s in sources if s.mode != "file"]
    raise InputError(
      f"cannot align plain image folders ({', '.join(by_file)}: matched by file name) with prompted sources "
      f"({', '.join(by_prompt)}: matched by prompt): give every system the same kind of source"
    )
  kinds = check_kinds(options.checks, allow_tie=options.allow_tie, broken=options.broken_checks)
  for text, what in ((options.title, "the title"), (options.instructions, "the instructions")):
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS or text_problem(text):
      raise InputError(f"{what}: expected text of at most {MAX_TEXT_CHARS} characters")
  _inspect_all(sources, skips, on_image)
  pairs, capped = _pair_all(sources, options.pairs_per_prompt, options.seed, skips)
  if not pairs:
    first = f" (first: {skips.items[0][0]}: {skips.items[0][1]})" if skips.items else ""
    raise InputError(f"no pair can be formed from {', '.join(names)}: {len(skips.items)} inputs skipped{first}")
  n_test = len(pairs)
  per_participant = options.pairs_per_participant or n_test
  if per_participant > n_test:
    raise InputError(f"--pairs-per-participant {per_participant} exceeds the {n_test} test pairs of the study")

  root = os.path.abspath(Path(out).parent)
  systems = sorted(names)
  images: dict[str, dict] = {}

  def listed(e: Entry) -> str:
    if e.id not in images:
      images[e.id] = _image_entry(e.id, e.path, root, e.sha256, e.width, e.height, e.system, e.prompt, e.seed)
    return e.id

  records = []
  for i, (_, ea, eb) in enumerate(pairs, 1):
    records.append({"id": f"t{i:04d}", "kind": "test", "prompt": ea.prompt, "images": [listed(ea), listed(eb)]})

  check_files: dict[str, bytes] = {}
  pool = sorted({id(e): e for _, ea, eb in pairs for e in (ea, eb)}.values(), key=lambda e: e.id)
  random.Random(f"{options.seed}\x00checks").shuffle(pool)
  broken_n = 0
  for i, kind in enumerate(kinds, 1):
    e = pool[(i - 1) % len(pool)]
    record = {"id": f"c{i:03d}", "kind": "check", "check": kind, "prompt": e.prompt}
    if kind == "identical":
      record.update(images=[listed(e), listed(e)], expected="tie")
    else:
      broken_n += 1
      bid = f"broken-{broken_n:03d}"
      rel = f"{CHECKS_DIR}/{bid}.png"
      data = broken_copy(e.path, options.seed * 1000 + broken_n)
      check_files[rel] = data
      w, h = Image.open(io.BytesIO(data)).size
      sha = hashlib.sha256(data).hexdigest()
      images[bid] = _image_entry(bid, os.path.join(root, rel), root, sha, w, h, None, e.prompt, None)
      images[bid]["broken_from"] = listed(e)
      record.update(images=[listed(e), bid], expected=e.system, expected_image=e.id)
    records.append(record)

  study = {
    "format": FORMAT,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "hps_jax_version": __version__,
    "systems": systems,
    "sources": {s.name: {"kind": s.kind, "path": s.path} for s in sorted(sources, key=lambda s: s.name)},
    "settings": {
      "title": options.title,
      "instructions": options.instructions,
      "consent": options.consent,
      "allow_tie": bool(options.allow_tie),
      "pairs_per_participant": per_participant,
      "checks": len(kinds),
      "pairs_per_prompt": options.pairs_per_prompt,
      "seed": options.seed,
    },
    "counts": {"test_pairs": n_test, "checks": len(kinds), "left_out_by_pairs_per_prompt": capped},
    "images": [images[k] for k in sorted(images)],
    "pairs": records,
  }
  return study, check_files


def _image_entry(image_id, path, root, sha, width, height, system, prompt, seed) -> dict:
  rel = os.path.relpath(path, root)
  inside = not (rel == os.pardir or rel.startswith(os.pardir + os.sep))
  return {
    "id": image_id,
    "path": Path(rel).as_posix() if inside else path,
    "sha256": sha,
    "width": width,
    "height": height,
    "system": system,
    "prompt": prompt,
    "seed": seed,
  }


def write_study(out, study: dict, check_files: dict[str, bytes]) -> None:
  """The check images (atomically, under the study's folder), then the study file (atomically): a study file never
  names a check image that is not there."""
  root = Path(out).parent
  for rel, data in check_files.items():
    with files.atomic_write(root / rel, "wb") as f:
      f.write(data)
  files.write_text(out, json.dumps(study, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------------------
# reading a study back (the server, the report)
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Study:
  """A validated study file: `data` is the JSON object, `images` its images by id, `root` the file's folder."""

  path: Path
  data: dict
  images: dict[str, dict]

  @property
  def root(self) -> Path:
    return self.path.parent

  @property
  def systems(self) -> list[str]:
    return self.data["systems"]

  @property
  def settings(self) -> dict:
    return self.data["settings"]

  @property
  def pairs(self) -> list[dict]:
    return self.data["pairs"]

  @property
  def test_pairs(self) -> list[dict]:
    return [p for p in self.pairs if p["kind"] == "test"]

  @property
  def check_pairs(self) -> list[dict]:
    return [p for p in self.pairs if p["kind"] == "check"]


def _str_or_none(v) -> bool:
  return v is None or (isinstance(v, str) and text_problem(v) is None)


def load_study(path) -> Study:
  """The study file at `path`, every rule of the format checked (module docstring): the format tag, unique system,
  image and pair ids, every pair's images listed, sha256 / size / system fields, check answers, the settings, and
  image paths confined to the study's folder unless absolute. Any problem is an InputError naming the file and what
  is wrong."""
  p = Path(path)

  def bad(msg: str) -> InputError:
    return InputError(f"{p}: {msg}")

  try:
    size = p.stat().st_size
    if size > MAX_STUDY_BYTES:
      raise bad(f"{size} bytes, more than a study file may hold ({MAX_STUDY_BYTES})")
    data = json.loads(p.read_bytes().decode("utf-8"))
  except OSError as e:
    raise InputError(f"cannot read study file {p}: {e.strerror or e}") from e
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise bad(f"not a study file (not valid UTF-8 JSON: {e})") from e
  if not isinstance(data, dict):
    raise bad(f"not a study file (expected a JSON object with format {FORMAT!r})")
  fmt = data.get("format")
  if fmt != FORMAT:
    if isinstance(fmt, str) and fmt.startswith("hps-jax-study/"):
      raise bad(f"study format {fmt!r} is not supported by hps-jax {__version__} (it reads {FORMAT!r})")
    raise bad(f"not a study file (format is {fmt!r}, expected {FORMAT!r})")

  systems = data.get("systems")
  if not isinstance(systems, list) or len(systems) < 2:
    raise bad("systems: expected a list of two or more names")
  for s in systems:
    try:
      check_name(s)
    except InputError as e:
      raise bad(f"systems: {e}") from None
  if len(set(systems)) != len(systems):
    raise bad(f"systems: duplicate name in {systems}")

  raw_images = data.get("images")
  if not isinstance(raw_images, list) or not raw_images:
    raise bad("images: expected a non-empty list")
  images: dict[str, dict] = {}
  for i, img in enumerate(raw_images):
    where = f"images[{i}]"
    if not isinstance(img, dict):
      raise bad(f"{where}: expected an object")
    image_id = img.get("id")
    if not isinstance(image_id, str) or not image_id or text_problem(image_id):
      raise bad(f"{where}: id: expected a non-empty string")
    where = f"image {image_id!r}"
    if image_id in images:
      raise bad(f"duplicate image id {image_id!r}")
    try:
      confine(img.get("path"), p.parent, what=f"{where}: path")
    except OutsidePathError as e:
      raise bad(str(e)) from None
    if not isinstance(img.get("sha256"), str) or not SHA256.fullmatch(img["sha256"]):
      raise bad(f"{where}: sha256: expected 64 lowercase hex digits, got {img.get('sha256')!r}")
    for dim in ("width", "height"):
      v = img.get(dim)
      if _int_or_none(v) is None or v < 1:
        raise bad(f"{where}: {dim}: expected a positive integer, got {v!r}")
    system = img.get("system")
    if system is None:
      if "broken_from" not in img:
        raise bad(f"{where}: system: null is only for a check image (with broken_from)")
    elif system not in systems:
      raise bad(f"{where}: system {system!r} is not one of the systems {systems}")
    if not _str_or_none(img.get("prompt")):
      raise bad(f"{where}: prompt: expected a string or null")
    if img.get("seed") is not None and _int_or_none(img.get("seed")) is None:
      raise bad(f"{where}: seed: expected an integer or null")
    images[image_id] = img
  for image_id, img in images.items():
    if "broken_from" in img and (img["broken_from"] not in images or img.get("system") is not None):
      raise bad(f"image {image_id!r}: broken_from names no listed image (or the check image has a system)")

  settings = data.get("settings")
  if not isinstance(settings, dict):
    raise bad("settings: expected an object")
  if not isinstance(settings.get("allow_tie"), bool):
    raise bad("settings.allow_tie: expected true or false")
  for key in ("title", "instructions"):
    if not isinstance(settings.get(key), str) or len(settings[key]) > MAX_TEXT_CHARS:
      raise bad(f"settings.{key}: expected text of at most {MAX_TEXT_CHARS} characters")
  consent = settings.get("consent")
  if not _str_or_none(consent) or (consent is not None and len(consent) > MAX_TEXT_CHARS):
    raise bad(f"settings.consent: expected null or text of at most {MAX_TEXT_CHARS} characters")
  if _int_or_none(settings.get("seed")) is None:
    raise bad("settings.seed: expected an integer")

  pairs = data.get("pairs")
  if not isinstance(pairs, list) or not pairs:
    raise bad("pairs: expected a non-empty list")
  pair_ids: set[str] = set()
  n_test = 0
  for i, pair in enumerate(pairs):
    if not isinstance(pair, dict):
      raise bad(f"pairs[{i}]: expected an object")
    pid = pair.get("id")
    if not isinstance(pid, str) or not pid:
      raise bad(f"pairs[{i}]: id: expected a non-empty string")
    where = f"pair {pid!r}"
    if pid in pair_ids:
      raise bad(f"duplicate pair id {pid!r}")
    pair_ids.add(pid)
    ids = pair.get("images")
    if not isinstance(ids, list) or len(ids) != 2 or not all(isinstance(x, str) for x in ids):
      raise bad(f"{where}: images: expected two image ids")
    for x in ids:
      if x not in images:
        raise bad(f"{where}: image id {x!r} is not in images")
    if not _str_or_none(pair.get("prompt")):
      raise bad(f"{where}: prompt: expected a string or null")
    first, second = (images[x] for x in ids)
    kind = pair.get("kind")
    if kind == "test":
      n_test += 1
      sa, sb = first.get("system"), second.get("system")
      if sa is None or sb is None or systems.index(sa) >= systems.index(sb):
        raise bad(f"{where}: a test pair shows two systems' images in system order, got {sa!r} and {sb!r}")
    elif kind == "check":
      check = pair.get("check")
      if check == "identical":
        if ids[0] != ids[1] or pair.get("expected") != "tie":
          raise bad(f"{where}: an identical check shows one image twice and expects 'tie'")
        if not settings["allow_tie"]:
          raise bad(f"{where}: an identical check expects 'tie', which needs settings.allow_tie")
      elif check == "broken":
        if second.get("broken_from") != ids[0] or first.get("system") is None:
          raise bad(f"{where}: a broken check shows an image, then its broken copy")
        if pair.get("expected") != first["system"] or pair.get("expected_image", ids[0]) != ids[0]:
          raise bad(f"{where}: expected must be the intact image's system {first['system']!r}")
      else:
        raise bad(f"{where}: check: expected 'identical' or 'broken', got {check!r}")
    else:
      raise bad(f"{where}: kind: expected 'test' or 'check', got {kind!r}")
  per = settings.get("pairs_per_participant")
  if _int_or_none(per) is None or not 1 <= per <= n_test:
    raise bad(f"settings.pairs_per_participant: expected an integer in [1, {n_test}] (the test pairs), got {per!r}")
  return Study(p, data, images)


def image_path(study: Study, image_id: str) -> Path:
  """Where image `image_id` of the study is: its path, relative ones resolved against the study's folder (and kept
  inside it). An unknown id is an InputError."""
  img = study.images.get(image_id)
  if img is None:
    raise InputError(f"{study.path}: no image {image_id!r}")
  return Path(confine(img["path"], study.root, what=f"image {image_id!r}: path"))


def verify_images(study: Study) -> list[tuple[str, str]]:
  """(image id, problem) for every listed image whose file is missing, unreadable or no longer has the sha256 the
  study recorded; an empty list when all are intact."""
  problems = []
  for image_id in sorted(study.images):
    path = image_path(study, image_id)
    check_stop()
    try:
      digest = sha256_file(path)
    except OSError as e:
      problems.append((image_id, f"{path}: cannot read it ({e.strerror or e})"))
      continue
    if digest != study.images[image_id]["sha256"]:
      problems.append(
        (image_id, f"{path}: sha256 {digest} differs from the study's {study.images[image_id]['sha256']}")
      )
  return problems
