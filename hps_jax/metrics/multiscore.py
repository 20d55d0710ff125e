"""One decoding pass, many scorers: every image is decoded once on host threads, then each scorer's own
preprocessing (shared by scorers whose preprocessing is the same) and batched forward pass run on it.

    specs = [ScorerSpec("hps", "clip", "hps-v2.1"), ScorerSpec("aes", "aesthetic", "laion-aesthetic-linear",
             clip_checkpoint="clip-vit-l-14")]
    multi = MultiScorer(build_scorers(specs, batch_size=32))
    for source, prompt, extra, values, error in multi.iter_scores((path, prompt, None) for ...):
        ...   # values: {"hps": 27.3, "aes": 5.9}, or None with the ImageError of an unreadable image

Values are each scorer's natural scale: `clip` scorers give 100 * cosine (HPS / CLIP score), `aesthetic` scorers the
MLP's rating (about 1-10). `describe_scorer` states a scorer's preprocessing and scale in words, for reports.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from hps_jax.data.images import describe
from hps_jax.preference import scorer as scorer_mod
from hps_jax.preference.scorer import AestheticScorer, Scorer

KINDS = ("clip", "aesthetic")
PREPROCESS_WORDS = {
  "pad": "longest edge resized to {size}px (bicubic; {small}), centered on a black {size}x{size} square, CLIP mean/std",
  "clip": "short side resized to {size}px (bicubic), center crop {size}x{size}, CLIP mean/std",
}


@dataclasses.dataclass(frozen=True)
class ScorerSpec:
  """What to build: `kind` clip (HPS / CLIP score: 100 * cos of image and prompt embeddings; `checkpoint` a path or
  a registry name, as `Scorer.from_pretrained` takes) or aesthetic (`checkpoint` the LAION MLP head, on the CLIP
  image tower of `clip_checkpoint`). `preprocess`: pad or clip, None for the scorer's default (pad for clip
  scorers, the paper's; clip for aesthetic heads, as they were fit). `format`: the (CLIP) checkpoint's layout."""

  name: str
  kind: str
  checkpoint: str
  clip_checkpoint: str | None = None
  format: str = "auto"
  preprocess: str | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"scorer {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "aesthetic" and not self.clip_checkpoint:
      raise ValueError(f"aesthetic scorer {self.name!r} needs the CLIP checkpoint its MLP head reads (clip_checkpoint)")
    if self.preprocess is not None and self.preprocess not in PREPROCESS_WORDS:
      raise ValueError(f"scorer {self.name!r}: preprocess must be pad or clip, got {self.preprocess!r}")


def build_scorers(specs: Sequence[ScorerSpec], batch_size: int = 32, dtype=None) -> dict:
  """{name: Scorer | AestheticScorer} in the order of `specs` (names unique). Loading errors (WeightsError,
  CheckpointError, a head that does not fit its CLIP) are ValueErrors naming the file."""
  names = [s.name for s in specs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"scorer names must be unique: {', '.join(dup)} given twice")
  out = {}
  for spec in specs:
    kw = {"batch_size": batch_size, "dtype": dtype}
    if spec.preprocess is not None:
      kw["preprocess"] = spec.preprocess
    if spec.kind == "clip":
      if spec.format != "auto":  # else the registry's format (from_pretrained) or detection
        kw["format"] = spec.format
      out[spec.name] = Scorer.from_pretrained(spec.checkpoint, **kw)
    else:
      out[spec.name] = AestheticScorer.from_pretrained(
        spec.checkpoint, spec.clip_checkpoint, clip_format=spec.format, **kw
      )
  return out


def describe_scorer(scorer) -> dict:
  """kind, source (checkpoint paths), preprocessing and scale of a scorer, in words, for reports."""
  p = scorer.preprocess
  small = "smaller images upscaled" if p.upscale else "smaller images not resized"
  words = PREPROCESS_WORDS.get(p.mode, p.mode).format(size=p.size, small=small)
  if isinstance(scorer, AestheticScorer):
    kind, unit = "aesthetic", "aesthetic rating"
    scale = "aesthetic rating: the LAION MLP's output on the L2-normalized CLIP image embedding"
  else:
    kind, unit = "clip", "HPS x100"
    scale = "HPS x100: 100 * cosine(image embedding, prompt embedding)"
  return {
    "kind": kind,
    "source": getattr(scorer, "_source", "in-memory model"),
    "preprocess": f"{p.mode} {p.size}px: {words}",
    "scale": scale,
    "unit": unit,
    "batch_size": scorer.batch_size,
  }


class _Decoded:
  """The `preprocess` of the shared stream: one decoded image -> each distinct preprocessing of it."""

  def __init__(self, configs):
    self.configs = configs

  def apply(self, image):
    return [c.apply(image) for c in self.configs]


class MultiScorer:
  """Scores images with several scorers from one decoding pass (module docstring). `decodes` counts the images
  decoded so far (readable or not): one per image, whatever the number of scorers."""

  def __init__(self, scorers: dict, *, batch_size: int | None = None, workers: int | None = None):
    if not scorers:
      raise ValueError("MultiScorer needs at least one scorer")
    bad = [n for n, s in scorers.items() if not isinstance(s, (Scorer, AestheticScorer))]
    if bad:
      raise TypeError(f"scorers {bad} are neither Scorer nor AestheticScorer")
    self.scorers = dict(scorers)
    self.batch_size = batch_size or max(s.batch_size for s in self.scorers.values())
    self.workers = workers or max(s.workers for s in self.scorers.values())
    self.configs = list(dict.fromkeys(s.preprocess for s in self.scorers.values()))  # distinct, in order
    self._slot = {n: self.configs.index(s.preprocess) for n, s in self.scorers.items()}
    self.needs_prompt = any(isinstance(s, Scorer) for s in self.scorers.values())
    self.decodes = 0
    self._lock = threading.Lock()

  def _load(self, src):
    with self._lock:
      self.decodes += 1
    return scorer_mod.load_image(src)  # looked up at call time (tests count the calls)

  def _compute(self, per_image: list[list[np.ndarray]], extras: list[tuple]) -> list[dict]:
    stacks = [np.stack([views[k] for views in per_image]) for k in range(len(self.configs))]
    values = {}
    for name, s in self.scorers.items():
      pixels = stacks[self._slot[name]]
      if isinstance(s, Scorer):
        values[name] = 100.0 * np.asarray(s.cosine_arrays(pixels, s.tokenize([p for p, _ in extras])), np.float64)
      else:
        values[name] = np.asarray(s.score_arrays(pixels), np.float64)
    return [{name: float(v[i]) for name, v in values.items()} for i in range(len(per_image))]

  def iter_scores(self, items: Iterable[tuple[object, str | None, object]]) -> Iterator[tuple]:
    """(image source, prompt, extra) in -> (source, prompt, extra, {name: value} or None, error or None) out, in
    order. An unreadable image, or one a scorer gives a non-finite value, comes with an error (a ValueError naming
    the image) and the run goes on. Clip scorers need a string prompt per item (TypeError otherwise)."""

    def pairs():
      for src, prompt, extra in items:
        if self.needs_prompt and not isinstance(prompt, str):
          raise TypeError(f"{describe(src)}: a clip scorer needs a string prompt, got {type(prompt).__name__}")
        yield src, (prompt, extra)

    stream = scorer_mod._stream(
      pairs(),
      self.batch_size,
      _Decoded(self.configs),
      self.workers,
      self._compute,
      collate=list,
      load=self._load,
    )
    for src, (prompt, extra), values, err in stream:
      if err is None:
        bad = next((n for n, v in values.items() if not math.isfinite(v)), None)
        if bad is not None:
          err = ValueError(f"{bad} is {values[bad]} (non-finite: check the checkpoint's weights)")
          values = None
      yield src, prompt, extra, values if err is None else None, err
