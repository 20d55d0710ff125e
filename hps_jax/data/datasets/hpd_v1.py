"""``hpd_v1``: the Human Preference Dataset (HPD) of HPS v1 (Wu et al., "Human Preference Score: Better Aligning
Text-to-Image Models with Human Preference", ICCV 2023), https://github.com/tgxs002/align_sd.

On disk (manual_dir): ``preference_train.json`` and ``preference_test.json`` (JSON lists of records, each naming
its images and the index of the chosen one) and the ``preference_images/`` folder; splits train and test. The
exact fields and how paths are resolved: `HpdV1`.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from hps_jax.data.datasets.core import (
  BadRecord,
  _Candidate,
  _chosen_from_preference,
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

__all__ = ["HpdV1"]


@_register
class HpdV1(_PreferenceBuilder):
  """Human Preference Dataset (HPD), the dataset of HPS v1 (Wu et al., "Human Preference Score: Better Aligning
  Text-to-Image Models with Human Preference", ICCV 2023).

  Upstream layout of manual_dir::

      preference_train.json   JSON list of {"human_preference": int (index of the chosen image in file_path),
      preference_test.json      "prompt": str, "id": str | int, "file_path": [paths], "user_hash": str,
                                "contain_name": bool}
      preference_images/      the images

  Each `file_path` entry is resolved as manual_dir/path, then manual_dir/preference_images/path (entries may or
  may not start with ``preference_images/``). ranks: 0 for the chosen image, 1 for the others. Splits: train, test.
  """

  name = "hpd_v1"
  VERSION = tfds.core.Version("1.1.0")
  HOMEPAGE = "https://github.com/tgxs002/align_sd"
  CITATION = """@inproceedings{wu2023hps,
  title={Human Preference Score: Better Aligning Text-to-Image Models with Human Preference},
  author={Wu, Xiaoshi and Sun, Keqiang and Zhu, Feng and Zhao, Rui and Li, Hongsheng},
  booktitle={ICCV}, year={2023}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download the Human Preference Dataset of HPS v1 (see
  https://github.com/tgxs002/align_sd) and extract it into manual_dir so that it holds preference_train.json,
  preference_test.json and the preference_images/ folder."""
  FILES = {"train": "preference_train.json", "test": "preference_test.json"}

  def split_sources(self, manual_dir) -> dict[str, Path]:
    manual_dir = Path(manual_dir)
    missing = [f for f in self.FILES.values() if not (manual_dir / f).is_file()]
    if missing:
      raise _missing_error(
        self.name, manual_dir, missing, "preference_train.json, preference_test.json and preference_images/"
      )
    return {split: manual_dir / f for split, f in self.FILES.items()}

  def _records(self, split: str, source: Path):
    root = source.parent
    for i, rec in enumerate(_load_json_list(source)):
      rid = default_id = f"{split}-{i}"
      try:
        if not isinstance(rec, dict):
          raise BadRecord("bad_json", "not a JSON object")
        rid = _record_id(rec, default_id)
        paths = _path_list(rec, "file_path")
        yield (
          i,
          _Candidate(
            id=rid,
            prompt=_prompt(rec, "prompt"),
            images=[(root / p, root / "preference_images" / p) for p in paths],
            chosen=_chosen_from_preference(_require(rec, "human_preference"), len(paths)),
            where=f"{source.name}[{i}]",
            user=str(rec.get("user_hash") or ""),
          ),
        )
      except BadRecord as e:
        yield i, _located(e, f"{source.name}[{i}]", rid)
