"""``pickapic``: Pick-a-Pic v1 / v2 (Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for
Text-to-Image Generation", NeurIPS 2023), from the parquet files of its Hugging Face dataset repository.

On disk (manual_dir): ``<split>-*.parquet`` (or ``<split>.parquet``) files in ``manual_dir/data/`` or in
manual_dir itself, each row a caption, two JPEGs and their labels; every split found is built. Configs
``pickapic/default`` (ties excluded) and ``pickapic/with_ties``. The exact conventions: `Pickapic`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import tensorflow_datasets as tfds

from hps_jax.data.datasets.core import (
  _SPLIT_NAME,
  BadRecord,
  _Candidate,
  _located,
  _missing_error,
  _PreferenceBuilder,
  _register,
)

__all__ = ["Pickapic", "PickapicConfig"]

_PARQUET_BATCH = 32  # parquet rows read at a time (Pick-a-Pic rows hold two full-size JPEGs)


@dataclasses.dataclass(eq=False)
class PickapicConfig(tfds.core.BuilderConfig):
  """include_ties: keep 0.5 / 0.5 rows as ties (ranks [0, 0], chosen 0) instead of skipping them."""

  include_ties: bool = False


@_register
class Pickapic(_PreferenceBuilder):
  """Pick-a-Pic (Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation",
  NeurIPS 2023), v1 or v2, from its parquet files.

  Layout of manual_dir (a snapshot of the Hugging Face dataset repository, e.g. yuvalkirstain/pickapic_v2)::

      data/train-00000-of-00645-<hash>.parquet
      data/validation-00000-of-00001-<hash>.parquet
      data/validation_unique-00000-of-00001-<hash>.parquet
      data/test-...parquet, data/test_unique-...parquet

  Convention: the parquet files are those in manual_dir/data/ if it holds any, else those directly in manual_dir;
  a file's split is its name up to the first "-" (``train-00000-of-00645.parquet`` and ``train.parquet`` are
  both train; ``validation_unique-*`` is the split validation_unique, not validation). Every split found is built;
  rows keep the order of the sorted file names, then the file's row order.

  Columns read: caption, jpg_0, jpg_1 (image bytes), label_0, label_1 (1/0, 0/1, or 0.5/0.5 for a tie), and when
  present has_label, are_different and ranking_id (the record id; else "<split>-<row index in the split>").
  Rows with has_label false (or no labels) are skipped as ``unlabeled``, with are_different false as
  ``not_different``, and ties as ``tie`` unless the config is ``with_ties``; other label values are ``bad_label``.
  Rows are read in batches (pyarrow), never a whole file at once.
  """

  name = "pickapic"
  VERSION = tfds.core.Version("1.1.0")
  BUILDER_CONFIGS = [
    PickapicConfig(name="default", include_ties=False, description="ties (0.5 / 0.5) are skipped"),
    PickapicConfig(name="with_ties", include_ties=True, description="ties are kept with ranks [0, 0] and chosen 0"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  HOMEPAGE = "https://huggingface.co/datasets/yuvalkirstain/pickapic_v2"
  CITATION = """@inproceedings{kirstain2023pickapic,
  title={Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation},
  author={Kirstain, Yuval and Polyak, Adam and Singer, Uriel and Matiana, Shahbuland and Penna, Joe and
  Levy, Omer}, booktitle={NeurIPS}, year={2023}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download the Pick-a-Pic parquet files (e.g. `huggingface-cli download
  yuvalkirstain/pickapic_v2 --repo-type dataset --local-dir MANUAL_DIR`): manual_dir/data/ (or manual_dir itself)
  must hold files named <split>-*.parquet or <split>.parquet."""
  REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
  OPTIONAL_COLUMNS = ("has_label", "are_different", "ranking_id", "user_id")

  def split_sources(self, manual_dir) -> dict[str, list[Path]]:
    import pyarrow.parquet as pq

    manual_dir = Path(manual_dir)
    folder = manual_dir / "data"
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
      files = sorted(manual_dir.glob("*.parquet")) if manual_dir.is_dir() else []
    if not files:
      raise _missing_error(
        self.name,
        manual_dir,
        ["parquet files"],
        "<split>-*.parquet or <split>.parquet files in manual_dir/data/ or manual_dir",
      )
    splits: dict[str, list[Path]] = {}
    for f in files:
      split = f.name[: -len(".parquet")].split("-", 1)[0]
      if not _SPLIT_NAME.match(split):
        raise ValueError(
          f"{self.name}: cannot tell the split of {f}: the name must start with <split>- (letters, digits, underscores)"
        )
      columns = set(pq.read_schema(f).names)
      missing = [c for c in self.REQUIRED_COLUMNS if c not in columns]
      if missing:
        raise ValueError(f"{self.name}: {f} lacks the columns {missing}; expected {list(self.REQUIRED_COLUMNS)}")
      splits.setdefault(split, []).append(f)
    return splits

  def _records(self, split: str, source: list[Path]):
    import pyarrow.parquet as pq

    include_ties = bool(getattr(self.builder_config, "include_ties", False))
    row = 0
    for path in source:
      first = row
      pf = pq.ParquetFile(path)
      columns = [c for c in self.REQUIRED_COLUMNS + self.OPTIONAL_COLUMNS if c in pf.schema_arrow.names]
      for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
        for rec in batch.to_pylist():
          item = self._row(rec, f"{split}-{row}", include_ties)
          where = f"{path.name} row {row - first}"
          if isinstance(item, BadRecord):
            item = _located(item, where, item.record_id)
          else:
            item.where = where
          yield row, item
          row += 1

  @staticmethod
  def _row(rec: dict, default_id: str, include_ties: bool) -> _Candidate | BadRecord:
    rid = default_id if rec.get("ranking_id") is None else str(rec["ranking_id"])
    labels = (rec["label_0"], rec["label_1"])
    if rec.get("has_label") is False or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in labels):
      return BadRecord("unlabeled", "has_label is false or a label is missing", rid)
    if rec.get("are_different") is False:
      return BadRecord("not_different", "are_different is false (the two images are the same)", rid)
    caption = rec["caption"]
    if not isinstance(caption, str) or not caption.strip():
      return BadRecord("bad_label", f"caption must be a non-empty string, got {caption!r:.80}", rid)
    try:
      l0, l1 = float(labels[0]), float(labels[1])
    except (TypeError, ValueError):
      return BadRecord("bad_label", f"labels {labels!r} are not numbers", rid)
    close = lambda a, b: abs(a - b) < 1e-6  # noqa: E731
    if close(l0, 0.5) and close(l1, 0.5):
      if not include_ties:
        return BadRecord("tie", "label_0 = label_1 = 0.5", rid)
      chosen, ranks = 0, [0, 0]
    elif close(l0, 1.0) and close(l1, 0.0):
      chosen, ranks = 0, [0, 1]
    elif close(l0, 0.0) and close(l1, 1.0):
      chosen, ranks = 1, [1, 0]
    else:
      return BadRecord("bad_label", f"labels ({l0}, {l1}) are none of (1, 0), (0, 1), (0.5, 0.5)", rid)
    user = rec.get("user_id")
    return _Candidate(
      id=rid,
      prompt=caption,
      images=[rec["jpg_0"], rec["jpg_1"]],
      chosen=chosen,
      ranks=ranks,
      user="" if user is None else str(user),
    )
