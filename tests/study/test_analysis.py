"""hps_jax.study.analysis: the user-study statistics against hand-computed fixtures (the arithmetic is in the
comments), against scipy / statsmodels / the krippendorff package, and on simulated studies with known truth."""

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from hps_jax.errors import InputError
from hps_jax.study import analysis as sa
from hps_jax.study.analysis import FIRST, SECOND, TIE, Vote

# --------------------------------------------------------------------------------------------------- fixtures


def make_vote(participant, pair, a, b, winner, flip=False, **kw) -> Vote:
  """A vote of `participant` on image pair `pair` of systems a vs b (images "{a}/{pair}.png", ...): `winner` is a,
  b or "tie"; `flip` shows b on the left."""
  left, right = (b, a) if flip else (a, b)
  choice = "tie" if winner == "tie" else ("left" if winner == left else "right")
  return Vote(participant, pair, left, right, f"{left}/{pair}.png", f"{right}/{pair}.png", choice, **kw)


# Three participants, four image pairs of systems A vs B, sides alternating (the statistics must not care):
#   q1: P1 A,   P2 A, P3 A
#   q2: P1 A,   P2 B, P3 tie
#   q3: P1 B,   P2 B, P3 A
#   q4: P1 tie, P2 A            (P3 did not vote)
FIXTURE = [
  ("P1", "q1", "A"),
  ("P2", "q1", "A"),
  ("P3", "q1", "A"),
  ("P1", "q2", "A"),
  ("P2", "q2", "B"),
  ("P3", "q2", "tie"),
  ("P1", "q3", "B"),
  ("P2", "q3", "B"),
  ("P3", "q3", "A"),
  ("P1", "q4", "tie"),
  ("P2", "q4", "A"),
]


def fixture_votes():
  return [make_vote(p, q, "A", "B", w, flip=i % 2 == 1) for i, (p, q, w) in enumerate(FIXTURE)]


def votes_from_counts(table: dict, voters: int = 5) -> list[Vote]:
  """Votes realizing {(a, b): (a wins, b wins, ties)}: spread over image pairs of `voters` votes each, one voter per
  vote, sides alternating."""
  votes, k = [], 0
  for (a, b), (wa, wb, t) in table.items():
    outcomes = [a] * wa + [b] * wb + ["tie"] * t
    for i, w in enumerate(outcomes):
      votes.append(make_vote(f"v{i % voters}", f"{a}{b}-{i // voters}", a, b, w, flip=k % 2 == 1))
      k += 1
  return votes


def all_finite(*values) -> bool:
  return all(np.isfinite(np.asarray(v, dtype=float)).all() for v in values)


# ------------------------------------------------------------------------------------------- records, labels


def test_labels_are_side_invariant_and_outcome_names_systems():
  shown = make_vote("P", "q", "A", "B", "A")
  swapped = make_vote("P", "q", "A", "B", "A", flip=True)
  assert shown.choice == "left" and swapped.choice == "right"
  assert sa.label(shown) == sa.label(swapped) == FIRST  # "A" sorts first
  assert sa.label(make_vote("P", "q", "A", "B", "B", flip=True)) == SECOND
  assert sa.label(make_vote("P", "q", "A", "B", "tie")) == TIE
  assert sa.outcome(swapped) == ("A", "B") and sa.outcome(make_vote("P", "q", "A", "B", "tie")) is None
  assert sa.sides(swapped) == (("A", "A/q.png"), ("B", "B/q.png"))


def test_dict_records_are_accepted():
  as_dicts = [dict(vars(v), extra="ignored") for v in fixture_votes()]
  assert sa.win_rates(as_dicts, n_boot=10)[("A", "B")].win_rate == 7 / 11


