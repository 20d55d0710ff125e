"""``hpd_v2``: HPDv2, the dataset of HPS v2 (Wu et al., "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis", 2023), https://github.com/tgxs002/HPSv2.

On disk (manual_dir): ``train.json`` with the ``train/`` images (one image of each record marked chosen) and
``test.json`` with the ``test/`` images (every image ranked); splits train and test. The exact fields and how
paths are resolved: `HpdV2`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hps_jax.data.datasets.core import (
  BadRecord,
  _Candidate,
  _chosen_from_preference,
  _int_list,
  _load_json_list,
  _located,
  _missing_error,
  _path_list,
  _PreferenceBuilder,
  _prompt,
  _record_id,
  _register,
  _require,
)

__all__ = ["HpdV2"]


@_register
class HpdV2(_PreferenceBuilder):
  """HPDv2, the dataset of HPS v2 (Wu et al., "Human Preference Score v2: A Solid Benchmark for Evaluating Human
  Preferences of Text-to-Image Synthesis", 2023).

  Upstream layout of manual_dir::

      train.json   JSON list of {"human_preference": [0/1 per image, 1 = chosen], "prompt": str,
                   "file_path": [paths relative to train/], ...}
      train/       the training images
      test.json    JSON list of {"prompt": str, "image_path": [paths relative to test/],
                   "rank": [int per image, lower = better], "raw_annotations": [...], ...}
      test/        the test images

  train: chosen = the image marked 1 (exactly one must be; an integer index is accepted too), ranks 0 for it and
  1 for the others. test: ranks = rank, chosen = argmin(rank) (the first on a tie). Paths are tried relative to the
  split folder, then to manual_dir. ids: the record's "id" when present, else "<split>-<index in the list>".
  """

  name = "hpd_v2"
  VERSION = tfds.core.Version("1.1.0")
  HOMEPAGE = "https://github.com/tgxs002/HPSv2"
  CITATION = """@article{wu2023hpsv2,
  title={Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of Text-to-Image Synthesis},
  author={Wu, Xiaoshi and Hao, Yiming and Sun, Keqiang and Chen, Yixiong and Zhu, Feng and Zhao, Rui and
  Li, Hongsheng}, journal={arXiv preprint arXiv:2306.09341}, year={2023}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download HPDv2 (see https://github.com/tgxs002/HPSv2, the "HPDv2" dataset
  on Hugging Face) and extract it into manual_dir so that it holds train.json, test.json and the train/ and
  test/ image folders."""

  def split_sources(self, manual_dir) -> dict[str, Path]:
    manual_dir = Path(manual_dir)
    expected = ["train.json", "test.json", "train/", "test/"]
    missing = [
      e for e in expected if not ((manual_dir / e).is_dir() if e.endswith("/") else (manual_dir / e).is_file())
    ]
    if missing:
      raise _missing_error(self.name, manual_dir, missing, "train.json, test.json, train/ and test/")
    return {"train": manual_dir / "train.json", "test": manual_dir / "test.json"}

  def _records(self, split: str, source: Path):
    root, folder = source.parent, source.parent / source.stem
    for i, rec in enumerate(_load_json_list(source)):
      rid = default_id = f"{split}-{i}"
      try:
        if not isinstance(rec, dict):
          raise BadRecord("bad_json", "not a JSON object")
        rid = _record_id(rec, default_id)
        if "rank" in rec or "image_path" in rec:  # the test layout
          paths = _path_list(rec, "image_path")
          ranks = _int_list(rec, "rank", len(paths))
          chosen = int(np.argmin(ranks)) if ranks else 0
        else:
          paths = _path_list(rec, "file_path")
          ranks, chosen = None, _chosen_from_preference(_require(rec, "human_preference"), len(paths))
        yield (
          i,
          _Candidate(
            id=rid,
            prompt=_prompt(rec, "prompt"),
            images=[(folder / p, root / p) for p in paths],
            chosen=chosen,
            ranks=ranks,
            where=f"{source.name}[{i}]",
          ),
        )
      except BadRecord as e:
        yield i, _located(e, f"{source.name}[{i}]", rid)
