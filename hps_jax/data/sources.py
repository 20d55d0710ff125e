"""Opening a preference dataset by name as a random-access source of records: `synthetic` (generated on the fly)
or one of the TFDS builders of `hps_jax.data.datasets` prepared from a local download; `limit` takes a prefix,
`concat` joins splits. Bad names and missing downloads raise `InputError` (a ValueError) naming them; what the
builders read from a download is checked by `hps_jax.data.datasets`."""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path

from hps_jax.data.synthetic import SyntheticPreference
from hps_jax.errors import InputError

DATASETS = ("hpd_v1", "hpd_v2", "pickapic", "preference_jsonl")  # TFDS builders in hps_jax.data.datasets


def open_source(
  dataset: str,
  split: str,
  *,
  manual_dir: str = "",
  data_dir: str = "",
  builder_config: str = "",
  seed: int = 0,
  synthetic_size: int = 200,
  synthetic_image_size: int = 48,
):
  """`synthetic` (generated on the fly; the split name seeds it) or a TFDS builder prepared from `manual_dir`."""
  if dataset == "synthetic":
    return SyntheticPreference(synthetic_size, seed=seed, split=split, image_size=synthetic_image_size)
  if dataset not in DATASETS:
    raise InputError(f"unknown dataset {dataset!r}: synthetic or one of {sorted(DATASETS)}")
  try:
    from hps_jax.data.datasets import data_source
  except ImportError as e:
    raise InputError(f"dataset {dataset!r} is read through TFDS: pip install 'hps_jax[data]' ({e})") from e
  if not manual_dir:
    raise InputError(f"dataset {dataset!r} needs its local download directory (manual_dir)")
  return data_source(dataset, split, manual_dir, data_dir or str(Path(manual_dir) / "tfds_prepared"), builder_config)


def limit(source, n: int):
  """The first n records of a source (n <= 0: all)."""
  if n <= 0 or n >= len(source):
    return source
  return _Prefix(source, n)


class _Prefix:
  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def concat(sources):
  """The records of several sources one after the other (one source: itself)."""
  return sources[0] if len(sources) == 1 else _Concat(sources)


class _Concat:
  def __init__(self, sources):
    self.sources = list(sources)
    self.ends = list(itertools.accumulate(len(s) for s in self.sources))

  def __len__(self):
    return self.ends[-1] if self.ends else 0

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    k = bisect.bisect_right(self.ends, i)
    return self.sources[k][i - (self.ends[k - 1] if k else 0)]