@pytest.mark.parametrize(
  "records, message",
  [
    ([], "no votes"),
    ([make_vote("P", "c", "A", "B", "tie", is_check=True, expected="tie")], "no votes"),
    ([dict(vars(make_vote("P", "q", "A", "B", "A")), choice="both")], "choice must be one of"),
    ([dict(vars(make_vote("P", "q", "A", "B", "A")), system_right="A")], "needs two systems"),
    ([{"participant": "P", "pair_id": "q"}], "lacks field"),
    ([make_vote("P", "q", "A", "B", "A"), make_vote("P", "q", "A", "B", "B")], "voted twice"),
    ([make_vote("P", "q", "A", "B", "A"), make_vote("R", "q", "A", "C", "A")], "same two images"),
    ([dict(vars(make_vote("P", "q", "A", "B", "A")), expected="left")], "only for attention-check"),
  ],
)
def test_bad_inputs_are_input_errors(records, message):
  with pytest.raises(InputError, match=message):
    sa.win_rates(records, n_boot=10)


# ---------------------------------------------------------------------------------------------------- win rates


def test_win_rate_fixture():
  (key, r), *rest = sa.win_rates(fixture_votes(), n_boot=500).items()
  assert key == ("A", "B") and not rest
  # 11 votes: A wins 3 (q1) + 1 (q2) + 1 (q3) + 1 (q4) = 6, B wins 1 (q2) + 2 (q3) = 3, ties 1 (q2) + 1 (q4) = 2
  assert (r.n_votes, r.n_pairs, r.wins_a, r.wins_b, r.ties) == (11, 4, 6, 3, 2)
  assert r.win_rate == pytest.approx((6 + 2 / 2) / 11, abs=1e-15)
  # sign test on the 9 non-tied votes: P(X <= 3) + P(X >= 6), X ~ Bin(9, 1/2) = 2 (1 + 9 + 36 + 84) / 512
  assert r.p_value == pytest.approx(260 / 512, abs=1e-12)
  assert r.p_value == pytest.approx(stats.binomtest(6, 9, 0.5).pvalue, abs=1e-15)
  # pair majorities: q1 A, q2 split (1-1), q3 B, q4 A -> 2 of 3: P(X <= 1) + P(X >= 2) = 1
  assert r.p_value_pairs == 1.0
  assert 0.0 <= r.ci_low <= r.win_rate <= r.ci_high <= 1.0 and r.ci_low < r.ci_high


def test_win_rate_bootstrap_resamples_pairs_not_votes():
  # one image pair with 3-of-4 votes for A: resampling the pair always gives 0.75 (a vote bootstrap would not)
  votes = [make_vote(p, "q", "A", "B", w) for p, w in zip("PQRS", "AABA")]
  r = sa.win_rates(votes, n_boot=200)[("A", "B")]
  assert r.win_rate == r.ci_low == r.ci_high == 0.75
  assert r.p_value == pytest.approx(stats.binomtest(3, 4).pvalue)  # 2 * 5 / 16 = 0.625
  assert r.p_value == pytest.approx(0.625)


def test_win_rate_all_ties_is_half_with_p_value_one():
  votes = [make_vote(p, f"q{k}", "A", "B", "tie") for p in "PQ" for k in range(3)]
  r = sa.win_rates(votes, n_boot=50)[("A", "B")]
  assert (r.win_rate, r.ci_low, r.ci_high, r.p_value, r.p_value_pairs) == (0.5, 0.5, 0.5, 1.0, 1.0)


def test_win_rate_recovers_simulated_preference_and_ci_shrinks():
  widths = []
  for n_pairs in (50, 400):
    votes = sa.simulate({("adapted", "base"): 0.7}, n_pairs, 10, seed=1, pair_spread=0.5)
    r = sa.win_rates(votes, n_boot=1000, seed=2)[("adapted", "base")]
    assert r.ci_low < 0.7 < r.ci_high and r.p_value < 1e-6
    widths.append(r.ci_high - r.ci_low)
  assert widths[1] < 0.5 * widths[0]  # 8x the pairs: about 1 / sqrt(8) = 0.35 the width


