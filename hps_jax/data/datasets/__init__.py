"""TFDS builders for the human preference datasets, stored as ArrayRecord with images as encoded bytes.

Four builders read a local copy of a dataset (`manual_dir`; nothing is downloaded) and write ArrayRecord files that
`builder.as_data_source(split)` reads back with random access and without TensorFlow, one module each:

* ``hpd_v1``: the Human Preference Dataset of HPS v1 (Wu et al., ICCV 2023).
* ``hpd_v2``: HPDv2, the dataset of HPS v2 (Wu et al., 2023).
* ``pickapic``: Pick-a-Pic v1 / v2 (Kirstain et al., NeurIPS 2023) parquet files; configs ``pickapic/default``
  (ties excluded) and ``pickapic/with_ties``.
* ``preference_jsonl``: our generic format, ``{split}.jsonl`` files next to the images (see `PreferenceJsonl`).

`core` holds what they share: the record schema, validation, bad-record reports (see its docstring) and the entry
points, re-exported here: `prepare` (build once, reuse after) and `data_source` (the records of one split).
Importing this package registers the four builders, with TFDS and in `BUILDERS`.
"""

from hps_jax.data.datasets.core import (
  BAD_KINDS,
  BUILDERS,
  MAX_EXAMPLES,
  REPORT_NAME,
  SKIP_KINDS,
  BadRecord,
  BadRecordLog,
  PreferenceSource,
  bad_record_report,
  data_source,
  prepare,
  to_record,
)
from hps_jax.data.datasets.hpd_v1 import HpdV1
from hps_jax.data.datasets.hpd_v2 import HpdV2
from hps_jax.data.datasets.pickapic import Pickapic, PickapicConfig
from hps_jax.data.datasets.preference_jsonl import PreferenceJsonl

__all__ = [
  "BUILDERS",
  "BAD_KINDS",
  "SKIP_KINDS",
  "MAX_EXAMPLES",
  "REPORT_NAME",
  "BadRecord",
  "BadRecordLog",
  "HpdV1",
  "HpdV2",
  "Pickapic",
  "PickapicConfig",
  "PreferenceJsonl",
  "PreferenceSource",
  "bad_record_report",
  "data_source",
  "prepare",
  "to_record",
]
