"""Human-preference datasets as TFDS builders (ArrayRecord files, images kept as their encoded bytes; TensorFlow
is not needed), prepared from a local download (`manual_dir`) and read back as random-access sources.

Every builder writes the shared record schema of `hps_jax.data.pipeline`:
    {"id": str, "prompt": str, "images": [encoded bytes], "ranks": int32 (lower = better), "chosen": int}

Upstream layouts (what `manual_dir` must hold):
  hpd_v1            preference_train.json, preference_test.json: lists of {"human_preference": int (index of the
                    chosen image), "prompt", "id", "file_path": [paths], "user_hash", "contain_name"}; images under
                    preference_images/ (paths are tried relative to manual_dir, then to manual_dir/preference_images).
  hpd_v2            train.json: [{"human_preference": [1/0 per image], "prompt", "file_path": [...]}], images under
                    train/; test.json: [{"prompt", "image_path": [...], "rank": [1..n per image], "raw_annotations"}],
                    images under test/.
  pickapic          parquet shards named {split}-NNNNN-of-NNNNN*.parquet anywhere below manual_dir (the Hugging Face
                    layout data/train-00000-of-00645-<hash>.parquet); columns caption, jpg_0, jpg_1 (image bytes),
                    label_0, label_1, has_label, are_different[, ranking_id]. Configs: `default` drops ties
                    (0.5/0.5), `with_ties` keeps them as equal ranks.
  preference_jsonl  {split}.jsonl: one {"prompt", "images": [paths, relative to the file or absolute], "chosen": int,
                    optional "ranks": [...], optional "id"} per line (our documented generic format).

Bad records are never dropped silently. Each is counted by kind — missing_image, corrupt_image, index_out_of_range,
bad_label, bad_json, too_few_images — and deliberate skips likewise (pickapic: unlabeled, not_different, tie). The
counts and the first examples of each kind are logged when a split is written and stored in the prepared dataset's
metadata: `bad_record_report(builder, split)` returns them.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hps_jax.data.images import ImageError, load_image

log = logging.getLogger(__name__)

FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "prompt": tfds.features.Text(),
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "ranks": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.int32)),
    "chosen": tfds.features.Tensor(shape=(), dtype=np.int32),
})
BAD_KINDS = ("missing_image", "corrupt_image", "index_out_of_range", "bad_label", "bad_json", "too_few_images")
EXAMPLES_PER_KIND = 5


class BadRecord(Exception):
  def __init__(self, kind: str, what: str):
    super().__init__(f"{kind}: {what}")
    self.kind, self.what = kind, what


class Tally:
  """Kept / bad / skipped counts of one split, with the first few examples of each kind."""

  def __init__(self, split: str):
    self.split, self.kept = split, 0
    self.bad, self.skipped = Counter(), Counter()
    self.examples = defaultdict(list)

  def add(self, kind: str, what: str, skipped: bool = False):
    (self.skipped if skipped else self.bad)[kind] += 1
    if len(self.examples[kind]) < EXAMPLES_PER_KIND:
      self.examples[kind].append(what)

  def report(self) -> dict:
    return {"kept": self.kept, "bad": dict(self.bad), "skipped": dict(self.skipped), "examples": dict(self.examples)}

  def log(self, name: str):
    if self.bad or self.skipped:
      log.warning("%s/%s: kept %d records; bad %s; skipped %s; e.g. %s", name, self.split, self.kept,
                  dict(self.bad), dict(self.skipped), {k: v[:2] for k, v in self.examples.items()})


def _read_image(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except FileNotFoundError:
    raise BadRecord("missing_image", str(path)) from None
  except OSError as e:
    raise BadRecord("missing_image", f"{path} ({e})") from None


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared machinery: validation, tallies, metadata. Subclasses yield raw records from `_raw(split, manual)`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  REQUIRED: tuple[str, ...] = ()      # files manual_dir must hold (glob patterns)
  validate_images = True

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=FEATURES,
                                 metadata=tfds.core.MetadataDict())

  @classmethod
  def check_manual_dir(cls, manual: Path):
    if not manual.is_dir():
      raise ValueError(f"{cls.name}: manual_dir {manual} is not a directory")
    missing = [p for p in cls.REQUIRED if not any(manual.glob(p))]
    if missing:
      raise ValueError(f"{cls.name}: {manual} lacks {', '.join(missing)}; expected layout:\n"
                       f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  def _split_generators(self, dl_manager):
    manual = Path(dl_manager.manual_dir)
    self.check_manual_dir(manual)
    return {split: self._generate_examples(split=split, manual=manual) for split in self._splits(manual)}

  def _generate_examples(self, split: str, manual: Path):
    tally = Tally(split)
    for n, item in enumerate(self._raw(split, manual, tally)):
      key, rec = item
      try:
        example = self._finish(rec)
      except BadRecord as e:
        tally.add(e.kind, f"{key}: {e.what}")
        continue
      tally.kept += 1
      yield f"{n:09d}", example
    tally.log(self.name)
    self.info.metadata[f"bad_records/{split}"] = tally.report()

  def _finish(self, rec: dict) -> dict:
    """rec: id, prompt, images (Paths or bytes), chosen, ranks (or None) -> a validated example."""
    images = rec["images"]
    if len(images) < 2:
      raise BadRecord("too_few_images", f"{len(images)} image(s)")
    chosen = rec["chosen"]
    if not isinstance(chosen, (int, np.integer)) or isinstance(chosen, bool) or not 0 <= chosen < len(images):
      raise BadRecord("index_out_of_range", f"chosen {chosen!r} with {len(images)} images")
    ranks = rec.get("ranks")
    if ranks is None:
      ranks = [0 if i == chosen else 1 for i in range(len(images))]
    ranks = [int(r) for r in ranks]
    if len(ranks) != len(images) or ranks[chosen] != min(ranks):
      raise BadRecord("bad_label", f"ranks {ranks} do not fit {len(images)} images with chosen {chosen}")
    data = [img if isinstance(img, bytes) else _read_image(img) for img in images]
    if self.validate_images:
      for img, raw in zip(images, data):
        try:
          load_image(raw)
        except ImageError as e:
          raise BadRecord("corrupt_image", f"{img if not isinstance(img, bytes) else 'embedded image'} "
                                           f"({e.message})") from None
    return {"id": str(rec["id"]), "prompt": str(rec["prompt"]), "images": data, "ranks": ranks, "chosen": int(chosen)}


def _load_json_list(path: Path, tally: Tally) -> list:
  try:
    rows = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a JSON list of records")
  return rows


class HpdV1(_PreferenceBuilder):
  """HPD v1, the Human Preference Dataset of the HPS paper (Discord choices among 2-4 Stable Diffusion images)."""

  name = "hpd_v1"
  REQUIRED = ("preference_train.json", "preference_test.json")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """manual_dir/preference_train.json, manual_dir/preference_test.json and the
  images under manual_dir/preference_images/ (file_path entries resolve against manual_dir or that folder)."""

  def _splits(self, manual):
    return ["train", "test"]

  def _raw(self, split, manual, tally):
    for i, r in enumerate(_load_json_list(manual / f"preference_{split}.json", tally)):
      key = f"preference_{split}.json[{i}]"
      try:
        if not isinstance(r, dict) or not isinstance(r.get("file_path"), list) or "prompt" not in r:
          raise BadRecord("bad_label", "missing prompt / file_path")
        if not isinstance(r.get("human_preference"), int):
          raise BadRecord("bad_label", f"human_preference {r.get('human_preference')!r} is not an index")
      except BadRecord as e:
        tally.add(e.kind, f"{key}: {e.what}")
        continue
      yield key, {"id": r.get("id", i), "prompt": r["prompt"], "chosen": r["human_preference"],
                  "images": [self._resolve(manual, p) for p in r["file_path"]]}

  @staticmethod
  def _resolve(manual: Path, p: str) -> Path:
    direct = manual / p
    return direct if direct.exists() else manual / "preference_images" / p


class HpdV2(_PreferenceBuilder):
  """HPD v2 (HPS v2's dataset): pairwise choices for training, ranked groups of images for testing."""

  name = "hpd_v2"
  REQUIRED = ("train.json", "test.json")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """manual_dir/train.json with images under manual_dir/train/, and
  manual_dir/test.json with images under manual_dir/test/."""

  def _splits(self, manual):
    return ["train", "test"]

  def _raw(self, split, manual, tally):
    for i, r in enumerate(_load_json_list(manual / f"{split}.json", tally)):
      key = f"{split}.json[{i}]"
      try:
        yield key, (self._train(r, i, manual) if split == "train" else self._test(r, i, manual))
      except BadRecord as e:
        tally.add(e.kind, f"{key}: {e.what}")

  @staticmethod
  def _train(r, i, manual):
    if not isinstance(r, dict) or not isinstance(r.get("file_path"), list) or "prompt" not in r:
      raise BadRecord("bad_label", "missing prompt / file_path")
    pref = r.get("human_preference")
    if not isinstance(pref, list) or len(pref) != len(r["file_path"]) or sorted(pref) != [0] * (len(pref) - 1) + [1]:
      raise BadRecord("bad_label", f"human_preference {pref!r} does not mark exactly one chosen image")
    chosen = pref.index(1)
    return {"id": r.get("id", i), "prompt": r["prompt"], "chosen": chosen,
            "images": [manual / "train" / p for p in r["file_path"]]}

  @staticmethod
  def _test(r, i, manual):
    if not isinstance(r, dict) or not isinstance(r.get("image_path"), list) or "prompt" not in r:
      raise BadRecord("bad_label", "missing prompt / image_path")
    rank = r.get("rank")
    if not isinstance(rank, list) or len(rank) != len(r["image_path"]) or not all(isinstance(x, int) for x in rank):
      raise BadRecord("bad_label", f"rank {rank!r} does not give one integer per image")
    return {"id": r.get("id", i), "prompt": r["prompt"], "chosen": int(np.argmin(rank)), "ranks": rank,
            "images": [manual / "test" / p for p in r["image_path"]]}


_SHARD = re.compile(r"^(?P<split>[a-z_]+)-\d{5}-of-\d{5}.*\.parquet$")


class PickAPic(_PreferenceBuilder):
  """Pick-a-Pic: pairwise choices between two generated images, from the Hugging Face parquet release."""

  name = "pickapic"
  REQUIRED = ("**/*.parquet",)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default", description="ties (0.5/0.5) excluded"),
                     tfds.core.BuilderConfig(name="with_ties", description="ties kept, as equal ranks")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """parquet shards named {split}-NNNNN-of-NNNNN*.parquet anywhere below manual_dir
  (e.g. the Hugging Face layout data/train-00000-of-00645-<hash>.parquet)."""
  COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different"]

  @staticmethod
  def _shards(manual: Path) -> dict[str, list[Path]]:
    out = defaultdict(list)
    for p in sorted(manual.rglob("*.parquet")):
      m = _SHARD.match(p.name)
      if m:
        out[m["split"]].append(p)
    return out

  def _splits(self, manual):
    shards = self._shards(manual)
    if not shards:
      raise ValueError(f"pickapic: no parquet shard named {{split}}-NNNNN-of-NNNNN*.parquet below {manual}")
    return sorted(shards)

  def _raw(self, split, manual, tally):
    import pyarrow.parquet as pq
    keep_ties = self.builder_config.name == "with_ties"
    for path in self._shards(manual)[split]:
      f = pq.ParquetFile(path)
      names = set(f.schema_arrow.names)
      missing = [c for c in self.COLUMNS if c not in names]
      if missing:
        raise ValueError(f"{path}: parquet lacks columns {missing}")
      cols = self.COLUMNS + (["ranking_id"] if "ranking_id" in names else [])
      row = 0
      for batch in f.iter_batches(batch_size=256, columns=cols):
        for r in batch.to_pylist():
          key = f"{path.name}[{row}]"
          rid = r.get("ranking_id", key)
          row += 1
          if not r["has_label"]:
            tally.add("unlabeled", key, skipped=True)
            continue
          if not r["are_different"]:
            tally.add("not_different", key, skipped=True)
            continue
          l0, l1 = r["label_0"], r["label_1"]
          if l0 is None or l1 is None or {float(l0), float(l1)} not in ({0.0, 1.0}, {0.5}):
            tally.add("bad_label", f"{key}: labels {l0!r}, {l1!r}")
            continue
          if l0 == l1:
            if not keep_ties:
              tally.add("tie", key, skipped=True)
              continue
            chosen, ranks = 0, [0, 0]
          else:
            chosen = 0 if l0 > l1 else 1
            ranks = [0, 1] if chosen == 0 else [1, 0]
          images = [r["jpg_0"], r["jpg_1"]]
          if any(not isinstance(b, (bytes, bytearray)) or not b for b in images):
            tally.add("corrupt_image", f"{key}: empty image bytes")
            continue
          yield key, {"id": rid, "prompt": r["caption"] or "", "chosen": chosen, "ranks": ranks,
                      "images": [bytes(b) for b in images]}


class PreferenceJsonl(_PreferenceBuilder):
  """The generic format: {split}.jsonl with prompt, image paths and the chosen index per line."""

  name = "preference_jsonl"
  REQUIRED = ("*.jsonl",)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """manual_dir/{split}.jsonl (e.g. train.jsonl, test.jsonl), one JSON object per
  line: {"prompt": str, "images": [paths relative to the file, or absolute], "chosen": int, "ranks": [int] (optional,
  lower = better), "id": str (optional)}."""

  def _splits(self, manual):
    return sorted(p.stem for p in manual.glob("*.jsonl"))

  def _raw(self, split, manual, tally):
    path = manual / f"{split}.jsonl"
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if not line.strip():
        continue
      key = f"{path.name}:{n}"
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        tally.add("bad_json", f"{key}: {e.msg}")
        continue
      if (not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("images"), list)
          or "chosen" not in r or not all(isinstance(p, str) for p in r["images"])):
        tally.add("bad_label", f'{key}: needs "prompt" (str), "images" (list of paths) and "chosen"')
        continue
      ranks = r.get("ranks")
      if ranks is not None and (not isinstance(ranks, list) or not all(isinstance(x, int) for x in ranks)):
        tally.add("bad_label", f"{key}: ranks must be a list of integers")
        continue
      yield key, {"id": r.get("id", f"{split}-{n}"), "prompt": r["prompt"], "chosen": r["chosen"], "ranks": ranks,
                  "images": [p if Path(p).is_absolute() else manual / p for p in map(Path, r["images"])]}