def test_cluster_bootstrap_is_wider_than_independent_votes_when_pairs_differ():
  # pairs whose own preference varies a lot (pair_spread 2 on the logit scale): the votes on a pair are correlated,
  # and the pair bootstrap's interval is wider than the binomial interval for 20 * 100 independent votes
  votes = sa.simulate({("a", "b"): 0.7}, 100, 20, seed=3, pair_spread=2.0)
  r = sa.win_rates(votes, n_boot=1000)[("a", "b")]
  independent = 2 * 1.96 * math.sqrt(r.win_rate * (1 - r.win_rate) / r.n_votes)
  assert r.ci_high - r.ci_low > 2 * independent


# ---------------------------------------------------------------------------------------- votes per pair (Fig. 8)


def test_votes_per_pair_fixture():
  pv = sa.votes_per_pair(fixture_votes(), "A")
  assert pv.pair_ids == ("q1", "q2", "q3", "q4") and pv.others == ("B",) * 4
  assert pv.votes_for.tolist() == [3, 1, 1, 1]
  assert pv.votes_against.tolist() == [0, 1, 2, 0]
  assert pv.ties.tolist() == [0, 1, 0, 1]
  assert pv.voters.tolist() == [3, 3, 3, 2]
  assert pv.histogram.tolist() == [0, 3, 0, 1]  # three pairs with 1 vote for A, one with 3
  # A has a strict majority on q1 only (3 > 1.5; 1 of 3, 1 of 3, 1 of 2 are not); B on q3 only (2 > 1.5)
  assert (pv.share_majority, pv.share_other_majority) == (0.25, 0.25)
  assert sa.votes_per_pair(fixture_votes(), "B").votes_for.tolist() == [0, 1, 2, 0]
  with pytest.raises(InputError, match="no comparison pair shows system 'C'"):
    sa.votes_per_pair(fixture_votes(), "C")
  with pytest.raises(InputError, match="against 'C'"):
    sa.votes_per_pair(fixture_votes(), "A", against="C")


def test_votes_per_pair_simulated_fig8():
  # 20 voters per pair, adapted preferred with p = 0.7: most pairs get more than 10 of 20 votes for it
  votes = sa.simulate({("adapted", "base"): 0.7, ("adapted", "other"): 0.5}, 100, 20, seed=4)
  pv = sa.votes_per_pair(votes, "adapted", against="base")
  assert len(pv.pair_ids) == 100 and set(pv.voters.tolist()) == {20} and pv.histogram.sum() == 100
  assert pv.histogram.shape == (21,)
  assert pv.share_majority == np.mean(pv.votes_for > 10) > 0.9
  assert pv.share_other_majority == np.mean(pv.votes_for < 10)
  assert pv.share_majority + pv.share_other_majority + np.mean(pv.votes_for == 10) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- Bradley-Terry


def bt_loglik(theta, wins):
  """sum_ij wins[i, j] log sigmoid(theta_i - theta_j): written directly, for scipy.optimize."""
  return sum(
    wins[i, j] * math.log(special.expit(theta[i] - theta[j]))
    for i in range(len(wins))
    for j in range(len(wins))
    if i != j
  )


def direct_fit(wins):
  """Mean-zero maximizer of `bt_loglik` by scipy.optimize.minimize (first strength held at 0)."""
  k = len(wins)

  def neg(free):
    return -bt_loglik(np.concatenate([[0.0], free]), wins)

  def grad(free):
    theta = np.concatenate([[0.0], free])
    p = special.expit(theta[:, None] - theta[None, :])
    g = wins.sum(1) - ((wins + wins.T) * p).sum(1)
    return -g[1:]

  res = optimize.minimize(neg, np.zeros(k - 1), jac=grad, method="BFGS", options={"gtol": 1e-11, "maxiter": 1000})
  theta = np.concatenate([[0.0], res.x])
  return theta - theta.mean()


