"""The jsonl cases of the hostile-input corpus (tests/hostile/corpus.py), each through the real CLI in a subprocess."""

import pytest

from tests.hostile.corpus import CASES
from tests.hostile.harness import run_case


@pytest.mark.parametrize("case", [c for c in CASES if c.cls == "jsonl"], ids=lambda c: c.name)
def test_jsonl(case, hostile_assets, tmp_path):
  run_case(case, hostile_assets, tmp_path)
