"""`hps_jax.preference.evaluate` on a hand-computed fixture: n-way accuracy (strict unique top; a tie for the top is
wrong), the random-guess expectation (mean of 1/n), pairwise accuracy (pairs with different ranks; score ties count
half), the per-n breakdown, rank ties, error cases, and the markdown table."""

import math

import numpy as np
import pytest

from hps_jax.preference.evaluate import markdown_table, preference_report

# Six prompts; ranks: lower = better. For each: n-way verdict, then every pair whose ranks differ.
SCORES = [
  [0.2, 0.8],  # A n=2: best is image 1 (rank 0) and it scores highest              -> correct
  #        (0,1) right                                                  -> 1 of 1
  [0.5, 0.5, 0.1],  # B n=3: best 0 ties for the top with image 1                         -> wrong
  #        (0,1) score tie 0.5, (0,2) right, (1,2) right               -> 2.5 of 3
  [0.1, 0.9, 0.5],  # C n=3: ranks tie for best {0, 1}; image 1 is the unique top         -> correct
  #        (0,1) same rank: no pair; (0,2) wrong; (1,2) right          -> 1 of 2
  [0.4, 0.3, 0.2, 0.1],  # D n=4: fully reversed (best is image 3, lowest score)               -> wrong
  #        all 6 pairs differ in rank, all wrong                        -> 0 of 6
  [0.0, 0.0, 0.0, 0.0],  # E n=4: constant scores: a 4-way tie for the top                     -> wrong
  #        (0,1) (0,2) (0,3) ties 0.5 each; (1,2) (1,3) (2,3) same rank -> 1.5 of 3
  [0.3, 0.3],  # F n=2: both rank 0, but the top is a tie, so no unique choice       -> wrong
  #        no pair with different ranks                                 -> 0 of 0
]
RANKS = [[1, 0], [0, 1, 2], [0, 0, 1], [3, 2, 1, 0], [0, 1, 1, 1], [0, 0]]
# all: correct A, C = 2 of 6; random (1/2 + 1/3 + 1/3 + 1/4 + 1/4 + 1/2) / 6 = 13/36;
#      pairs 1 + 3 + 2 + 6 + 3 + 0 = 15, right 1 + 2.5 + 1 + 0 + 1.5 + 0 = 6 -> 6/15 = 0.4
# n=2 (A, F): 1 of 2 correct, random 1/2, pairwise 1 of 1
# n=3 (B, C): 1 of 2 correct, random 1/3, pairwise 3.5 of 5 = 0.7
# n=4 (D, E): 0 of 2 correct, random 1/4, pairwise 1.5 of 9 = 1/6


def _report(scores=SCORES, ranks=RANKS):
  return preference_report([np.asarray(s) for s in scores], [np.asarray(r) for r in ranks])


def test_overall_numbers():
  rep = _report()
  assert rep["num_prompts"] == 6
  assert rep["accuracy"] == 2 / 6
  # 1/3 is not exact in binary and the sum runs in a different order than here: equal to the last ulp or so.
  assert rep["random_expectation"] == pytest.approx(13 / 36, rel=1e-15, abs=0)
  assert rep["num_pairs"] == 15
  assert rep["pairwise_accuracy"] == 6 / 15


def test_per_n_breakdown():
  per_n = _report()["per_n"]
  assert list(per_n) == ["2", "3", "4"]  # sorted by n, string keys (JSON-friendly)
  assert per_n["2"] == {
    "accuracy": 0.5,
    "random_expectation": 0.5,
    "pairwise_accuracy": 1.0,
    "num_prompts": 2,
    "num_pairs": 1,
  }
  assert per_n["3"]["accuracy"] == 0.5 and per_n["3"]["num_prompts"] == 2 and per_n["3"]["num_pairs"] == 5
  assert per_n["3"]["random_expectation"] == pytest.approx(1 / 3, rel=1e-15, abs=0)
  assert per_n["3"]["pairwise_accuracy"] == 3.5 / 5
  assert per_n["4"] == {
    "accuracy": 0.0,
    "random_expectation": 0.25,
    "pairwise_accuracy": 1.5 / 9,
    "num_prompts": 2,
    "num_pairs": 9,
  }
  # the overall numbers are the prompt-weighted combination of the groups
  assert sum(g["num_prompts"] for g in per_n.values()) == 6 and sum(g["num_pairs"] for g in per_n.values()) == 15


def test_order_and_input_types_do_not_matter():
  rep = _report()
  perm = [4, 0, 5, 2, 1, 3]
  shuffled = _report([SCORES[k] for k in perm], [RANKS[k] for k in perm])
  assert shuffled["accuracy"] == rep["accuracy"] and shuffled["pairwise_accuracy"] == rep["pairwise_accuracy"]
  assert shuffled["per_n"] == rep["per_n"]
  # permuting the images inside every prompt (scores and ranks together) changes nothing either
  rng = np.random.default_rng(0)
  ps = [rng.permutation(len(s)) for s in SCORES]
  inner = _report([np.asarray(s)[p] for s, p in zip(SCORES, ps)], [np.asarray(r)[p] for r, p in zip(RANKS, ps)])
  assert inner["per_n"] == rep["per_n"]
  # plain lists and integer scores work
  lists = preference_report([[1, 3], [2, 2, 0]], [[1, 0], [0, 1, 2]])
  assert lists["accuracy"] == 0.5 and lists["pairwise_accuracy"] == 3.5 / 4