# x vs y: x 5, y 3, 2 ties; x vs z: x 6, z 2, 1 tie; y vs z: y 4, z 4
THREE = {("x", "y"): (5, 3, 2), ("x", "z"): (6, 2, 1), ("y", "z"): (4, 4, 0)}
# wins with ties as halves: x>y 6, y>x 4, x>z 6.5, z>x 2.5, y>z 4, z>y 4
THREE_WINS = np.array([[0, 6, 6.5], [4, 0, 4], [2.5, 4, 0]])


@pytest.mark.parametrize("prior", [0.0, 0.1, 2.0])
def test_bradley_terry_matches_direct_maximization(prior):
  # one image pair per pair of systems (10 voters): every bootstrap replicate is the data itself, so prior=0 has a
  # finite fit in each (with several image pairs, a replicate may drop all of y's wins: next test)
  bt = sa.bradley_terry(votes_from_counts(THREE, voters=10), n_boot=20, prior=prior)
  assert bt.systems == ("x", "y", "z")
  compared = ~np.eye(3, dtype=bool)
  expected = direct_fit(THREE_WINS + prior / 2 * compared)
  np.testing.assert_allclose(bt.strength, expected, atol=1e-6)
  assert abs(bt.strength.sum()) < 1e-12
  np.testing.assert_allclose(bt.probability, special.expit(bt.strength[:, None] - bt.strength[None, :]))
  assert bt.n_votes.tolist() == [[0, 10, 9], [10, 0, 8], [9, 8, 0]]
  # observed win rates, ties as halves: x over y 6 / 10, x over z 6.5 / 9, y over z 4 / 8; diagonal masked
  np.testing.assert_allclose(bt.win_rate.filled(-1), [[-1, 0.6, 6.5 / 9], [0.4, -1, 0.5], [2.5 / 9, 0.5, -1]])
  assert (bt.ci_low <= bt.strength).all() and (bt.strength <= bt.ci_high).all()
  assert all_finite(bt.strength, bt.ci_low, bt.ci_high, bt.probability)


def test_bradley_terry_bootstrap_over_image_pairs():
  votes = votes_from_counts(THREE, voters=5)  # two image pairs per pair of systems
  bt = sa.bradley_terry(votes, n_boot=300)
  np.testing.assert_allclose(bt.strength, direct_fit(THREE_WINS + 0.05 * ~np.eye(3, dtype=bool)), atol=1e-6)
  assert (bt.ci_low < bt.strength).all() and (bt.strength < bt.ci_high).all()
  # without the prior, some replicates draw twice the image pair where x won all 5 votes (against y, or z), and then
  # y or z has no finite strength
  with pytest.raises(InputError, match=r"bootstrap replicate \d+: systems \[.+\] never win nor tie.*prior > 0"):
    sa.bradley_terry(votes, n_boot=300, prior=0.0)


def test_bradley_terry_two_systems_closed_form():
  # two systems: strength_A - strength_B = log(W_A / W_B) with W_A = 6 + 2 / 2 = 7, W_B = 3 + 2 / 2 = 4
  bt = sa.bradley_terry(fixture_votes(), n_boot=50, prior=0.0)
  np.testing.assert_allclose(bt.strength, [math.log(7 / 4) / 2, -math.log(7 / 4) / 2], atol=1e-12)
  bt = sa.bradley_terry(fixture_votes(), n_boot=50)  # the default prior adds 0.05 wins each way
  np.testing.assert_allclose(bt.strength[0] - bt.strength[1], math.log(7.05 / 4.05), atol=1e-12)


