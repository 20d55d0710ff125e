"""Statistics of a human A/B preference study: the paper's user study (Sec. 5, Fig. 8) and its agreement table
(Table 3: human vs human, CLIP vs human, HPS vs human).

The input is a list of votes: `Vote` records or dicts with the same fields. One vote is one participant's answer on
one image pair (`pair_id`): which of the two shown images they prefer, ``"left"``, ``"right"`` or ``"tie"``. Sides
may be randomized per participant; every statistic works on *system-invariant* outcomes (`label`: the first side of
the pair in sorted (system, image) order wins, the second wins, or a tie), so side randomization never matters.
Attention-check pairs (``is_check``) are only read by `check_failures` / `exclude_failed`; every other statistic
leaves them out.

Definitions used throughout:

- Ties count as half a win to each side (win rates, Bradley-Terry), and as half an agreement between a tie and a
  side (agreement: same answer 1, a tie against a side 0.5, opposite sides 0).
- Bootstrap confidence intervals are percentile intervals that resample *image pairs* (a cluster bootstrap over
  ``pair_id``): the votes of several participants on one pair share that pair's difficulty and are correlated, so
  resampling single votes would understate the uncertainty.
- Means over participants come with the population standard deviation (ddof=0) of the per-participant values:
  the spread of the participants, as in the paper's "63.5 +- 4.3%", not a standard error.
- No statistic returns NaN or infinity: an undefined value (no votes, no shared pairs, a kappa with every rating in
  one category, ...) is an `InputError` (a ValueError) that says why.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import numpy as np
from scipy import special, stats

from hps_jax.errors import InputError

CHOICES = ("left", "right", "tie")
FIRST, SECOND, TIE = 0, 1, 2  # system-invariant outcomes (`label`)
LABEL_NAMES = ("first", "second", "tie")

# Agreement between two outcomes (rows / columns: FIRST, SECOND, TIE): same answer 1, a tie against a side 0.5.
AGREEMENT = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.5, 1.0]])

_TEXT_FIELDS = ("participant", "pair_id", "system_left", "system_right", "image_left", "image_right", "choice")


@dataclass(frozen=True)
class Vote:
  """One participant's answer on one image pair. `choice`: ``"left"``, ``"right"`` or ``"tie"``, as shown to the
  participant. `is_check`: an attention-check pair; `expected`: its correct answer in the same left/right terms
  (an identical-image check, ``image_left == image_right``, expects ``"tie"`` when `expected` is None)."""

  participant: str
  pair_id: str
  system_left: str
  system_right: str
  image_left: str
  image_right: str
  choice: str
  is_check: bool = False
  expected: str | None = None

  def __post_init__(self):
    for name in _TEXT_FIELDS:
      value = getattr(self, name)
      if not isinstance(value, str) or not value:
        raise InputError(f"vote field {name!r} must be a non-empty string, got {value!r}")
    where = f"vote of {self.participant!r} on pair {self.pair_id!r}"
    if self.choice not in CHOICES:
      raise InputError(f"{where}: choice must be one of {', '.join(CHOICES)}, got {self.choice!r}")
    if not isinstance(self.is_check, (bool, np.bool_)):
      raise InputError(f"{where}: is_check must be a bool, got {self.is_check!r}")
    if self.expected is not None:
      if not self.is_check:
        raise InputError(f"{where}: an expected answer is only for attention-check pairs (is_check)")
      if self.expected not in CHOICES:
        raise InputError(f"{where}: expected must be one of {', '.join(CHOICES)}, got {self.expected!r}")
    if not self.is_check and self.system_left == self.system_right:
      raise InputError(
        f"{where}: both sides show system {self.system_left!r}; a comparison needs two systems "
        "(only attention-check pairs may repeat one)"
      )

  @classmethod
  def from_record(cls, record) -> Vote:
    """A `Vote` from a dict with the field names (extra keys are ignored) or a `Vote` itself."""
    if isinstance(record, Vote):
      return record
    if not isinstance(record, Mapping):
      raise InputError(f"a vote must be a Vote or a dict, got {type(record).__name__}")
    missing = [name for name in _TEXT_FIELDS if name not in record]
    if missing:
      raise InputError(f"vote record {dict(record)!r} lacks field(s) {', '.join(missing)}")
    return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def as_votes(records: Iterable) -> list[Vote]:
  """`Vote`s from votes / dicts, checked as one study: a participant votes at most once per pair, and every vote on a
  pair shows the same two (system, image) sides (in either order) and agrees on whether it is an attention check."""
  votes = [Vote.from_record(r) for r in records]
  seen: set[tuple[str, str]] = set()
  pairs: dict[str, tuple[frozenset, bool]] = {}
  for v in votes:
    if (v.participant, v.pair_id) in seen:
      raise InputError(f"participant {v.participant!r} voted twice on pair {v.pair_id!r}")
    seen.add((v.participant, v.pair_id))
    key = (frozenset([(v.system_left, v.image_left), (v.system_right, v.image_right)]), bool(v.is_check))
    if pairs.setdefault(v.pair_id, key) != key:
      raise InputError(
        f"pair {v.pair_id!r}: votes disagree on its (system, image) sides or on is_check; one pair_id must always "
        "show the same two images"
      )
  return votes


def sides(vote: Vote) -> tuple[tuple[str, str], tuple[str, str]]:
  """The pair's two (system, image) sides in sorted order: (first, second), whatever side each was shown on."""
  a, b = (vote.system_left, vote.image_left), (vote.system_right, vote.image_right)
  return (a, b) if a <= b else (b, a)


