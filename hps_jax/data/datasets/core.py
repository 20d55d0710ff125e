"""What the preference builders share: the record schema, record validation, bad-record reports, the builder base
class, and the entry points `prepare` and `data_source`.

Each builder (one module per dataset in this package) reads a local copy of a dataset (`manual_dir`; nothing is
downloaded) and writes ArrayRecord files that `builder.as_data_source(split)` reads back with random access and
without TensorFlow.

Every record follows the shared schema of `hps_jax.data.pipeline`:
``{"id": str, "prompt": str, "images": [encoded bytes], "ranks": int32 array (lower = better, ties allowed),
"chosen": int, "user": str}`` (`user`: who chose, "" when the source does not say). Images are stored exactly as found (PNG / JPEG / WebP bytes); the builders decode them only to
check that they decode (a full decode with `hps_jax.data.images.load_image`, the loader training uses), so a
corrupt image is caught when the dataset is prepared, not in the middle of training.

Bad records are never dropped silently. Each one is counted under one kind:

* ``bad_json``: a JSONL line that is not valid JSON or not a JSON object;
* ``bad_label``: a malformed record: a missing / ill-typed field, or labels that do not identify one chosen image;
* ``too_few_images``: fewer than two images;
* ``index_out_of_range``: the chosen index is not an index of the record's images;
* ``missing_image``: an image file is not found (or cannot be read);
* ``corrupt_image``: an image does not decode completely;

and for Pick-a-Pic rows that are skipped by design (counted apart, as "skipped"): ``unlabeled`` (``has_label``
false or no labels), ``not_different`` (``are_different`` false) and ``tie`` (0.5 / 0.5, unless the config
``with_ties`` keeps them). When a split is written, a warning sums up what was left out and
``bad_records_<split>.json`` is written next to the prepared data
(``<data_dir>/<name>[/<config>]/<version>/``): ``{"split", "kept", "bad": {kind: n}, "skipped": {kind: n},
"examples": {kind: [{"id", "detail"}, ...]}}`` with the first few offending records of each kind;
`bad_record_report` reads it back. A split in which no record survives is an error.

Records keep the order of the source files (``disable_shuffling``), so index i of a data source is the i-th valid
record. Entry points: `prepare` (build once, reuse after) and `data_source` (the records of one split); both find
a builder by name in `BUILDERS`, which the dataset modules fill (`_register`) when the package is imported.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from hps_jax.data.images import ImageError, load_image

__all__ = [
  "BUILDERS",
  "BAD_KINDS",
  "SKIP_KINDS",
  "MAX_EXAMPLES",
  "REPORT_NAME",
  "BadRecord",
  "BadRecordLog",
  "PreferenceSource",
  "bad_record_report",
  "data_source",
  "prepare",
  "to_record",
]

logger = logging.getLogger(__name__)

BAD_KINDS = ("bad_json", "bad_label", "too_few_images", "index_out_of_range", "missing_image", "corrupt_image")
SKIP_KINDS = ("unlabeled", "not_different", "tie")
MAX_EXAMPLES = 5  # offending records remembered per kind in the report
REPORT_NAME = "bad_records_{split}.json"

_CHUNK = 32  # records validated together (image decoding runs on a thread pool, in order)
_THREADS = max(1, min(8, os.cpu_count() or 1))
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {
      "id": tfds.features.Text(),
      "prompt": tfds.features.Text(),
      # A sequence of scalar object tensors is stored as a bytes list and read back, without TensorFlow, as a list of
      # `bytes` equal to what was written (the encoded file, untouched).
      "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "ranks": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "chosen": tfds.features.Scalar(dtype=np.int32),
      "user": tfds.features.Text(),  # who chose ("" when the source does not say): the dataset's user statistics
    }
  )


_RELEASE_NOTES = {
  "1.0.0": "Initial release.",
  "1.1.0": "Records keep who chose (`user`: HPD v1 user_hash, Pick-a-Pic user_id, a JSONL's user field).",
}


# ----------------------------------------------------------------------------------------------------------------
# Bad-record bookkeeping


class BadRecord(Exception):
  """A record that is left out: its `kind` (one of BAD_KINDS / SKIP_KINDS), what is wrong, and which record."""

  def __init__(self, kind: str, detail: str, record_id: str = ""):
    if kind not in BAD_KINDS and kind not in SKIP_KINDS:
      raise ValueError(f"unknown bad-record kind {kind!r}")
    super().__init__(f"{kind}: {detail}")
    self.kind, self.detail, self.record_id = kind, detail, record_id


@dataclasses.dataclass
class BadRecordLog:
  """Per-split counters: records kept, records left out per kind, and the first few of each kind."""

  split: str
  kept: int = 0
  counts: Counter = dataclasses.field(default_factory=Counter)
  examples: dict = dataclasses.field(default_factory=dict)

  def add(self, bad: BadRecord) -> None:
    self.counts[bad.kind] += 1
    seen = self.examples.setdefault(bad.kind, [])
    if len(seen) < MAX_EXAMPLES:
      seen.append({"id": bad.record_id, "detail": bad.detail})
    logger.debug("%s: record %s left out: %s: %s", self.split, bad.record_id, bad.kind, bad.detail)

  def to_dict(self) -> dict:
    return {
      "split": self.split,
      "kept": self.kept,
      "bad": {k: self.counts[k] for k in BAD_KINDS if self.counts[k]},
      "skipped": {k: self.counts[k] for k in SKIP_KINDS if self.counts[k]},
      "examples": {k: list(v) for k, v in self.examples.items()},
    }

  def summary(self) -> str:
    d = self.to_dict()
    bad = ", ".join(f"{k}={n}" for k, n in d["bad"].items()) or "none"
    skipped = ", ".join(f"{k}={n}" for k, n in d["skipped"].items()) or "none"
    return f"kept {self.kept}; bad: {bad}; skipped: {skipped}"


# ----------------------------------------------------------------------------------------------------------------
# Candidate records and their validation (shared by all builders)


@dataclasses.dataclass
class _Candidate:
  """A parsed record before its images are checked. An image is encoded bytes (None: absent) or a tuple of paths
  tried in order (the first that exists is read). ranks=None: 0 for the chosen image, 1 for the others.
  where: the record's place in the source (file:line, file[index], file row), prefixed to problem reports."""

  id: str
  prompt: str
  images: list
  chosen: int
  ranks: list | None = None
  where: str = ""
  user: str = ""


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _read_image(ref, where: str) -> bytes:
  if ref is None:
    raise BadRecord("missing_image", f"{where}: no image data")
  if isinstance(ref, (bytes, bytearray, memoryview)):
    data = bytes(ref)
  else:
    for path in ref:
      if path.is_file():
        try:
          data = path.read_bytes()
        except OSError as e:
          raise BadRecord("missing_image", f"{path}: cannot be read ({e})") from None
        where = str(path)
        break
    else:
      raise BadRecord("missing_image", "not found: " + " or ".join(str(p) for p in ref))
  try:
    load_image(data)
  except ImageError as e:
    raise BadRecord("corrupt_image", f"{where}: {e.message}") from None
  return data