def test_bradley_terry_never_winning_system():
  table = {("x", "y"): (5, 3, 2), ("x", "z"): (6, 0, 0), ("y", "z"): (4, 0, 0)}  # z never wins nor ties
  with pytest.raises(InputError, match=r"\['z'\] never win nor tie.*prior > 0"):
    sa.bradley_terry(votes_from_counts(table), n_boot=10, prior=0.0)
  bt = sa.bradley_terry(votes_from_counts(table), n_boot=50)
  wins = np.array([[0, 6, 6], [4, 0, 4], [0, 0, 0]]) + 0.05 * ~np.eye(3, dtype=bool)
  np.testing.assert_allclose(bt.strength, direct_fit(wins), atol=1e-6)
  assert bt.strength.argmin() == 2 and bt.strength[2] < -3 and all_finite(bt.strength, bt.ci_low, bt.ci_high)


def test_bradley_terry_degenerate_inputs():
  with pytest.raises(InputError, match="never compared"):
    sa.bradley_terry(votes_from_counts({("a", "b"): (3, 2, 0), ("c", "d"): (2, 3, 0)}), n_boot=10)
  with pytest.raises(InputError, match="no votes"):
    sa.bradley_terry([], n_boot=10)
  with pytest.raises(InputError, match="n_boot"):
    sa.bradley_terry(fixture_votes(), n_boot=0)
  with pytest.raises(InputError, match="prior"):
    sa.bradley_terry(fixture_votes(), n_boot=10, prior=-1.0)
  ties = sa.bradley_terry(votes_from_counts({("a", "b"): (0, 0, 6), ("b", "c"): (0, 0, 4)}), n_boot=20, prior=0.0)
  np.testing.assert_allclose(ties.strength, 0.0, atol=1e-12)
  np.testing.assert_allclose([ties.ci_low, ties.ci_high], 0.0, atol=1e-12)
  assert ties.win_rate.mask.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_bradley_terry_orders_simulated_systems():
  truth = np.array([0.8, 0.0, -0.8])  # mean zero, like the fit
  names = ("s0", "s1", "s2")
  probs = {(names[i], names[j]): float(special.expit(truth[i] - truth[j])) for i in range(3) for j in range(i + 1, 3)}
  bt = sa.bradley_terry(sa.simulate(probs, 60, 10, seed=5), n_boot=200, seed=6)
  assert bt.systems == names and list(np.argsort(-bt.strength)) == [0, 1, 2]
  assert bt.ci_low[0] > bt.ci_high[1] and bt.ci_low[1] > bt.ci_high[2]  # the intervals separate the systems
  # the truth lies within one interval width (about 4 standard errors) of the estimate
  assert (np.abs(bt.strength - truth) < bt.ci_high - bt.ci_low).all()
  np.testing.assert_allclose(bt.strength, truth, atol=0.2)


# ------------------------------------------------------------------------------------------ agreement (Table 3)


def test_human_agreement_fixture():
  h = sa.human_agreement(fixture_votes())
  # agreement: same answer 1, tie vs a side 0.5, opposite sides 0; per participant, summed over (other, pair):
  #   P1: q1 1 + 1, q2 (A vs B 0, A vs tie 0.5), q3 (B vs B 1, B vs A 0), q4 (tie vs A 0.5) = 4 over 7 = 4/7
  #   P2: q1 1 + 1, q2 (B vs A 0, B vs tie 0.5), q3 (B vs B 1, B vs A 0), q4 (A vs tie 0.5) = 4 over 7 = 4/7
  #   P3: q1 1 + 1, q2 (tie vs A 0.5, tie vs B 0.5), q3 (A vs B 0 + 0)                    = 3 over 6 = 1/2
  assert h.per_participant == pytest.approx({"P1": 4 / 7, "P2": 4 / 7, "P3": 1 / 2}, abs=1e-15)
  assert h.n_comparisons == {"P1": 7, "P2": 7, "P3": 6}
  # mean (4/7 + 4/7 + 1/2) / 3 = 23/42; deviations 1/42, 1/42, -2/42: std = sqrt(6 / 3) / 42 = 1 / sqrt(882)
  assert h.mean == pytest.approx(23 / 42, abs=1e-15)
  assert h.std == pytest.approx(1 / math.sqrt(882), abs=1e-15)
  assert h.excluded == ()