def label(vote: Vote) -> int:
  """The system-invariant outcome: `FIRST` (the first side of `sides` won), `SECOND` or `TIE`."""
  if vote.choice == "tie":
    return TIE
  left_first = (vote.system_left, vote.image_left) <= (vote.system_right, vote.image_right)
  return FIRST if (vote.choice == "left") == left_first else SECOND


def outcome(vote: Vote) -> tuple[str, str] | None:
  """(winner system, loser system), or None for a tie."""
  if vote.choice == "tie":
    return None
  if vote.choice == "left":
    return vote.system_left, vote.system_right
  return vote.system_right, vote.system_left


def _comparisons(votes) -> list[Vote]:
  """The checked votes on comparison pairs (attention checks left out); none is an InputError."""
  out = [v for v in as_votes(votes) if not v.is_check]
  if not out:
    raise InputError("no votes on comparison pairs (attention-check pairs are left out of every statistic)")
  return out


def _pair_counts(votes: list[Vote]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
  """{(first system, second system): {pair_id: [first wins, second wins, ties]}} over comparison votes."""
  out: dict[tuple[str, str], dict[str, np.ndarray]] = defaultdict(dict)
  for v in votes:
    (sa, _), (sb, _) = sides(v)
    counts = out[(sa, sb)].setdefault(v.pair_id, np.zeros(3, np.int64))
    counts[label(v)] += 1
  return out


def _check_bootstrap(n_boot: int, level: float) -> None:
  if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
    raise InputError(f"n_boot must be an integer >= 1, got {n_boot!r}")
  if not 0.0 < level < 1.0:
    raise InputError(f"level must be in (0, 1), got {level!r}")


def _percentile(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(samples, [tail, 1.0 - tail], axis=0)
  return low, high


def _resample_counts(rng: np.random.Generator, counts: np.ndarray, n_boot: int) -> np.ndarray:
  """Cluster bootstrap: (n_boot, 3) sums of `counts` (one row per image pair) over pairs drawn with replacement."""
  k = counts.shape[0]
  draws = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)  # how often each pair is drawn
  return draws @ counts


def _sign_test(k: int, n: int) -> float:
  """Two-sided exact binomial test of k successes in n against 1/2; 1.0 (no evidence) when n == 0."""
  return 1.0 if n == 0 else float(stats.binomtest(int(k), int(n), 0.5).pvalue)


# ----------------------------------------------------------------------------------------------------- win rates


@dataclass(frozen=True)
class WinRate:
  """System A against system B (A < B in sorted order). `win_rate`: A's share of the votes, ties counted as half;
  [`ci_low`, `ci_high`]: its percentile bootstrap interval over image pairs. `p_value`: two-sided exact sign test of
  A's wins against B's wins over the non-tied votes (it treats votes as independent, so it is optimistic when the
  votes on one pair are correlated); `p_value_pairs`: the same test over image pairs, each counted for the side
  with more votes on it (pairs with equal votes left out), which respects the clustering. A p-value with nothing to
  test (no non-tied votes / pairs) is 1.0."""

  system_a: str
  system_b: str
  n_votes: int
  n_pairs: int
  wins_a: int
  wins_b: int
  ties: int
  win_rate: float
  ci_low: float
  ci_high: float
  p_value: float
  p_value_pairs: float


def win_rates(votes, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[tuple[str, str], WinRate]:
  """{(A, B): `WinRate`} for every pair of systems compared in the study, A < B. The bootstrap resamples the image
  pairs of (A, B) with replacement, `n_boot` times, from `np.random.default_rng(seed)`."""
  _check_bootstrap(n_boot, level)
  rng = np.random.default_rng(seed)
  out = {}
  for (a, b), per_pair in sorted(_pair_counts(_comparisons(votes)).items()):
    counts = np.stack([per_pair[p] for p in sorted(per_pair)])
    wins_a, wins_b, ties = (int(x) for x in counts.sum(0))
    n = wins_a + wins_b + ties
    boot = _resample_counts(rng, counts, n_boot)
    rates = (boot[:, FIRST] + 0.5 * boot[:, TIE]) / boot.sum(1)  # every pair has >= 1 vote: no division by zero
    low, high = _percentile(rates, level)
    pairs_a = int(np.sum(counts[:, FIRST] > counts[:, SECOND]))
    pairs_b = int(np.sum(counts[:, FIRST] < counts[:, SECOND]))
    out[(a, b)] = WinRate(
      system_a=a,
      system_b=b,
      n_votes=n,
      n_pairs=len(counts),
      wins_a=wins_a,
      wins_b=wins_b,
      ties=ties,
      win_rate=(wins_a + 0.5 * ties) / n,
      ci_low=float(low),
      ci_high=float(high),
      p_value=_sign_test(wins_a, wins_a + wins_b),
      p_value_pairs=_sign_test(pairs_a, pairs_a + pairs_b),
    )
  return out


# ------------------------------------------------------------------------------------------- votes per pair (Fig. 8)


@dataclass(frozen=True)
class PairVotes:
  """Per image pair of `system` against another system (the paper's Fig. 8), in sorted pair_id order: the pair,
  the other system, the votes for `system`'s image, for the other image, the ties and the voters. `histogram[k]`:
  how many pairs gave `system` exactly k votes (k = 0 .. the most voters on a pair). `share_majority`: the share of
  pairs where `system` got more than half of the voters' votes (strictly; ties count as voters);
  `share_other_majority`: the same for the other side (the paper: 74% and 22%, the rest split evenly)."""

  system: str
  pair_ids: tuple[str, ...]
  others: tuple[str, ...]
  votes_for: np.ndarray
  votes_against: np.ndarray
  ties: np.ndarray
  voters: np.ndarray
  histogram: np.ndarray
  share_majority: float
  share_other_majority: float


def votes_per_pair(votes, system: str, *, against: str | None = None) -> PairVotes:
  """`PairVotes` over the comparison pairs that show `system` (only those against `against`, when given)."""
  rows: dict[str, list] = {}
  for v in _comparisons(votes):
    if system not in (v.system_left, v.system_right):
      continue
    other = v.system_right if v.system_left == system else v.system_left
    if against is not None and other != against:
      continue
    row = rows.setdefault(v.pair_id, [other, 0, 0, 0])
    won = outcome(v)
    row[3 if won is None else (1 if won[0] == system else 2)] += 1
  if not rows:
    versus = f" against {against!r}" if against is not None else ""
    raise InputError(f"no comparison pair shows system {system!r}{versus}")
  ids = tuple(sorted(rows))
  votes_for, votes_against, ties = (np.array([rows[p][i] for p in ids], np.int64) for i in (1, 2, 3))
  voters = votes_for + votes_against + ties
  return PairVotes(
    system=system,
    pair_ids=ids,
    others=tuple(rows[p][0] for p in ids),
    votes_for=votes_for,
    votes_against=votes_against,
    ties=ties,
    voters=voters,
    histogram=np.bincount(votes_for, minlength=int(voters.max()) + 1),
    share_majority=float(np.mean(2 * votes_for > voters)),
    share_other_majority=float(np.mean(2 * votes_against > voters)),
  )


# ------------------------------------------------------------------------------------------------- Bradley-Terry


@dataclass(frozen=True)
class BradleyTerry:
  """A Bradley-Terry fit: P(system i's image is preferred over system j's) = sigmoid(strength[i] - strength[j]).
  `strength`: log-strengths normalized to mean zero over `systems` (sorted), with percentile bootstrap intervals
  [`ci_low`, `ci_high`] (each replicate normalized the same way). `probability`: the fitted P(i over j) (0.5 on the
  diagonal). `n_votes[i, j]`: votes between i and j; `win_rate[i, j]`: i's observed share of them, ties as half,
  masked where `n_votes` is 0 (the diagonal, systems never compared directly). `prior`: the virtual ties added to
  every compared pair of systems."""

  systems: tuple[str, ...]
  strength: np.ndarray
  ci_low: np.ndarray
  ci_high: np.ndarray
  probability: np.ndarray
  n_votes: np.ndarray
  win_rate: np.ma.MaskedArray
  prior: float


def _components(adjacent: np.ndarray, start: int) -> np.ndarray:
  """Boolean mask of the nodes reachable from `start` along `adjacent[i, j]` edges i -> j."""
  reached = np.zeros(len(adjacent), bool)
  reached[start] = True
  frontier = reached.copy()
  while frontier.any():
    frontier = adjacent[frontier].any(0) & ~reached
    reached |= frontier
  return reached


def _no_finite_fit(wins: np.ndarray) -> np.ndarray | None:
  """A set of systems (boolean mask) that never wins nor ties against the others, when there is one: then some
  strengths are infinitely far apart and the likelihood has no maximum. None when the fit is finite (every system
  reaches every other along 'won or tied against' edges)."""
  beats = wins > 0
  from_first = _components(beats, 0)  # systems the first one beats, directly or through others
  if not from_first.all():
    return from_first  # ... never beat the rest
  to_first = _components(beats.T, 0)
  if not to_first.all():
    return ~to_first  # systems that never beat the first one's group
  return None


def _bt_loglik(wins: np.ndarray, theta: np.ndarray) -> float:
  return float(-np.sum(wins * np.logaddexp(0.0, theta[None, :] - theta[:, None])))


def _bt_fit(wins: np.ndarray, *, max_iter: int = 500) -> np.ndarray:
  """Mean-zero log-strengths maximizing sum_ij wins[i, j] * log sigmoid(theta_i - theta_j): Newton iterations on the
  concave log-likelihood (the first strength held at 0) with step halving, until the largest gradient entry is
  below 1e-12 of the vote count or the steps are below 1e-13. `wins` must have a finite maximum (`_no_finite_fit` is None)."""
  s = len(wins)
  n = wins + wins.T
  total = wins.sum()
  theta = np.zeros(s)
  loglik = _bt_loglik(wins, theta)
  for _ in range(max_iter):
    p = special.expit(theta[:, None] - theta[None, :])  # p[i, j] = P(i over j)
    grad = wins.sum(1) - (n * p).sum(1)
    if np.abs(grad).max() <= 1e-12 * total:
      return theta - theta.mean()
    curv = n * p * p.T  # minus the Hessian's off-diagonal; the diagonal below
    neg_hess = np.diag(curv.sum(1)) - curv
    step = np.zeros(s)
    step[1:] = np.linalg.solve(neg_hess[1:, 1:], grad[1:])
    t = 1.0
    while True:
      candidate = theta + t * step
      new = _bt_loglik(wins, candidate)
      if new >= loglik - 1e-13 * abs(loglik) or t < 1e-10:  # ascent, up to the rounding of the sum
        break
      t /= 2.0
    if t < 1e-10:  # no ascent left at double precision: the gradient is as small as it gets
      return theta - theta.mean()
    theta, loglik = candidate, new
    if np.abs(t * step).max() <= 1e-13:  # Newton steps this small: at the maximum to double precision
      return theta - theta.mean()
  raise RuntimeError(f"Bradley-Terry Newton iterations did not converge in {max_iter} steps")


def bradley_terry(votes, *, n_boot: int = 1000, seed: int = 0, prior: float = 0.1, level: float = 0.95) -> BradleyTerry:
  """Maximum-likelihood Bradley-Terry strengths of the systems (at least two), ties counted as half a win to each
  side, with `n_boot` bootstrap replicates that resample image pairs within each compared pair of systems (so every
  replicate keeps the study's design: the same pairs of systems with the same number of image pairs each).

  `prior`: virtual ties added to every pair of systems that was compared (prior / 2 wins each way), a small
  shrinkage toward equal strengths that keeps every strength finite: without it, a system that never wins (nor
  ties) against the others has strength minus infinity. The default 0.1 moves no real study's estimates visibly
  (it is 0.05 of a vote against tens to thousands); a never-winning system then gets a large negative but finite
  strength (about log(0.05 / its votes) below its opponents). ``prior=0`` is the exact maximum-likelihood fit, and
  an InputError when that is infinite (in the data or in a bootstrap replicate). Systems never compared, directly or
  through other systems, are an InputError whatever the prior (their relative strength is not identifiable)."""
  _check_bootstrap(n_boot, level)
  if not (isinstance(prior, (int, float)) and math.isfinite(prior) and prior >= 0):
    raise InputError(f"prior must be a finite number >= 0, got {prior!r}")
  by_systems = _pair_counts(_comparisons(votes))
  systems = tuple(sorted({s for pair in by_systems for s in pair}))
  index = {s: i for i, s in enumerate(systems)}
  k = len(systems)  # >= 2: every comparison vote shows two systems
  strata = []  # (i, j, per image pair counts [i wins, j wins, ties])
  for (a, b), per_pair in sorted(by_systems.items()):
    strata.append((index[a], index[b], np.stack([per_pair[p] for p in sorted(per_pair)])))
  n_votes = np.zeros((k, k), np.int64)
  for i, j, counts in strata:
    n_votes[i, j] = n_votes[j, i] = counts.sum()
  connected = _components(n_votes > 0, 0)
  if not connected.all():
    group = [s for s, c in zip(systems, connected) if c]
    rest = [s for s, c in zip(systems, connected) if not c]
    raise InputError(
      f"systems {group} are never compared, directly or through other systems, with {rest}: their relative "
      "Bradley-Terry strengths are not identifiable"
    )

  def wins_matrix(sums) -> np.ndarray:  # sums: [(i, j, [i wins, j wins, ties])]
    w = np.zeros((k, k))
    for i, j, c in sums:
      w[i, j] = c[0] + 0.5 * c[2]
      w[j, i] = c[1] + 0.5 * c[2]
    return w

  observed = wins_matrix([(i, j, c.sum(0)) for i, j, c in strata])
  compared = n_votes > 0
  prior_wins = np.where(compared, prior / 2.0, 0.0)

  def fit(w: np.ndarray, what: str) -> np.ndarray:
    w = w + prior_wins
    stuck = _no_finite_fit(w)
    if stuck is not None:
      losers = [s for s, m in zip(systems, stuck) if m]
      raise InputError(
        f"{what}: systems {losers} never win nor tie against the others, so their Bradley-Terry strength is "
        "minus infinity; pass prior > 0"
      )
    return _bt_fit(w)

  strength = fit(observed, "the votes")
  rng = np.random.default_rng(seed)
  resampled = [(i, j, _resample_counts(rng, c, n_boot)) for i, j, c in strata]
  boot = np.stack(
    [fit(wins_matrix([(i, j, r[b]) for i, j, r in resampled]), f"bootstrap replicate {b}") for b in range(n_boot)]
  )
  low, high = _percentile(boot, level)
  share = np.divide(observed, n_votes, out=np.zeros((k, k)), where=compared)
  return BradleyTerry(
    systems=systems,
    strength=strength,
    ci_low=low,
    ci_high=high,
    probability=special.expit(strength[:, None] - strength[None, :]),
    n_votes=n_votes,
    win_rate=np.ma.masked_array(share, mask=~compared),
    prior=float(prior),
  )


# ------------------------------------------------------------------------------------------ agreement (Table 3)


@dataclass(frozen=True)
class Agreement:
  """Mean and population std (ddof=0) over participants of each participant's agreement; `per_participant` and
  `n_comparisons` (how many comparisons each value averages) for every participant that has any; `excluded`: the
  participants with none (no other participant voted on any of their pairs), left out of the mean."""

  mean: float
  std: float
  per_participant: dict[str, float]
  n_comparisons: dict[str, int]
  excluded: tuple[str, ...]


def _agreement(sums: dict[str, float], counts: dict[str, int], participants: set[str], what: str) -> Agreement:
  kept = sorted(p for p in participants if counts.get(p, 0) > 0)
  if not kept:
    raise InputError(f"no {what}: agreement is undefined")
  values = np.array([sums[p] / counts[p] for p in kept])
  return Agreement(
    mean=float(values.mean()),
    std=float(values.std()),
    per_participant={p: float(x) for p, x in zip(kept, values)},
    n_comparisons={p: int(counts[p]) for p in kept},
    excluded=tuple(sorted(participants - set(kept))),
  )


def human_agreement(votes) -> Agreement:
  """Human vs human (Table 3): for each participant p, the mean agreement over every (other participant q, pair)
  where both voted on the pair: 1 for the same answer, 0.5 for a tie against a side, 0 for opposite sides (all in
  system-invariant terms). Then the mean and std of these per-participant values."""
  votes = _comparisons(votes)
  per_pair: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3, np.int64))
  for v in votes:
    per_pair[v.pair_id][label(v)] += 1
  sums: dict[str, float] = defaultdict(float)
  counts: dict[str, int] = defaultdict(int)
  for v in votes:
    own = label(v)
    others = per_pair[v.pair_id].copy()
    others[own] -= 1
    sums[v.participant] += float(others @ AGREEMENT[own])
    counts[v.participant] += int(others.sum())
  return _agreement(sums, counts, {v.participant for v in votes}, "two participants voted on one pair")


