"""One process of tests/test_multiprocess.py: runs `hps-jax train-preference` (one or more times, in this process)
and records which training records this process consumed.

  python tests/mp_worker.py RECORD_FILE RUNS_JSON

RUNS_JSON is a JSON list of argument lists, each passed to `hps_jax.cli.main` in turn (a later one with the same
--workdir resumes from the earlier one's checkpoint). Each batch this process takes from its data iterator appends
one JSON line to RECORD_FILE.pPROCESS_INDEX.jsonl: the indices of its records in the synthetic train split, in row
order. The multi-process settings come from the environment (HPS_COORDINATOR, HPS_NUM_PROCESSES, HPS_PROCESS_ID).
"""

import json
import sys

import grain
import numpy as np


class WithRecordIndex:
  """The preference transform, plus the record's index in its split (synthetic ids are 'SPLIT-INDEX')."""

  def __init__(self, transform):
    self.transform = transform

  def __call__(self, record):
    out = self.transform(record)
    out["record_index"] = np.int64(str(record["id"]).rsplit("-", 1)[-1])
    return out


class Recorder:
  """Applied after the prefetch, i.e. in the consuming thread, once per batch the train loop actually takes."""

  def __init__(self, path):
    self.path = path

  def __call__(self, batch):
    import jax

    with open(f"{self.path}.p{jax.process_index()}.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps(batch["record_index"].tolist()) + "\n")
    return batch


def main(record_file: str, runs: list[list[str]]) -> int:
  from hps_jax import cli
  from hps_jax.data import pipeline
  from hps_jax.preference import train as tr

  make_transform = tr.make_transform
  tr.make_transform = lambda *a, **k: WithRecordIndex(make_transform(*a, **k))

  def to_iterator(ds, *, prefetch_threads=4, prefetch_buffer=8):
    options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=prefetch_buffer)
    return iter(ds.to_iter_dataset(options).map(Recorder(record_file)))

  pipeline.to_iterator = to_iterator

  for argv in runs:
    sys.argv = ["hps-jax", *argv]  # ml_collections reads --config.* overrides from sys.argv, not from main's argv
    code = cli.main(argv)
    sys.stdout.flush()
    if code:
      return code
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