def test_human_agreement_isolated_participant_is_excluded():
  votes = fixture_votes() + [make_vote("P4", "q5", "A", "B", "B")]  # nobody else voted on q5
  h = sa.human_agreement(votes)
  assert h.excluded == ("P4",) and "P4" not in h.per_participant
  assert h.mean == pytest.approx(23 / 42, abs=1e-15)
  with pytest.raises(InputError, match="no two participants voted on one pair"):
    sa.human_agreement([make_vote("P", "q1", "A", "B", "A"), make_vote("Q", "q2", "A", "B", "A")])


def test_human_agreement_all_ties_is_one():
  votes = [make_vote(p, f"q{k}", "A", "B", "tie") for p in "PQR" for k in range(2)]
  h = sa.human_agreement(votes)
  assert (h.mean, h.std) == (1.0, 0.0)


SCORES = {  # model picks: q1 A (0.9 > 0.1), q2 B, q3 tie (equal), q4 A
  "A/q1.png": 0.9,
  "B/q1.png": 0.1,
  "A/q2.png": 0.2,
  "B/q2.png": 0.8,
  "A/q3.png": 0.5,
  "B/q3.png": 0.5,
  "A/q4.png": 0.7,
  "B/q4.png": 0.3,
}


def test_model_agreement_fixture():
  m = sa.model_agreement(fixture_votes(), SCORES)
  # P1: q1 A=A 1, q2 A vs B 0, q3 B vs tie 0.5, q4 tie vs A 0.5 = 2 / 4
  # P2: q1 1, q2 B=B 1, q3 B vs tie 0.5, q4 A=A 1 = 3.5 / 4
  # P3: q1 1, q2 tie vs B 0.5, q3 A vs tie 0.5 = 2 / 3
  assert m.per_participant == pytest.approx({"P1": 0.5, "P2": 0.875, "P3": 2 / 3}, abs=1e-15)
  assert m.n_comparisons == {"P1": 4, "P2": 4, "P3": 3}
  # mean (36 + 63 + 48) / 72 / 3 = 49/72; deviations -13/72, 14/72, -1/72: std = sqrt(366 / 3) / 72
  assert m.mean == pytest.approx(49 / 72, abs=1e-15)
  assert m.std == pytest.approx(math.sqrt(366 / 3) / 72, abs=1e-15)


def test_model_agreement_needs_every_score():
  with pytest.raises(InputError, match="no model score for image 'B/q4.png'"):
    sa.model_agreement(fixture_votes(), {k: v for k, v in SCORES.items() if k != "B/q4.png"})
  with pytest.raises(InputError, match="is nan"):
    sa.model_agreement(fixture_votes(), dict(SCORES, **{"A/q1.png": float("nan")}))


def test_fleiss_kappa_fixture():
  k = sa.fleiss_kappa(fixture_votes())
  # pairs with 3 votes (q4 has 2: dropped), counts [A, B, tie]: q1 [3, 0, 0], q2 [1, 1, 1], q3 [1, 2, 0]
  # P_i = (sum n_ij^2 - 3) / 6: 1, 0, 1/3 -> P_o = 4/9; p_j = 5/9, 3/9, 1/9 -> P_e = 35/81
  # kappa = (36/81 - 35/81) / (46/81) = 1/46
  assert (k.raters, k.n_items, k.n_dropped) == (3, 3, 1)
  assert k.p_observed == pytest.approx(4 / 9, abs=1e-15) and k.p_expected == pytest.approx(35 / 81, abs=1e-15)
  assert k.kappa == pytest.approx(1 / 46, abs=1e-15)
  k2 = sa.fleiss_kappa(fixture_votes(), raters=2)  # q4 only: [1, 0, 1] -> P_o 0, P_e 1/2 -> kappa -1
  assert (k2.n_items, k2.kappa) == (1, -1.0)