def _to_example(c: _Candidate) -> dict:
  """Checks a candidate (image count, chosen index, ranks, every image) and returns the TFDS example."""
  n = len(c.images)
  if n < 2:
    raise BadRecord("too_few_images", f"{n} image(s); a preference needs at least 2")
  if not 0 <= c.chosen < n:
    raise BadRecord("index_out_of_range", f"chosen index {c.chosen} is not in [0, {n})")
  if c.ranks is None:
    ranks = [0 if i == c.chosen else 1 for i in range(n)]
  else:
    ranks = list(c.ranks)
    if len(ranks) != n or not all(_is_int(r) for r in ranks):
      raise BadRecord("bad_label", f"ranks {c.ranks!r} must be {n} integers, one per image")
    if ranks[c.chosen] != min(ranks):
      raise BadRecord("bad_label", f"chosen image {c.chosen} does not have the best (lowest) rank in {ranks}")
  images = [_read_image(ref, f"image {i}") for i, ref in enumerate(c.images)]
  return {
    "id": c.id,
    "prompt": c.prompt,
    "images": images,
    "ranks": np.asarray(ranks, np.int32),
    "chosen": np.int32(c.chosen),
    "user": c.user,
  }


def _check(item: _Candidate | BadRecord) -> dict | BadRecord:
  if isinstance(item, BadRecord):
    return item
  try:
    return _to_example(item)
  except BadRecord as e:
    return _located(e, item.where, item.id)


def _located(e: BadRecord, where: str, record_id: str) -> BadRecord:
  """Names the record (unless the error already does) and its place in the source."""
  e.record_id = e.record_id or record_id
  if where:
    e.detail = f"{where}: {e.detail}"
  return e


def _chunks(iterable: Iterable, size: int) -> Iterator[list]:
  it = iter(iterable)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


# Field parsing helpers: each raises BadRecord("bad_label", ...) naming the field.


def _require(rec: dict, key: str):
  if key not in rec:
    raise BadRecord("bad_label", f"missing field {key!r}")
  return rec[key]


