"""The corpus covers every class the error contract names, with at least 150 cases in all."""

import collections

from tests.hostile.corpus import CASES

CLASSES = ("arguments", "images", "jsonl", "checkpoints", "configs", "archives", "stats", "faults")


def test_corpus_size_and_classes():
  counts = collections.Counter(c.cls for c in CASES)
  assert set(counts) == set(CLASSES), counts
  assert sum(counts.values()) >= 150, counts
  assert all(counts[c] >= 5 for c in CLASSES), counts
  assert len({c.name for c in CASES}) == len(CASES)
  assert sum(c.memory for c in CASES) >= 10  # the bomb / hostile-size cases measured against the memory cap