def test_fleiss_kappa_vs_statsmodels():
  inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
  assert sa.fleiss_kappa(fixture_votes()).kappa == pytest.approx(
    inter_rater.fleiss_kappa(np.array([[3, 0, 0], [1, 1, 1], [1, 2, 0]])), abs=1e-12
  )
  votes = sa.simulate({("a", "b"): 0.7, ("a", "c"): 0.6}, 40, 7, seed=7, tie_prob=0.2, pair_spread=1.0)
  table = np.zeros((80, 3))
  pairs = sorted({v.pair_id for v in votes})
  for v in votes:
    table[pairs.index(v.pair_id), sa.label(v)] += 1
  assert sa.fleiss_kappa(votes).kappa == pytest.approx(inter_rater.fleiss_kappa(table), abs=1e-12)


def test_fleiss_kappa_degenerate():
  with pytest.raises(InputError, match="one category"):
    sa.fleiss_kappa([make_vote(p, f"q{k}", "A", "B", "tie") for p in "PQ" for k in range(3)])
  with pytest.raises(InputError, match="at least 2 votes"):
    sa.fleiss_kappa([make_vote("P", "q1", "A", "B", "A"), make_vote("Q", "q2", "A", "B", "A")])
  with pytest.raises(InputError, match="no pair has exactly 5 votes"):
    sa.fleiss_kappa(fixture_votes(), raters=5)


def test_krippendorff_alpha_fixture():
  a = sa.krippendorff_alpha(fixture_votes())
  # coincidences o_ck = sum_u (n_uc n_uk - [c == k] n_uc) / (m_u - 1), categories A, B, tie:
  #   q1 [3, 0, 0]: o_AA += 6/2;  q2 [1, 1, 1]: every off-diagonal += 1/2;  q3 [1, 2, 0]: o_BB += 2/2, o_AB += 2/2;
  #   q4 [1, 0, 1]: o_At += 1.    o = [[3, 1.5, 1.5], [1.5, 1, 0.5], [1.5, 0.5, 0]], n_c = 6, 3, 2, n = 11
  # alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k = 1 - 10 * 7 / 72 = 1/36
  assert (a.n_units, a.n_values) == (4, 11)
  assert a.alpha == pytest.approx(1 / 36, abs=1e-15)
  assert a.d_observed == pytest.approx(7 / 11, abs=1e-15) and a.d_expected == pytest.approx(72 / 110, abs=1e-15)


def reliability_matrix(votes):
  """(participants, pairs) system-invariant labels, NaN where a participant did not vote: the package's input."""
  people = sorted({v.participant for v in votes})
  pairs = sorted({v.pair_id for v in votes})
  matrix = np.full((len(people), len(pairs)), np.nan)
  for v in votes:
    matrix[people.index(v.participant), pairs.index(v.pair_id)] = sa.label(v)
  return matrix


def test_krippendorff_alpha_vs_package():
  krippendorff = pytest.importorskip("krippendorff")
  assert sa.krippendorff_alpha(fixture_votes()).alpha == pytest.approx(
    krippendorff.alpha(reliability_matrix(fixture_votes()), level_of_measurement="nominal"), abs=1e-12
  )
  for seed in range(5):  # random subsets of 12 participants vote on each pair: many missing values, some lone votes
    votes = sa.simulate(
      {("a", "b"): 0.7, ("b", "c"): 0.4}, 25, 12, seed=seed, raters_per_pair=2 + seed % 3, tie_prob=0.25
    )
    votes += [make_vote("lone", "only-one", "a", "c", "a")]  # a pair with one vote: not pairable
    ours = sa.krippendorff_alpha(votes)
    theirs = krippendorff.alpha(reliability_matrix(votes), level_of_measurement="nominal")
    assert ours.n_units == 50 and abs(ours.alpha - theirs) <= 1e-12