def _prompt(rec: dict, key: str) -> str:
  value = _require(rec, key)
  if not isinstance(value, str) or not value.strip():
    raise BadRecord("bad_label", f"{key!r} must be a non-empty string, got {value!r:.80}")
  return value


def _path_list(rec: dict, key: str) -> list[str]:
  value = _require(rec, key)
  if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
    raise BadRecord("bad_label", f"{key!r} must be a list of paths, got {value!r:.120}")
  return value


def _int_list(rec: dict, key: str, n: int) -> list[int]:
  value = _require(rec, key)
  if not isinstance(value, list) or len(value) != n or not all(_is_int(v) for v in value):
    raise BadRecord("bad_label", f"{key!r} must be a list of {n} integers (one per image), got {value!r:.120}")
  return [int(v) for v in value]


def _chosen_from_preference(value, n: int) -> int:
  """HPD `human_preference`: an index, or a 0/1 list with one 1 per image (1 = chosen)."""
  if _is_int(value):
    return int(value)
  if isinstance(value, list) and len(value) == n and all(_is_int(v) and v in (0, 1) for v in value):
    if sum(value) == 1:
      return value.index(1)
    raise BadRecord("bad_label", f"human_preference {value!r} marks {sum(value)} images; exactly one expected")
  raise BadRecord("bad_label", f"human_preference must be an index or a 0/1 list of {n} entries, got {value!r:.120}")


def _record_id(rec: dict, default: str) -> str:
  value = rec.get("id")
  if value is None:
    return default
  if isinstance(value, str) or _is_int(value):
    return str(value)
  raise BadRecord("bad_label", f"'id' must be a string or an integer, got {value!r:.80}", default)


def _load_json_list(path: Path) -> list:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
  return data


def _missing_error(builder: str, manual_dir: Path, missing: list[str], expected: str) -> ValueError:
  return ValueError(f"{builder}: manual_dir {manual_dir} lacks {', '.join(missing)}; expected {expected}")


# ----------------------------------------------------------------------------------------------------------------
# Builders


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared machinery: features, manual_dir checks, validation on a thread pool, bad-record bookkeeping.

  Subclasses implement `split_sources(manual_dir)` ({split: what `_records` reads}, raising ValueError when files
  are missing) and `_records(split, source)` (yields (int key in source order, _Candidate | BadRecord))."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = _RELEASE_NOTES
  HOMEPAGE = ""
  CITATION = ""

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)
    self.bad_records: dict[str, BadRecordLog] = {}  # split -> log of the last generation in this process

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(type(self).__doc__ or "").strip(),
      features=_features(),
      homepage=self.HOMEPAGE,
      citation=self.CITATION,
      disable_shuffling=True,
    )

  @abc.abstractmethod
  def split_sources(self, manual_dir) -> dict[str, Any]:
    """split name -> what `_records` reads for it (a file, a list of shards); checks manual_dir's layout."""

  @abc.abstractmethod
  def _records(self, split: str, source) -> Iterator[tuple[int, _Candidate | BadRecord]]:
    """(position, candidate record or the BadRecord it turned out to be) for every record of one split."""

  def _split_generators(self, dl_manager):
    sources = self.split_sources(Path(os.fspath(dl_manager.manual_dir)))
    return {split: self._generate_examples(split, source) for split, source in sources.items()}

  def _generate_examples(self, split: str, source):
    log = BadRecordLog(split)
    self.bad_records[split] = log
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      for chunk in _chunks(self._records(split, source), _CHUNK):
        for (key, _), result in zip(chunk, pool.map(_check, [item for _, item in chunk])):
          if isinstance(result, BadRecord):
            log.add(result)
          else:
            log.kept += 1
            yield key, result
    self._close_split(log)

  def _close_split(self, log: BadRecordLog) -> None:
    name = self.info.full_name
    if log.kept == 0:
      raise ValueError(
        f"{name}: split {log.split!r} has no valid record ({log.summary()}); "
        f"first problems: {json.dumps(log.examples)[:2000]}"
      )
    # The generator runs in this process (no Beam), while data_path is TFDS's temporary sibling directory
    # (<parent>/incomplete.<id>_<version>), renamed to <parent>/<version> once every split is written.
    tmp = Path(os.fspath(self.data_path))
    (tmp / REPORT_NAME.format(split=log.split)).write_text(json.dumps(log.to_dict(), indent=1) + "\n", encoding="utf-8")
    final = tmp.parent / str(self.version) / REPORT_NAME.format(split=log.split)
    if sum(log.counts.values()):
      logger.warning("%s split %r: %s (details: %s)", name, log.split, log.summary(), final)
    else:
      logger.info("%s split %r: %s", name, log.split, log.summary())


