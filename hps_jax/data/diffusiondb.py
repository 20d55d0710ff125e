"""Readers for the generated images `hps-jax label` scores: a local DiffusionDB download, or a JSONL of
(image, prompt) rows.

DiffusionDB (poloclub/diffusiondb) as downloaded, 2M and Large alike:

    ROOT/metadata.parquet, ROOT/metadata-large.parquet      image_name, prompt, part_id, seed, step, cfg, sampler,
                                                            width, height, ... (one row per image)
    ROOT/[images/ | diffusiondb-large-part-N/]part-000001.zip
        part-000001.json                                    {image file name: {"p": prompt, "se": seed, "c": cfg,
                                                             "st": steps, "sa": sampler}}
        <uuid>.png (2M) or <uuid>.webp (Large)

Every `part-*.zip` under ROOT is read (sorted by part number, then path), and in each zip the image members in
name order, so the record order is deterministic. Prompts and settings come from the parquet files when they name
the image, else from the part's JSON. A record without a prompt, a member that is not an image, or a member whose
data fails its CRC is skipped and passed to `skip(where, why)`; an unreadable zip, parquet or part JSON raises
:class:`DiffusionDBError` naming the file.

Records carry where their image is, not its bytes (a 14M-image listing fits in memory); read the bytes with
:class:`ArchiveReader` (or `iter_diffusiondb(..., with_bytes=True)`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

from hps_jax.data.pairs import read_image_rows
from hps_jax.errors import InputError

IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")
_PART = re.compile(r"^part-(\d+)\.zip$")
_FIELDS = ("seed", "step", "cfg", "sampler", "width", "height")
_JSON_FIELDS = {"se": "seed", "st": "step", "c": "cfg", "sa": "sampler"}

Skip = Callable[[str, str], None]


class DiffusionDBError(InputError):
  """A malformed DiffusionDB file (zip, parquet, part JSON); the message names it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
  """One generated image. `archive` is the part zip holding member `name`; for a plain file (JSONL input)
  `archive` is None and `name` is the image path. `part` is the zip's path under ROOT without `.zip`
  (e.g. `images/part-000001`), unique per zip."""

  name: str
  prompt: str | None
  archive: str | None = None
  part: str | None = None
  part_id: int | None = None
  seed: int | None = None
  step: int | None = None
  cfg: float | None = None
  sampler: str | int | None = None
  width: int | None = None
  height: int | None = None
  data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def where(self) -> str:
    """A printable location: `ZIP:member` or the file path."""
    return f"{self.archive}:{self.name}" if self.archive else self.name


def find_parts(root) -> list[Path]:
  """Every `part-NNNNNN.zip` under `root`, sorted by part number then path."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such directory")
  parts = [p for p in root.rglob("part-*.zip") if _PART.match(p.name) and p.is_file()]
  if not parts:
    raise DiffusionDBError(
      f"{root}: no part-NNNNNN.zip archives (expected a DiffusionDB download: part zips in "
      "the folder, images/ or diffusiondb-large-part-N/)"
    )
  return sorted(parts, key=lambda p: (int(_PART.match(p.name).group(1)), str(p)))


def read_parquet_metadata(root, names: set[str], part_ids: set[int] | None = None) -> dict[str, dict]:
  """image_name -> {prompt, seed, step, cfg, sampler, width, height, part_id} for the `names` found in
  ROOT's `metadata*.parquet` files (searched recursively; the first file naming an image wins)."""
  out: dict[str, dict] = {}
  files = sorted(Path(root).rglob("metadata*.parquet"))
  if not files or not names:
    return out
  try:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
  except ImportError as e:
    raise DiffusionDBError(f"reading {files[0]} needs pyarrow (pip install pyarrow, or hps_jax[data])") from e
  wanted = pa.array(sorted(names), pa.string())
  for f in files:
    try:
      schema = pq.read_schema(f)
      missing = {"image_name", "prompt"} - set(schema.names)
      if missing:
        raise DiffusionDBError(
          f"{f}: missing column(s) {sorted(missing)} (DiffusionDB metadata has image_name, "
          f"prompt, part_id, seed, step, cfg, sampler, width, height)"
        )
      cols = ["image_name", "prompt"] + [c for c in ("part_id",) + _FIELDS if c in schema.names]
      filters = [("part_id", "in", sorted(part_ids))] if part_ids and "part_id" in schema.names else None
      table = pq.read_table(f, columns=cols, filters=filters)
      table = table.filter(pc.is_in(table["image_name"].cast(pa.string()), value_set=wanted))
    except DiffusionDBError:
      raise
    except (OSError, pa.ArrowException, ValueError) as e:
      raise DiffusionDBError(f"{f}: cannot read parquet metadata: {e}") from e
    for row in table.to_pylist():
      out.setdefault(row.pop("image_name"), row)
  return out