def model_label(vote: Vote, scores: Mapping[str, float]) -> int:
  """The model's outcome on the vote's pair: the side whose image scores higher (`FIRST` / `SECOND` of `sides`),
  `TIE` for equal scores. A missing or non-finite score is an InputError."""
  values = []
  for _, image in sides(vote):
    if image not in scores:
      raise InputError(f"no model score for image {image!r} (pair {vote.pair_id!r})")
    value = float(scores[image])
    if not math.isfinite(value):
      raise InputError(f"model score of image {image!r} is {value}")
    values.append(value)
  return FIRST if values[0] > values[1] else SECOND if values[0] < values[1] else TIE


def model_agreement(votes, scores: Mapping[str, float]) -> Agreement:
  """Model vs human (Table 3): the model votes for the image it scores higher (`scores`: image -> score; equal
  scores are a tie); for each participant, the mean agreement of the model with their votes (1 / 0.5 / 0 as in
  `human_agreement`); then the mean and std over participants."""
  sums: dict[str, float] = defaultdict(float)
  counts: dict[str, int] = defaultdict(int)
  votes = _comparisons(votes)
  for v in votes:
    sums[v.participant] += float(AGREEMENT[label(v), model_label(v, scores)])
    counts[v.participant] += 1
  return _agreement(sums, counts, {v.participant for v in votes}, "votes")


