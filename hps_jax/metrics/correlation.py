"""How much two or more per-image scores agree: Pearson, Spearman and Kendall (tau-b) for every pair of scores,
over all images and within prompts, each with a bootstrap confidence interval and a p-value (the paper's Fig. 6
plots HPS against CLIP score per image: they correlate, but HPS weighs aesthetics differently).

Definitions (for one pair of scores x, y over n images, each image with its prompt):

* **global**: the coefficient over all n images, exactly what `scipy.stats.pearsonr`, `spearmanr` (average ranks
  for ties) and `kendalltau` (tau-b, scipy's default method) return, with scipy's two-sided p-value. CI: percentile
  bootstrap resampling *images* with replacement.
* **within prompt**: only prompts with at least `min_per_prompt` images take part (the "eligible" prompts; HPS only
  compares images of one prompt, so this is the agreement that matters for ranking a prompt's images). Two numbers:

  - ``pooled``: one coefficient from every eligible prompt's images, with the between-prompt differences removed.
    Pearson: the Pearson r of the values centered on their prompt's mean (the within-group correlation of an
    ANCOVA). Spearman: the same on within-prompt average ranks (centered on the prompt's mean rank). Kendall: the
    stratified tau-b over the pairs of images *of the same prompt* only: sum_p S_p / sqrt(sum_p A_p * sum_p B_p),
    with S_p = concordant - discordant pairs of prompt p, A_p / B_p its pairs not tied in x / in y. P-values:
    Pearson and Spearman by scipy's t-test with N - P - 1 degrees of freedom (N images, P prompts: centering costs
    one degree per prompt); Kendall by scipy's asymptotic normal test with the tie-corrected variances summed over
    prompts. With a single prompt all three equal `pearsonr`, `spearmanr` and `kendalltau(method="asymptotic")`.
  - ``mean``: the mean over eligible prompts of the prompt's own coefficient (scipy's, on that prompt's images);
    prompts where x or y is constant have no coefficient and are left out (counted). P-value: scipy's one-sample
    t-test of those coefficients against 0.

  CI: percentile bootstrap resampling *prompts* (a cluster bootstrap: a prompt drawn twice counts twice).

Undefined values are never NaN: a coefficient of a constant score (or too few images / prompts) is reported as
``{"value": None, "undefined": REASON}``; a bootstrap replicate whose resample is constant is left out of the
interval (the count is noted). All replicates of one run share the same resamples (`seed`, a numpy Generator):
the intervals of the different pairs and coefficients are computed on the same draws.
"""

from __future__ import annotations

import math
import warnings
from itertools import combinations

import numpy as np
from scipy import special, stats

from hps_jax import files
from hps_jax.errors import InputError, check_stop
from hps_jax.plotting import pyplot, require_matplotlib

METHODS = ("pearson", "spearman", "kendall")
METHOD_NAMES = {"pearson": "Pearson r", "spearman": "Spearman rho", "kendall": "Kendall tau-b"}
MIN_IMAGES = 3
DEFINITIONS = {
  "global": "scipy.stats pearsonr / spearmanr / kendalltau (tau-b) over all images, scipy's two-sided p-value",
  "within_prompt.pooled": "prompts with >= min_per_prompt images; Pearson of values centered on their prompt's "
  "mean, Spearman the same on within-prompt average ranks (p: t-test, N - P - 1 df); Kendall tau-b over pairs of "
  "images of the same prompt (p: normal test, tie-corrected variances summed over prompts)",
  "within_prompt.mean": "mean over those prompts of each prompt's scipy coefficient (prompts with a constant score "
  "left out); p: scipy's one-sample t-test of the coefficients against 0",
}
_CHUNK_ELEMENTS = 1 << 22  # resampled values held at once by the image bootstrap