def _read_part_json(zf: zipfile.ZipFile, zip_path: Path) -> dict:
  member = zip_path.stem + ".json"
  if member not in zf.namelist():
    return {}
  try:
    meta = json.loads(zf.read(member).decode("utf-8"))
  except (zipfile.BadZipFile, zlib.error, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DiffusionDBError(f"{zip_path}:{member}: unreadable part metadata ({e})") from e
  if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
    raise DiffusionDBError(
      f"{zip_path}:{member}: expected an object mapping image names to "
      '{"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}'
    )
  return meta


def _open_zip(path: Path) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise DiffusionDBError(f"{path}: not a readable zip archive ({e})") from e


def read_diffusiondb(root, skip: Skip, require_prompt: bool = True) -> list[Record]:
  """The records (without bytes) of a local DiffusionDB download, in deterministic order (module docstring)."""
  root = Path(root)
  listing = []
  for zp in find_parts(root):
    with _open_zip(zp) as zf:
      part_json = _read_part_json(zf, zp)
      members = sorted(i.filename for i in zf.infolist() if not i.is_dir())
    listing.append((zp, part_json, [m for m in members if m != zp.stem + ".json"]))
  names = {m for _, _, ms in listing for m in ms}
  part_ids = {int(_PART.match(zp.name).group(1)) for zp, _, _ in listing}
  parquet = read_parquet_metadata(root, names, part_ids)
  records = []
  for zp, part_json, members in listing:
    part = zp.relative_to(root).with_suffix("").as_posix()
    part_id = int(_PART.match(zp.name).group(1))
    for m in members:
      where = f"{zp}:{m}"
      if not m.lower().endswith(IMAGE_SUFFIXES):
        skip(where, f"not an image member (expected {', '.join(IMAGE_SUFFIXES)})")
        continue
      fields = {k: None for k in _FIELDS}
      js = part_json.get(m, {})
      fields.update({_JSON_FIELDS[k]: v for k, v in js.items() if k in _JSON_FIELDS})
      prompt = js.get("p") if isinstance(js.get("p"), str) else None
      row = parquet.get(m)
      if row is not None:
        fields.update({k: row[k] for k in _FIELDS if row.get(k) is not None})
        if isinstance(row.get("prompt"), str):
          prompt = row["prompt"]
      if prompt is None and require_prompt:
        skip(where, f"no prompt (not in metadata*.parquet nor in {zp.stem}.json)")
        continue
      records.append(Record(name=m, prompt=prompt, archive=str(zp), part=part, part_id=part_id, **fields))
  return records


class MemberError(ValueError):
  """A zip member could not be read (bad CRC, corrupt deflate data)."""


class ArchiveReader:
  """Reads record bytes; keeps the most recently used zip open (records come grouped by zip)."""

  def __init__(self):
    self._path: str | None = None
    self._zip: zipfile.ZipFile | None = None

  def read(self, record: Record) -> bytes | str:
    """The member's bytes, or the image path for a plain-file record. Raises MemberError / DiffusionDBError."""
    if record.archive is None:
      return record.name
    if record.archive != self._path:
      self.close()
      self._zip, self._path = _open_zip(Path(record.archive)), record.archive
    try:
      return self._zip.read(record.name)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, NotImplementedError) as e:
      raise MemberError(f"cannot read zip member: {e}") from e

  def close(self):
    if self._zip is not None:
      self._zip.close()
    self._zip, self._path = None, None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def iter_diffusiondb(root, skip: Skip, with_bytes: bool = True) -> Iterator[Record]:
  """Records of a DiffusionDB download with `data` filled (members that fail to read are skipped via `skip`)."""
  records = read_diffusiondb(root, skip)
  if not with_bytes:
    yield from records
    return
  with ArchiveReader() as reader:
    for r in records:
      try:
        data = reader.read(r)
      except MemberError as e:
        skip(r.where, str(e))
        continue
      yield dataclasses.replace(r, data=data)


def read_jsonl_records(path, skip: Skip) -> list[Record]:
  """Records of a JSONL of {"image": PATH, "prompt": TEXT} rows (relative paths resolve against its folder);
  bad rows go to `skip` (see hps_jax.data.pairs). Raises ValueError for an unreadable file."""

  return [Record(name=img, prompt=prompt) for img, prompt in read_image_rows(path, skip, require_prompt=True)]


def read_records(path, skip: Skip) -> list[Record]:
  """A DiffusionDB folder or an (image, prompt) JSONL file -> records without bytes."""
  p = Path(path)
  if p.is_dir():
    return read_diffusiondb(p, skip)
  if not p.exists():
    raise FileNotFoundError(f"{p}: no such file or directory")
  if p.suffix.lower() == ".jsonl":
    return read_jsonl_records(p, skip)
  raise ValueError(
    f'{p}: expected a DiffusionDB folder (part-*.zip + metadata*.parquet) or a .jsonl of {{"image", "prompt"}} rows'
  )