BUILDERS: dict[str, type[_PreferenceBuilder]] = {}  # TFDS name -> builder class, filled by `_register`


def _register(cls: type[_PreferenceBuilder]) -> type[_PreferenceBuilder]:
  """Class decorator of the dataset modules' builders: `prepare` / `data_source` find a builder by its TFDS name
  in BUILDERS (TFDS itself registers every concrete builder when its class is defined)."""
  BUILDERS[cls.name] = cls
  return cls


# ----------------------------------------------------------------------------------------------------------------
# Public API


def _builder(name: str, data_dir, builder_config: str = "") -> _PreferenceBuilder:
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; one of {sorted(BUILDERS)}")
  cls = BUILDERS[name]
  configs = [c.name for c in cls.BUILDER_CONFIGS]
  if builder_config and builder_config not in configs:
    raise ValueError(
      f"{name} has no builder config {builder_config!r}; " + (f"one of {configs}" if configs else "it has none")
    )
  return cls(data_dir=os.fspath(data_dir), config=builder_config or None)


def _is_prepared(builder: _PreferenceBuilder) -> bool:
  # (checking for dataset_info.json first spares TFDS's warning about a variant folder that does not exist yet)
  return (Path(os.fspath(builder.data_path)) / "dataset_info.json").is_file() and builder.is_prepared()


def prepare(name: str, manual_dir, data_dir, builder_config: str = "") -> _PreferenceBuilder:
  """The builder `name` (config `builder_config`, "" = default) over `data_dir`, prepared from `manual_dir` unless
  it already is (then manual_dir is not read). Raises ValueError naming manual_dir and the expected files when they
  are missing."""
  builder = _builder(name, data_dir, builder_config)
  if _is_prepared(builder):
    return builder
  manual_dir = Path(os.fspath(manual_dir)) if manual_dir else None
  if manual_dir is None or not manual_dir.is_dir():
    raise ValueError(f"{name}: manual_dir {manual_dir} is not a directory. {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  builder.split_sources(manual_dir)  # fails early with the clear error
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)
  )
  return builder


def bad_record_report(builder: _PreferenceBuilder, split: str) -> dict:
  """The bad-record report written when `split` was prepared: {"split", "kept", "bad", "skipped", "examples"}."""
  path = Path(os.fspath(builder.data_path)) / REPORT_NAME.format(split=split)
  if not path.is_file():
    raise FileNotFoundError(
      f"no bad-record report for split {split!r} at {path} (is {builder.info.full_name} "
      f"prepared, and does it have that split? splits: {sorted(builder.info.splits)})"
    )
  return json.loads(path.read_text(encoding="utf-8"))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def to_record(example: dict) -> dict:
  """A TFDS-decoded example (numpy values) -> the shared record schema."""
  return {
    "id": _text(example["id"]),
    "prompt": _text(example["prompt"]),
    "images": [bytes(b) for b in example["images"]],
    "ranks": np.asarray(example["ranks"], np.int32),
    "chosen": int(example["chosen"]),
    "user": _text(example.get("user", "")),
  }


class PreferenceSource:
  """Random access to the records of a prepared split, in the shared schema (`len`, `__getitem__`, batched
  `__getitems__`); `grain.MapDataset.source` accepts it."""

  def __init__(self, source, name: str = ""):
    self._source = source
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def _index(self, index) -> int:
    n = len(self._source)
    i = int(index)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"record index {index} out of range for {self.name or 'source'} of {n} records")
    return i

  def __getitem__(self, index) -> dict:
    return to_record(self._source[self._index(index)])

  def __getitems__(self, indices) -> list[dict]:
    return [to_record(ex) for ex in self._source.__getitems__([self._index(i) for i in indices])]

  _getitems = __getitems__  # grain's batched-read protocol

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"PreferenceSource({self.name!r}, {len(self)} records)"


def data_source(name: str, split: str, manual_dir, data_dir, builder_config: str = "") -> PreferenceSource:
  """The records of `split` (prepared first when needed, see `prepare`) as a random-access source."""
  builder = prepare(name, manual_dir, data_dir, builder_config)
  if split.split("[", 1)[0] not in builder.info.splits:
    raise ValueError(f"{builder.info.full_name} has no split {split!r}; splits: {sorted(builder.info.splits)}")
  return PreferenceSource(builder.as_data_source(split), name=f"{builder.info.full_name}/{split}")