def _value_counts(votes: list[Vote]) -> tuple[tuple[str, ...], np.ndarray]:
  """Sorted pair ids and their (pairs, 3) counts of FIRST / SECOND / TIE answers."""
  per_pair: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3, np.int64))
  for v in votes:
    per_pair[v.pair_id][label(v)] += 1
  ids = tuple(sorted(per_pair))
  return ids, np.stack([per_pair[p] for p in ids])


@dataclass(frozen=True)
class Kappa:
  """Fleiss' kappa over `n_items` pairs with `raters` votes each (`n_dropped` pairs with another number of votes
  left out); `p_observed` / `p_expected`: the mean pairwise agreement and its chance value."""

  kappa: float
  raters: int
  n_items: int
  n_dropped: int
  p_observed: float
  p_expected: float


def fleiss_kappa(votes, *, raters: int | None = None) -> Kappa:
  """Fleiss' kappa of the participants' answers, with three system-invariant categories (first side wins, second
  wins, tie). Fleiss' kappa needs the same number of raters on every item: the pairs with exactly `raters` votes are
  used (default: the most common number of votes per pair, the larger on a draw) and every other pair is dropped
  (counted in `n_dropped`). For pairs with unequal numbers of votes use `krippendorff_alpha`, which handles them."""
  _, counts = _value_counts(_comparisons(votes))
  per_item = counts.sum(1)
  if raters is None:
    numbers, freq = np.unique(per_item, return_counts=True)
    raters = int(numbers[freq == freq.max()].max())
  if raters < 2:
    raise InputError(f"Fleiss' kappa needs at least 2 votes per pair; the pairs have {raters}")
  table = counts[per_item == raters]
  if len(table) == 0:
    raise InputError(f"no pair has exactly {raters} votes")
  p_items = ((table * (table - 1)).sum(1) / (raters * (raters - 1))).mean()
  p_categories = table.sum(0) / table.sum()
  p_expected = float(np.sum(p_categories**2))
  if p_expected >= 1.0:
    raise InputError("every vote falls in one category (all for one side, or all ties): Fleiss' kappa is 0/0")
  return Kappa(
    kappa=float((p_items - p_expected) / (1.0 - p_expected)),
    raters=int(raters),
    n_items=len(table),
    n_dropped=int(len(counts) - len(table)),
    p_observed=float(p_items),
    p_expected=p_expected,
  )