# ------------------------------------------------------------------------------------------------ coefficients
def _scipy(method: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if method == "pearson":
      res = stats.pearsonr(x, y)
    elif method == "spearman":
      res = stats.spearmanr(x, y)
    else:
      res = stats.kendalltau(x, y)
  return float(res.statistic), float(res.pvalue)


def _constant(v: np.ndarray) -> bool:
  return bool(v.size == 0 or np.all(v == v[0]))


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pearson r of each row of a against the same row of b; NaN for a row where either is constant."""
  am = a - a.mean(axis=1, keepdims=True)
  bm = b - b.mean(axis=1, keepdims=True)
  const = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.einsum("ij,ij->i", am, bm) / np.sqrt(np.einsum("ij,ij->i", am, am) * np.einsum("ij,ij->i", bm, bm))
  r = np.clip(r, -1.0, 1.0)
  r[const] = np.nan
  return r


def _tie_counts(v: np.ndarray) -> tuple[int, int, int]:
  """scipy's `count_rank_tie`: (tied pairs, sum t(t-1)(t-2), sum t(t-1)(2t+5)) over groups of t equal values."""
  _, cnt = np.unique(v, return_counts=True)
  cnt = cnt[cnt > 1].astype(np.int64)
  return (
    int((cnt * (cnt - 1) // 2).sum()),
    int((cnt * (cnt - 1) * (cnt - 2)).sum()),
    int((cnt * (cnt - 1) * (2 * cnt + 5)).sum()),
  )


def _kendall_parts(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, float]:
  """(S, A, B, var, tau) of one prompt: S = concordant - discordant pairs, A / B = pairs not tied in x / y, var the
  null variance of S (scipy's tie-corrected formula), tau = scipy's tau-b (NaN when A or B is 0)."""
  n = x.size
  tot = n * (n - 1) // 2
  xtie, x0, x1 = _tie_counts(x)
  ytie, y0, y1 = _tie_counts(y)
  a, b = tot - xtie, tot - ytie
  if a == 0 or b == 0:
    s, tau = 0.0, math.nan  # every pair tied in x (or y): no pair is concordant or discordant
  else:
    tau = _scipy("kendall", x, y)[0]
    s = float(round(tau * math.sqrt(a) * math.sqrt(b)))  # S is an integer: exact while |error| < 0.5
  var = 0.0
  if n >= 2:
    m = n * (n - 1.0)
    var = (m * (2 * n + 5) - x1 - y1) / 18 + (2 * xtie * ytie) / m
    if n > 2:
      var += x0 * y0 / (9 * m * (n - 2))
  return s, float(a), float(b), var, tau


# ------------------------------------------------------------------------------------------------------ groups
def prompt_groups(prompts, min_per_prompt: int) -> tuple[list[np.ndarray], int]:
  """(index arrays of the prompts with >= min_per_prompt images, in order of first appearance; number of distinct
  prompts)."""
  by: dict[str, list[int]] = {}
  for i, p in enumerate(prompts):
    by.setdefault(p, []).append(i)
  groups = [np.asarray(ix, dtype=np.int64) for ix in by.values() if len(ix) >= min_per_prompt]
  return groups, len(by)


class _Within:
  """Per-prompt sufficient statistics of one pair of scores over the eligible prompts (arrays of length P)."""

  def __init__(self, x: np.ndarray, y: np.ndarray, groups: list[np.ndarray]):
    P = len(groups)
    self.n = np.array([g.size for g in groups], dtype=np.float64)
    self.const_x = np.array([_constant(x[g]) for g in groups], dtype=bool)
    self.const_y = np.array([_constant(y[g]) for g in groups], dtype=bool)
    self.suff = {}
    for method in ("pearson", "spearman"):
      sxy, sxx, syy = np.zeros(P), np.zeros(P), np.zeros(P)
      for k, g in enumerate(groups):
        a, b = x[g], y[g]
        if method == "spearman":
          a, b = stats.rankdata(a), stats.rankdata(b)
        ca = np.zeros_like(a) if self.const_x[k] else a - a.mean()
        cb = np.zeros_like(b) if self.const_y[k] else b - b.mean()
        sxy[k], sxx[k], syy[k] = ca @ cb, ca @ ca, cb @ cb
      self.suff[method] = (sxy, sxx, syy)
    parts = np.array([_kendall_parts(x[g], y[g]) for g in groups]).reshape(P, 5)
    self.suff["kendall"] = (parts[:, 0], parts[:, 1], parts[:, 2])
    self.kendall_var = parts[:, 3]
    self.defined = ~(self.const_x | self.const_y)
    self.coef = {}
    for method in ("pearson", "spearman"):
      sxy, sxx, syy = self.suff[method]
      with np.errstate(invalid="ignore", divide="ignore"):
        self.coef[method] = np.where(self.defined, np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0), np.nan)
    self.coef["kendall"] = np.where(self.defined, parts[:, 4], np.nan)

  def pooled(self, method: str, weights: np.ndarray | None = None) -> np.ndarray | float:
    """The pooled coefficient; `weights` (R, P) of prompt draw counts -> one per replicate (NaN where undefined)."""
    num, da, db = self.suff[method]
    if weights is None:
      num, da, db = num.sum(), da.sum(), db.sum()
    else:
      num, da, db = weights @ num, weights @ da, weights @ db
    with np.errstate(invalid="ignore", divide="ignore"):
      if method == "kendall":
        r = num / np.sqrt(da) / np.sqrt(db)
      else:
        r = num / np.sqrt(da * db)
      r = np.where((da > 0) & (db > 0), np.clip(r, -1.0, 1.0), np.nan)
    return r if weights is not None else float(r)

  def mean(self, method: str, weights: np.ndarray | None = None) -> np.ndarray | float:
    c = self.coef[method]
    if weights is None:
      return float(c[self.defined].mean()) if self.defined.any() else math.nan
    w = weights[:, self.defined]
    with np.errstate(invalid="ignore", divide="ignore"):
      return (w @ c[self.defined]) / w.sum(axis=1)


# --------------------------------------------------------------------------------------------------- intervals
def _interval(reps: np.ndarray, level: float, what: str) -> tuple[list, list[str]]:
  """(ci [low, high] or None, notes) of bootstrap replicates, the undefined ones left out."""
  finite = reps[np.isfinite(reps)]
  notes = []
  if finite.size == 0:
    return None, [f"CI undefined: every bootstrap replicate of {what} was undefined"]
  if finite.size < reps.size:
    notes.append(
      f"{reps.size - finite.size} of {reps.size} bootstrap replicates undefined (a resample with a constant score), "
      "left out of the CI"
    )
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(finite, [tail, 1.0 - tail])
  return [float(low), float(high)], notes


def _stat(value: float, p_value, ci, n: int, notes: list[str], **extra) -> dict:
  out = {"value": float(value), "p_value": None, "ci": ci, "n": int(n), **extra}
  if p_value is not None and math.isfinite(p_value):
    out["p_value"] = float(p_value)
  elif p_value is not None:
    notes = [*notes, f"p-value undefined (scipy returned {p_value})"]
  if notes:
    out["notes"] = notes
  return out


def _undefined(reason: str, n: int, **extra) -> dict:
  return {"value": None, "p_value": None, "ci": None, "n": int(n), **extra, "undefined": reason}


def _fmt(v: float) -> str:
  return f"{v:.6g}"


# ---------------------------------------------------------------------------------------------------- the run
def correlate(
  scores: dict[str, np.ndarray],
  prompts=None,
  *,
  n_boot: int = 1000,
  seed: int = 0,
  min_per_prompt: int = 3,
  level: float = 0.95,
) -> dict:
  """The agreement of every pair of `scores` ({name: per-image values}, all of one length, in order: pairs are
  (first, second) as given) over the images, and within prompts when `prompts` (one per image) is given; see the
  module docstring for the definitions. Returns a JSON-ready dict (numbers, None for undefined values: never NaN).
  Raises InputError for fewer than two scores, columns of different lengths or non-finite values, or bad
  settings."""
  names = list(scores)
  if len(names) < 2:
    raise InputError(f"correlation needs at least two scores, got {len(names)}")
  cols = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in scores.items()}
  n = cols[names[0]].size
  for k, v in cols.items():
    if v.size != n:
      raise InputError(f"score {k} has {v.size} values, expected {n} (one per image)")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
      raise InputError(f"score {k} holds a non-finite value ({v[bad[0]]}) at image {int(bad[0])}")
  if prompts is not None and len(prompts) != n:
    raise InputError(f"{len(prompts)} prompts for {n} images")
  if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
    raise InputError(f"n_boot must be an integer >= 1, got {n_boot!r}")
  if not isinstance(min_per_prompt, (int, np.integer)) or min_per_prompt < 2:
    raise InputError(f"min_per_prompt must be an integer >= 2, got {min_per_prompt!r}")
  if not 0.0 < level < 1.0:
    raise InputError(f"level must be in (0, 1), got {level!r}")

  pairs = list(combinations(names, 2))
  rng_images, rng_prompts = np.random.default_rng(seed).spawn(2)
  constant = {k: _constant(v) for k, v in cols.items()}

  # ---- global
  global_reps = _image_bootstrap(cols, pairs, constant, n_boot, rng_images) if n >= MIN_IMAGES else {}
  results = []
  for a, b in pairs:
    entry = {"x": a, "y": b, "global": {}}
    reason = _global_undefined(a, b, cols, constant, n)
    for method in METHODS:
      if reason is not None:
        entry["global"][method] = _undefined(reason, n)
        continue
      value, p = _scipy(method, cols[a], cols[b])
      if not math.isfinite(value):  # not expected once constant scores are excluded; never reported as NaN
        entry["global"][method] = _undefined(f"scipy returned {value}", n)
        continue
      ci, notes = _interval(global_reps[(a, b, method)], level, f"{a} ~ {b} over images")
      entry["global"][method] = _stat(value, p, ci, n, notes)
    results.append(entry)

  report = {
    "n_images": int(n),
    "scores": names,
    "settings": {
      "bootstrap": int(n_boot),
      "seed": int(seed),
      "level": float(level),
      "min_per_prompt": int(min_per_prompt),
      "ci": "percentile bootstrap: images resampled for global, prompts resampled for within-prompt",
    },
    "definitions": DEFINITIONS,
    "pairs": results,
  }
  if prompts is None:
    report.update(n_prompts=None, n_prompts_eligible=0, n_images_eligible=0)
    for entry in results:
      entry["within_prompt"] = {
        part: {m: _undefined("no prompts given", 0) for m in METHODS} for part in ("pooled", "mean")
      }
    return report

  # ---- within prompt
  groups, n_prompts = prompt_groups(prompts, min_per_prompt)
  P = len(groups)
  N = int(sum(g.size for g in groups))
  report.update(n_prompts=n_prompts, n_prompts_eligible=P, n_images_eligible=N)
  within = {(a, b): _Within(cols[a], cols[b], groups) for a, b in pairs} if P else {}
  prompt_reps = _prompt_bootstrap(within, P, n_boot, rng_prompts) if P >= 2 else {}
  for entry in results:
    a, b = entry["x"], entry["y"]
    entry["within_prompt"] = {"pooled": {}, "mean": {}}
    for method in METHODS:
      if P == 0:
        reason = f"no prompt has at least {min_per_prompt} images"
        entry["within_prompt"]["pooled"][method] = _undefined(reason, 0, n_prompts=0)
        entry["within_prompt"]["mean"][method] = _undefined(reason, 0)
        continue
      w = within[(a, b)]
      entry["within_prompt"]["pooled"][method] = _pooled_stat(w, method, a, b, N, P, prompt_reps, level)
      entry["within_prompt"]["mean"][method] = _mean_stat(w, method, a, b, P, prompt_reps, level)
  return report


def _global_undefined(a: str, b: str, cols, constant, n: int) -> str | None:
  if n < MIN_IMAGES:
    return f"only {n} images (at least {MIN_IMAGES} are needed)"
  const = [k for k in (a, b) if constant[k]]
  if const:
    return " and ".join(f"{k} is constant (every image scores {_fmt(cols[k][0])})" for k in const)
  return None


def _pooled_stat(w: _Within, method: str, a: str, b: str, N: int, P: int, reps, level: float) -> dict:
  flat = [k for k, c in ((a, w.const_x), (b, w.const_y)) if c.all()]
  if flat:
    reason = " and ".join(f"{k} is constant within every eligible prompt" for k in flat)
    return _undefined(reason, N, n_prompts=P)
  value = w.pooled(method)
  notes = []
  df = N - P - 1
  p = None
  if method == "kendall":
    var = float(w.kendall_var.sum())
    s = float(w.suff["kendall"][0].sum())
    if var > 0:
      p = float(2 * special.ndtr(-abs(s / math.sqrt(var))))
  elif df < 1:
    notes.append(f"p-value undefined: {N} images in {P} prompts leave no degree of freedom")
  elif method == "pearson":
    ab = df / 2.0
    p = float(2 * special.betaincc(ab, ab, (abs(value) + 1.0) / 2.0))
  else:  # scipy's spearmanr: t = rho sqrt(df / ((rho + 1)(1 - rho))), infinite at |rho| = 1
    rho = np.float64(value)
    with np.errstate(divide="ignore"):
      t = float(rho * np.sqrt(np.clip(df / ((rho + 1.0) * (1.0 - rho)), 0.0, None)))
    p = float(2 * special.stdtr(df, -abs(t)))
  ci = None
  if P >= 2:
    ci, more = _interval(reps[(a, b, method, "pooled")], level, f"{a} ~ {b} within prompts")
    notes += more
  else:
    notes.append("CI undefined: one eligible prompt (the interval resamples prompts)")
  return _stat(value, p, ci, N, notes, n_prompts=P)


def _mean_stat(w: _Within, method: str, a: str, b: str, P: int, reps, level: float) -> dict:
  k = int(w.defined.sum())
  left_out = P - k
  if k == 0:
    return _undefined(f"{a} or {b} is constant within every eligible prompt", 0, n_prompts_left_out=left_out)
  coefs = w.coef[method][w.defined]
  value = float(coefs.mean())
  notes = []
  if left_out:
    notes.append(f"{left_out} prompt(s) left out: {a} or {b} is constant among their images")
  p = None
  if k < 2:
    notes.append("p-value undefined: one prompt with a coefficient")
  elif np.all(coefs == coefs[0]):
    notes.append(f"p-value undefined: every prompt's coefficient is {_fmt(coefs[0])}")
  else:
    p = float(stats.ttest_1samp(coefs, 0.0).pvalue)
  ci = None
  if P >= 2:
    ci, more = _interval(reps[(a, b, method, "mean")], level, f"{a} ~ {b} per prompt")
    notes += more
  else:
    notes.append("CI undefined: one eligible prompt (the interval resamples prompts)")
  return _stat(value, p, ci, k, notes, n_prompts_left_out=left_out)


def _image_bootstrap(cols, pairs, constant, n_boot: int, rng: np.random.Generator) -> dict:
  """{(a, b, method): (n_boot,) replicates} over resampled images (the same draws for every pair and method)."""
  n = next(iter(cols.values())).size
  out = {(a, b, m): np.full(n_boot, np.nan) for a, b in pairs for m in METHODS}
  todo = [(a, b) for a, b in pairs if not (constant[a] or constant[b])]
  chunk = max(1, _CHUNK_ELEMENTS // n)
  for start in range(0, n_boot, chunk):
    stop = min(n_boot, start + chunk)
    idx = rng.integers(0, n, size=(stop - start, n))
    ranks = {}
    for a, b in todo:
      xa, xb = cols[a][idx], cols[b][idx]
      out[(a, b, "pearson")][start:stop] = _rowwise_pearson(xa, xb)
      for k in (a, b):
        if k not in ranks:
          ranks[k] = stats.rankdata(cols[k][idx], axis=1)
      out[(a, b, "spearman")][start:stop] = _rowwise_pearson(ranks[a], ranks[b])
      taus = out[(a, b, "kendall")]
      for i in range(stop - start):
        check_stop()
        if np.ptp(xa[i]) > 0 and np.ptp(xb[i]) > 0:
          taus[start + i] = _kendall_statistic(xa[i], xb[i])
  return out


def _kendall_statistic(x: np.ndarray, y: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return float(stats.kendalltau(x, y, method="asymptotic").statistic)


def _prompt_bootstrap(within: dict, P: int, n_boot: int, rng: np.random.Generator) -> dict:
  """{(a, b, method, 'pooled' | 'mean'): (n_boot,) replicates} over resampled prompts (multinomial draw counts,
  the same draws for every pair and method)."""
  out = {}
  chunk = max(1, _CHUNK_ELEMENTS // P)
  parts = []
  for start in range(0, n_boot, chunk):
    stop = min(n_boot, start + chunk)
    weights = rng.multinomial(P, np.full(P, 1.0 / P), size=stop - start).astype(np.float64)
    parts.append(
      {
        (a, b, m, kind): (w.pooled(m, weights) if kind == "pooled" else w.mean(m, weights))
        for (a, b), w in within.items()
        for m in METHODS
        for kind in ("pooled", "mean")
      }
    )
  for key in parts[0]:
    out[key] = np.concatenate([p[key] for p in parts])
  return out


# -------------------------------------------------------------------------------------------------- rendering
def _r3(v: float) -> str:
  text = f"{v:.3f}"
  return "0.000" if text == "-0.000" else text  # a rounding residue is not a sign


def _cell(stat: dict) -> tuple[str, str, str]:
  if stat["value"] is None:
    return "n/a", "", ""
  ci = f"[{_r3(stat['ci'][0])}, {_r3(stat['ci'][1])}]" if stat["ci"] else "n/a"
  p = f"{stat['p_value']:.2g}" if stat["p_value"] is not None else "n/a"
  return _r3(stat["value"]), ci, p


def markdown(report: dict) -> str:
  """The report as markdown: a summary line, one table row per pair and coefficient, then every undefined value
  and note with its reason."""
  s = report["settings"]
  pct = f"{100 * s['level']:g}%"
  if report["n_prompts"] is None:
    prompts = "no prompts"
  else:
    prompts = (
      f"{report['n_prompts']} prompts ({report['n_prompts_eligible']} with at least {s['min_per_prompt']} images: "
      f"{report['n_images_eligible']} images)"
    )
  lines = [
    "# Score correlation",
    "",
    f"{report['n_images']} images, {prompts}. {pct} percentile bootstrap CIs from {s['bootstrap']} replicates "
    f"(seed {s['seed']}): images resampled for global, prompts for within-prompt. Within-prompt pooled: values "
    "centered (Pearson) / ranked and centered (Spearman) within each prompt, Kendall over same-prompt pairs only; "
    "mean: the mean over prompts of each prompt's own coefficient.",
    "",
    f"| x | y | coefficient | global | {pct} CI | p | within-prompt pooled | {pct} CI | p | mean over prompts "
    f"| {pct} CI | p | prompts |",
    "|---|---|---|---:|---|---:|---:|---|---:|---:|---|---:|---:|",
  ]
  footnotes = []
  for entry in report["pairs"]:
    for m in METHODS:
      g = entry["global"][m]
      pooled = entry["within_prompt"]["pooled"][m]
      mean = entry["within_prompt"]["mean"][m]
      n_mean = str(mean["n"]) if mean["value"] is not None else ""
      cells = [entry["x"], entry["y"], METHOD_NAMES[m], *_cell(g), *_cell(pooled), *_cell(mean), n_mean]
      lines.append("| " + " | ".join(cells) + " |")
      for where, stat in (("global", g), ("within-prompt pooled", pooled), ("mean over prompts", mean)):
        for why in ([stat["undefined"]] if "undefined" in stat else []) + stat.get("notes", []):
          footnotes.append(f"- {entry['x']} ~ {entry['y']}, {METHOD_NAMES[m]}, {where}: {why}")
  if footnotes:
    lines += ["", "n/a and notes:", "", *dict.fromkeys(footnotes)]
  return "\n".join(lines) + "\n"


def check_matplotlib() -> None:
  require_matplotlib("the scatter plot", " (or pass --no-scatter)")


def _pearson_title(report: dict, a: str, b: str) -> str:
  for entry in report["pairs"]:
    if {entry["x"], entry["y"]} == {a, b}:
      r = entry["global"]["pearson"]["value"]
      return f"r = {r:.3f}" if r is not None else "r undefined"
  return ""


def scatter_png(path, scores: dict[str, np.ndarray], report: dict) -> None:
  """The scatter plot, written atomically to `path`: for two scores the Fig. 6-style scatter (x = first score,
  y = second, the least-squares line, Pearson r in the title); for more, the pairwise scatter matrix (histograms
  on the diagonal)."""
  plt = pyplot()
  names = list(scores)
  cols = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
  n = cols[names[0]].size
  size = 4 if n > 2000 else 10 if n > 300 else 18

  def draw(ax, a, b, fit: bool):
    x, y = cols[a], cols[b]
    ax.scatter(x, y, s=size, alpha=0.5, color="#4c72b0", edgecolors="none")
    if fit and not (_constant(x) or _constant(y)):
      slope, intercept = np.polyfit(x, y, 1)
      xs = np.array([x.min(), x.max()])
      ax.plot(xs, slope * xs + intercept, color="#c44e52", lw=1.5, label=f"y = {slope:.3g} x + {intercept:.3g}")

  if len(names) == 2:
    a, b = names
    fig, ax = plt.subplots(figsize=(6, 5))
    draw(ax, a, b, True)
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.set_title(f"{b} vs {a} per image (n = {n}): Pearson {_pearson_title(report, a, b)}")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
  else:
    k = len(names)
    fig, axes = plt.subplots(k, k, figsize=(2.6 * k, 2.6 * k), squeeze=False)
    for i, b in enumerate(names):
      for j, a in enumerate(names):
        ax = axes[i][j]
        if i == j:
          ax.hist(cols[a], bins=30, color="#8c8c8c")
        else:
          draw(ax, a, b, True)
          ax.set_title(_pearson_title(report, a, b), fontsize=8)
        if i == k - 1:
          ax.set_xlabel(a)
        if j == 0:
          ax.set_ylabel(b)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"pairwise scores per image (n = {n})")
  fig.tight_layout()
  with files.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)