BUILDERS = {b.name: b for b in (HpdV1, HpdV2, PickAPic, PreferenceJsonl)}


def prepare(name: str, manual_dir, data_dir, builder_config: str = ""):
  """The builder, with its ArrayRecord files written under data_dir (once; later calls reuse them)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; one of {sorted(BUILDERS)}")
  cls = BUILDERS[name]
  kw = {"config": builder_config} if builder_config else {}
  builder = cls(data_dir=str(data_dir), file_format="array_record", **kw)
  if not builder.is_prepared():
    cls.check_manual_dir(Path(manual_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def bad_record_report(builder, split: str) -> dict:
  """{"kept", "bad": {kind: count}, "skipped": {kind: count}, "examples": {kind: [...]}} of a prepared split."""
  return dict(builder.info.metadata[f"bad_records/{split}"])


class Records:
  """Random access to a prepared split in the shared schema (decoded from TFDS's numpy values)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    r = self.source[i]
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return {"id": text(r["id"]), "prompt": text(r["prompt"]), "images": [bytes(b) for b in r["images"]],
            "ranks": np.asarray(r["ranks"], np.int32), "chosen": int(r["chosen"])}


def data_source(name: str, split: str, manual_dir, data_dir, builder_config: str = "") -> Records:
  builder = prepare(name, manual_dir, data_dir, builder_config)
  if split not in builder.info.splits:
    raise ValueError(f"{name}: no split {split!r}; the prepared splits are {sorted(builder.info.splits)}")
  report = bad_record_report(builder, split)
  if report["bad"] or report["skipped"]:
    log.warning("%s/%s: %d records; bad %s; skipped %s", name, split, report["kept"], report["bad"],
                report["skipped"])
  return Records(builder.as_data_source(split))