@dataclass(frozen=True)
class Alpha:
  """Krippendorff's alpha (nominal) over `n_units` pairs with at least two votes and their `n_values` votes (pairs
  with one vote cannot be paired and are left out); `d_observed` / `d_expected`: the disagreement and its chance
  value (alpha = 1 - d_observed / d_expected)."""

  alpha: float
  n_units: int
  n_values: int
  d_observed: float
  d_expected: float


def alpha_from_counts(value_counts) -> Alpha:
  """Nominal Krippendorff's alpha from a (units, categories) table of how many coders gave each value to each unit,
  through the coincidence matrix o[c, k] = sum_u (n_uc * n_uk - [c == k] * n_uc) / (m_u - 1)."""
  counts = np.asarray(value_counts, dtype=np.float64)
  if counts.ndim != 2 or (counts < 0).any() or not np.isfinite(counts).all():
    raise InputError("value counts must be a (units, categories) table of non-negative counts")
  m = counts.sum(1)
  counts = counts[m >= 2]
  m = m[m >= 2]
  if len(counts) == 0:
    raise InputError("no unit has two values: Krippendorff's alpha is undefined")
  coincidence = np.einsum("uc,uk->ck", counts / (m - 1)[:, None], counts) - np.diag((counts / (m - 1)[:, None]).sum(0))
  n_c = coincidence.sum(1)
  n = n_c.sum()
  off = ~np.eye(len(n_c), dtype=bool)
  d_observed = float(coincidence[off].sum() / n)
  d_expected = float(np.outer(n_c, n_c)[off].sum() / (n * (n - 1)))
  if d_expected <= 0.0:
    raise InputError("every value falls in one category: Krippendorff's alpha is 0/0")
  return Alpha(
    alpha=1.0 - d_observed / d_expected,
    n_units=len(counts),
    n_values=int(round(n)),
    d_observed=d_observed,
    d_expected=d_expected,
  )


