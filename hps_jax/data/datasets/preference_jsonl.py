"""``preference_jsonl``: our generic preference format (`hps_jax.data.synthetic.write_jsonl` writes it).

On disk (manual_dir): one ``<split>.jsonl`` file per split next to the images, one record per line naming the
prompt, the image paths (relative to the file's folder, or absolute), the chosen index and optionally ranks and
an id. The exact record format: `PreferenceJsonl`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import tensorflow_datasets as tfds

from hps_jax.data.datasets.core import (
  _SPLIT_NAME,
  BadRecord,
  _Candidate,
  _int_list,
  _is_int,
  _located,
  _missing_error,
  _path_list,
  _PreferenceBuilder,
  _prompt,
  _record_id,
  _register,
  _require,
)
from hps_jax.data.paths import OutsidePathError, confine

__all__ = ["PreferenceJsonl"]

logger = logging.getLogger(__name__)


@_register
class PreferenceJsonl(_PreferenceBuilder):
  """Generic preference data in JSONL (our format; `hps_jax.data.synthetic.write_jsonl` writes it).

  Layout of manual_dir: one ``<split>.jsonl`` per split (split names: letters, digits, underscores), one record
  per line::

      {"prompt": str, "images": [paths, relative to the .jsonl file's folder or absolute], "chosen": int,
       "ranks": [int per image, lower = better] (optional; default 0 for chosen, 1 for the others),
       "id": str | int (optional; default "<split>-<line number>")}

  Blank lines are ignored; a line that is not a JSON object is a ``bad_json`` record reported with its line
  number (1-based). When ranks are given, the chosen image must have the lowest rank.
  """

  name = "preference_jsonl"
  VERSION = tfds.core.Version("1.1.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Put one <split>.jsonl file per split in manual_dir, each line
  {"prompt": ..., "images": [paths relative to the file or absolute], "chosen": index, "ranks": [...] (optional),
  "id": ... (optional)}."""

  def split_sources(self, manual_dir) -> dict[str, Path]:
    manual_dir = Path(manual_dir)
    files = sorted(manual_dir.glob("*.jsonl")) if manual_dir.is_dir() else []
    splits = {}
    for f in files:
      if _SPLIT_NAME.match(f.stem):
        splits[f.stem] = f
      else:
        logger.warning("%s: ignoring %s: a split name has only letters, digits and underscores", self.name, f)
    if not splits:
      raise _missing_error(self.name, manual_dir, ["<split>.jsonl files"], "e.g. train.jsonl and test.jsonl")
    return splits

  def _records(self, split: str, source: Path):
    root = source.parent
    with open(source, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        rid = default_id = f"{split}-{line_no}"
        try:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError as e:
            raise BadRecord("bad_json", f"invalid JSON ({e.msg} at column {e.colno})") from None
          if not isinstance(rec, dict):
            raise BadRecord("bad_json", "not a JSON object")
          rid = _record_id(rec, default_id)
          try:  # relative paths stay inside the file's folder (absolute ones are taken as written)
            paths = [confine(q, root) for q in _path_list(rec, "images")]
          except OutsidePathError as e:
            raise BadRecord("bad_label", str(e)) from None
          chosen = _require(rec, "chosen")
          if not _is_int(chosen):
            raise BadRecord("bad_label", f"'chosen' must be an integer, got {chosen!r:.80}")
          ranks = _int_list(rec, "ranks", len(paths)) if rec.get("ranks") is not None else None
          yield (
            line_no,
            _Candidate(
              id=rid,
              prompt=_prompt(rec, "prompt"),
              images=[(Path(p),) for p in paths],
              chosen=int(chosen),
              ranks=ranks,
              where=f"{source.name}:{line_no}",
              user=str(rec.get("user") or ""),
            ),
          )
        except BadRecord as e:
          yield line_no, _located(e, f"{source.name}:{line_no}", rid)