def test_top_tie_is_wrong_but_lower_ties_are_harmless():
  # chosen (rank 0) is the unique top; images 1 and 2 tie below it -> correct, pairs: 2 right + 1 tie-in-score
  # pair (1, 2) only if their ranks differ: ranks 1 and 2 -> 0.5. 2.5 of 3.
  rep = preference_report([np.array([0.9, 0.2, 0.2])], [np.array([0, 1, 2])])
  assert rep["accuracy"] == 1.0 and rep["pairwise_accuracy"] == 2.5 / 3
  # the same scores raised to tie at the top -> wrong, although the chosen image is among the tied top
  rep = preference_report([np.array([0.9, 0.9, 0.2])], [np.array([0, 1, 2])])
  assert rep["accuracy"] == 0.0 and rep["pairwise_accuracy"] == 2.5 / 3


def test_rank_ties_for_best():
  # three images share the best rank: any of them as the unique top is correct
  ranks = np.array([0, 0, 0, 1])
  for top in range(3):
    s = np.zeros(4)
    s[top] = 1.0
    assert preference_report([s], [ranks])["accuracy"] == 1.0
  assert preference_report([np.array([0.0, 0.0, 0.0, 1.0])], [ranks])["accuracy"] == 0.0
  # all ranks equal: every n-way top is "best", there are no pairs -> pairwise is NaN, not 0 or 1
  rep = preference_report([np.array([0.1, 0.7]), np.array([0.5, 0.2, 0.3])], [np.array([2, 2]), np.array([0, 0, 0])])
  assert rep["accuracy"] == 1.0 and rep["num_pairs"] == 0 and math.isnan(rep["pairwise_accuracy"])
  assert math.isnan(rep["per_n"]["2"]["pairwise_accuracy"])


def test_perfect_constant_and_reversed_scorers():
  ranks = [np.asarray(r) for r in RANKS if len(set(r)) > 1]  # prompts that have at least one pair
  perfect = preference_report([-r.astype(float) for r in ranks], ranks)
  reversed_ = preference_report([r.astype(float) for r in ranks], ranks)
  constant = preference_report([np.zeros(len(r)) for r in ranks], ranks)
  # C's ranks [0, 0, 1] with scores -ranks tie at the top -> wrong; the other four are right
  assert perfect["accuracy"] == 4 / 5 and perfect["pairwise_accuracy"] == 1.0
  assert reversed_["accuracy"] == 0.0 and reversed_["pairwise_accuracy"] == 0.0
  assert constant["accuracy"] == 0.0 and constant["pairwise_accuracy"] == 0.5  # not 1/n: a tie is no choice


def test_errors():
  with pytest.raises(ValueError, match="2 score groups but 1 rank groups"):
    preference_report([np.zeros(2), np.zeros(2)], [np.zeros(2)])
  with pytest.raises(ValueError, match=">= 2 images"):
    preference_report([np.array([1.0])], [np.array([0])])
  with pytest.raises(ValueError, match=">= 2 images"):
    preference_report([np.zeros(0)], [np.zeros(0)])
  with pytest.raises(ValueError, match=">= 2 images"):  # one score per rank
    preference_report([np.array([0.1, 0.2, 0.3])], [np.array([0, 1])])
  with pytest.raises(ValueError, match=">= 2 images"):  # one prompt is one 1-D group
    preference_report([np.zeros((2, 2))], [np.zeros((2, 2))])
  with pytest.raises(ValueError, match=">= 2 images"):
    preference_report([np.float64(0.5)], [np.int32(0)])
  with pytest.raises(ValueError, match="no prompts"):
    preference_report([], [])


def test_markdown_table():
  rep = _report()
  table = markdown_table(rep, "fixture")
  lines = table.splitlines()
  assert lines[0] == "### fixture" and lines[1] == ""
  assert lines[2] == "| subset | prompts | accuracy | random guess | pairwise accuracy |"
  assert lines[4:] == [
    "| all | 6 | 0.3333 | 0.3611 | 0.4000 |",
    "| n=2 | 2 | 0.5000 | 0.5000 | 1.0000 |",
    "| n=3 | 2 | 0.5000 | 0.3333 | 0.7000 |",
    "| n=4 | 2 | 0.0000 | 0.2500 | 0.1667 |",
  ]
  assert table.endswith("\n")
  untitled = markdown_table(rep)
  assert not untitled.startswith("###") and untitled.startswith("| subset |")
  no_pairs = markdown_table(preference_report([np.array([0.1, 0.7])], [np.array([0, 0])]))
  assert "| all | 1 | 1.0000 | 0.5000 | nan |" in no_pairs