def krippendorff_alpha(votes) -> Alpha:
  """Krippendorff's alpha (nominal) of the participants' system-invariant answers (first side wins, second wins,
  tie), units = image pairs, coders = participants; a participant who did not vote on a pair is a missing value."""
  return alpha_from_counts(_value_counts(_comparisons(votes))[1])


# -------------------------------------------------------------------------------------------- attention checks


@dataclass(frozen=True)
class CheckRecord:
  """Attention checks a participant answered (`seen`) and got wrong (`failed`)."""

  seen: int
  failed: int


def check_failures(votes) -> dict[str, CheckRecord]:
  """{participant: `CheckRecord`} for every participant (sorted), 0 / 0 for those who saw no check. A check is
  failed when the choice differs from its `expected` answer; a check without one must show the same image on both
  sides, and expects ``"tie"``."""
  seen: dict[str, int] = defaultdict(int)
  failed: dict[str, int] = defaultdict(int)
  participants = set()
  for v in as_votes(votes):
    participants.add(v.participant)
    if not v.is_check:
      continue
    expected = v.expected
    if expected is None:
      if v.image_left != v.image_right:
        raise InputError(
          f"check pair {v.pair_id!r} shows two different images and has no expected answer (vote of {v.participant!r})"
        )
      expected = "tie"
    seen[v.participant] += 1
    failed[v.participant] += int(v.choice != expected)
  return {p: CheckRecord(seen[p], failed[p]) for p in sorted(participants)}