def test_krippendorff_alpha_degenerate():
  with pytest.raises(InputError, match="no unit has two values"):
    sa.krippendorff_alpha([make_vote("P", "q1", "A", "B", "A"), make_vote("Q", "q2", "A", "B", "B")])
  with pytest.raises(InputError, match="one category"):
    sa.krippendorff_alpha([make_vote(p, f"q{k}", "A", "B", "tie") for p in "PQ" for k in range(3)])


# ----------------------------------------------------------------------------------------------- attention checks


def test_check_failures_with_expected_answers():
  broken = dict(is_check=True, expected="right")  # the left image is deliberately broken
  votes = fixture_votes() + [
    Vote("P1", "c1", "A", "A", "A/c1.png", "A/c1.png", "tie", is_check=True),  # identical images: expects tie
    Vote("P2", "c1", "A", "A", "A/c1.png", "A/c1.png", "left", is_check=True),  # failed
    Vote("P1", "c2", "A", "B", "A/broken.png", "B/c2.png", "right", **broken),
    Vote("P2", "c2", "A", "B", "A/broken.png", "B/c2.png", "left", **broken),  # failed
  ]
  records = sa.check_failures(votes)
  assert records == {"P1": sa.CheckRecord(2, 0), "P2": sa.CheckRecord(2, 2), "P3": sa.CheckRecord(0, 0)}
  kept = sa.exclude_failed(votes)
  assert {v.participant for v in kept} == {"P1", "P3"}
  assert len(sa.exclude_failed(votes, max_failures=2)) == len(votes)
  # the checks are left out of every other statistic
  assert sa.win_rates(votes, n_boot=10)[("A", "B")].n_votes == 11
  with pytest.raises(InputError, match="two different images and has no expected answer"):
    sa.check_failures([Vote("P", "c", "A", "B", "A/1.png", "B/1.png", "left", is_check=True)])


def test_simulated_careless_participants_fail_checks():
  votes = sa.simulate({("a", "b"): 0.8}, 30, 20, seed=8, n_checks=6, careless=0.3)
  records = sa.check_failures(votes)
  failing = {p for p, r in records.items() if r.failed}
  assert all(r.seen == 6 for r in records.values()) and 2 <= len(failing) <= 10
  kept = sa.exclude_failed(votes)
  assert {v.participant for v in kept} == set(records) - failing
  before = sa.win_rates(votes, n_boot=10)[("a", "b")].win_rate
  after = sa.win_rates(kept, n_boot=10)[("a", "b")].win_rate
  assert abs(after - 0.8) < abs(before - 0.8)  # random answers pull the win rate toward 0.5


# --------------------------------------------------------------------------------------------- everything finite


def test_all_statistics_are_finite_on_a_simulated_study():
  votes = sa.simulate(
    {("a", "b"): 0.7, ("a", "c"): 0.9, ("b", "c"): 0.6}, 20, 8, seed=9, raters_per_pair=4, tie_prob=0.1, n_checks=2
  )
  images = sorted({v.image_left for v in votes} | {v.image_right for v in votes})
  scores = dict(zip(images, np.random.default_rng(10).integers(0, 5, len(images)).astype(float)))  # some equal
  for r in sa.win_rates(votes, n_boot=50).values():
    assert all_finite(r.win_rate, r.ci_low, r.ci_high, r.p_value, r.p_value_pairs)
  bt = sa.bradley_terry(votes, n_boot=30)
  assert all_finite(bt.strength, bt.ci_low, bt.ci_high, bt.probability, bt.win_rate.filled(0))
  for agreement in (sa.human_agreement(votes), sa.model_agreement(votes, scores)):
    assert all_finite(agreement.mean, agreement.std, list(agreement.per_participant.values()))
  assert all_finite(sa.fleiss_kappa(votes).kappa, sa.krippendorff_alpha(votes).alpha)
