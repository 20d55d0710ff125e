"""`python -m tests.hostile.survey --out FILE.json [--repo TREE]`: every corpus case run and classified (kept its
promise, traceback, wrong exit code, impossible number at exit 0/1, memory over the cap, file written outside the
output root, hang), with a table per input class. With --repo, the CLI of another checkout runs (e.g. a worktree of
an earlier commit with tests/hostile copied in), which is how the closing note's before/after table was measured."""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTCOMES = (
  "kept",
  "right exit, other words",
  "traceback",
  "wrong exit",
  "impossible number",
  "memory",
  "outside write",
  "hang",
  "other",
)


def classify(message: str) -> str:
  for needle, outcome in (
    ("a traceback on stderr", "traceback"),
    ("non-finite number", "impossible number"),
    ("is impossible", "impossible number"),
    ("peak resident memory", "memory"),
    ("files written outside", "outside write"),
    ("TimeoutExpired", "hang"),
    ("exit ", "wrong exit"),
    ("does not match", "right exit, other words"),
    ("exactly one error line", "right exit, other words"),
  ):
    if needle in message:
      return outcome
  return "other"


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", required=True)
  p.add_argument("--repo", help="checkout whose CLI runs (default: this one)")
  args = p.parse_args()
  if args.repo:
    os.environ["HOSTILE_REPO"] = str(Path(args.repo).resolve())
  from tests.hostile import harness
  from tests.hostile.corpus import CASES

  harness.TIMEOUT = 120
  root = Path(tempfile.mkdtemp(prefix="hostile-survey-"))
  assets = harness.build_assets(root / "assets", inception=True)
  results = []
  for i, case in enumerate(CASES):
    t0 = time.time()
    try:
      harness.run_case(case, assets, root / f"{i:03d}-{case.name}")
      outcome, why = "kept", ""
    except subprocess.TimeoutExpired as e:
      outcome, why = "hang", str(e)[:300]
    except BaseException as e:  # noqa: BLE001  (an assertion of the harness, or pytest.fail)
      outcome, why = classify(f"{type(e).__name__}: {e}"), str(e).splitlines()[0][:300]
    results.append({"case": case.name, "class": case.cls, "outcome": outcome, "why": why, "s": time.time() - t0})
    print(f"{i + 1}/{len(CASES)} {case.cls:12s} {case.name:45s} {outcome}", file=sys.stderr, flush=True)
  table = collections.defaultdict(collections.Counter)
  for r in results:
    table[r["class"]][r["outcome"]] += 1
  Path(args.out).write_text(json.dumps({"results": results, "table": table}, indent=2) + "\n")
  print("| class | cases | " + " | ".join(OUTCOMES) + " |")
  print("|---|---|" + "---|" * len(OUTCOMES))
  for cls, counts in sorted(table.items()):
    print(f"| {cls} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
  total = collections.Counter(r["outcome"] for r in results)
  print(f"| all | {len(results)} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