def exclude_failed(votes, max_failures: int = 0) -> list[Vote]:
  """The votes (checks included) of the participants who failed at most `max_failures` attention checks."""
  if max_failures < 0:
    raise InputError(f"max_failures must be >= 0, got {max_failures}")
  votes = as_votes(votes)
  records = check_failures(votes)
  return [v for v in votes if records[v.participant].failed <= max_failures]


# -------------------------------------------------------------------------------------------- synthetic studies


def simulate(
  systems_probs: Mapping[tuple[str, str], float],
  n_pairs: int,
  n_participants: int,
  seed: int = 0,
  *,
  raters_per_pair: int | None = None,
  tie_prob: float = 0.0,
  pair_spread: float = 0.0,
  n_checks: int = 0,
  careless: float = 0.0,
) -> list[Vote]:
  """A synthetic study. `systems_probs[(a, b)]`: the probability that a participant prefers system a's image over
  b's (given no tie); each such pair of systems gets `n_pairs` image pairs (``"{a}/{k}.png"`` vs ``"{b}/{k}.png"``).

  Each image pair is voted on by `raters_per_pair` participants drawn at random (default: all `n_participants`),
  each with sides shown in random order. An attentive participant answers "tie" with probability `tie_prob` and
  otherwise prefers a's image with the pair's own probability: sigmoid(logit(p) + N(0, `pair_spread`)), so a
  spread > 0 makes votes on one pair correlated. A `careless` share of the participants answers uniformly at random.
  `n_checks` identical-image attention checks (expected answer "tie") are shown to every participant."""
  if n_pairs < 1 or n_participants < 1:
    raise InputError("n_pairs and n_participants must be >= 1")
  raters = n_participants if raters_per_pair is None else raters_per_pair
  if not 1 <= raters <= n_participants:
    raise InputError(f"raters_per_pair must be in 1 .. n_participants ({n_participants}), got {raters_per_pair}")
  if not (0.0 <= tie_prob <= 1.0 and 0.0 <= careless <= 1.0 and pair_spread >= 0.0 and n_checks >= 0):
    raise InputError("tie_prob and careless must be in [0, 1], pair_spread and n_checks >= 0")
  rng = np.random.default_rng(seed)
  people = [f"p{i:03d}" for i in range(n_participants)]
  is_careless = rng.random(n_participants) < careless
  votes = []

  def vote(person: int, pair_id: str, first: tuple[str, str], second: tuple[str, str], pick: int, check=False):
    flip = bool(rng.random() < 0.5)  # show `second` on the left
    left, right = (second, first) if flip else (first, second)
    if pick == TIE:
      choice = "tie"
    else:
      choice = "left" if (pick == FIRST) != flip else "right"
    votes.append(Vote(people[person], pair_id, left[0], right[0], left[1], right[1], choice, is_check=check))

  for (a, b), p in sorted(systems_probs.items()):
    if a == b or not 0.0 <= p <= 1.0:
      raise InputError(f"systems_probs[({a!r}, {b!r})] = {p!r}: needs two systems and a probability in [0, 1]")
    for k in range(n_pairs):
      logit = special.logit(np.clip(p, 1e-12, 1 - 1e-12)) + (rng.normal(0.0, pair_spread) if pair_spread else 0.0)
      p_pair = float(special.expit(logit)) if 0.0 < p < 1.0 else p
      for person in rng.choice(n_participants, size=raters, replace=False):
        if is_careless[person]:
          pick = int(rng.integers(3))
        elif rng.random() < tie_prob:
          pick = TIE
        else:
          pick = FIRST if rng.random() < p_pair else SECOND
        side_a, side_b = (a, f"{a}/{k}.png"), (b, f"{b}/{k}.png")
        first, second = (side_a, side_b) if side_a <= side_b else (side_b, side_a)
        pick = pick if (first == side_a or pick == TIE) else FIRST + SECOND - pick
        vote(int(person), f"{a}-vs-{b}-{k:04d}", first, second, pick)
  reference = sorted({s for pair in systems_probs for s in pair})[0] if systems_probs else "check"
  for k in range(n_checks):
    image = (reference, f"check/{k}.png")
    for person in range(n_participants):
      pick = int(rng.integers(3)) if is_careless[person] else TIE
      vote(person, f"check-{k:04d}", image, image, pick, check=True)
  return votes
