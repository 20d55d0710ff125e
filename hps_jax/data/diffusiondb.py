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
the image, else from the part's JSON. An unreadable zip, parquet or part JSON raises :class:`DiffusionDBError`
(an `InputError`) naming the file; each bad member is skipped and passed to `skip(where, why)`:

* a member that is not an image, has no prompt (or a prompt that is not valid Unicode), or is listed in the part
  JSON but absent from the zip;
* several members sharing one name (which one is meant is ambiguous: none is read);
* archive bombs, judged from the zip's headers before a byte is decompressed (:class:`ArchiveLimits`): a member
  larger than `max_member_bytes` uncompressed, compressed more than `max_ratio` : 1, encrypted, or compressed
  with a method other than stored / deflated (bzip2 and LZMA members are decompressed by `zipfile` without an
  output bound). Headers can lie, so members are also read in chunks with the caps enforced on the bytes
  actually produced (and `zipfile` stops at the declared size and checks the CRC): memory stays bounded by the
  caps whatever the archive holds;
* a member whose data fails its CRC or cannot be decompressed (when its bytes are read).

Member names are only used to look members up, never as paths to write to (`hps_jax.adapt.label` makes its own
safe, unique names for the images it extracts; see `hps_jax.data.paths`).

Records carry where their image is, not its bytes (a 14M-image listing fits in memory); read the bytes with
:class:`ArchiveReader` (or `iter_diffusiondb(..., with_bytes=True)`). `iter_record_units` streams the listing one
part (or one block of JSONL rows) at a time, for jobs that must not hold a whole download's listing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from hps_jax.data.pairs import read_image_rows
from hps_jax.data.paths import text_problem
from hps_jax.errors import InputError

IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")
_PART = re.compile(r"^part-(\d+)\.zip$")
_FIELDS = ("seed", "step", "cfg", "sampler", "width", "height")
_JSON_FIELDS = {"se": "seed", "st": "step", "c": "cfg", "sa": "sampler"}

Skip = Callable[[str, str], None]


class DiffusionDBError(InputError):
  """A malformed DiffusionDB file (zip, parquet, part JSON); the message names it."""


class MemberError(ValueError):
  """A zip member could not be read (bad CRC, corrupt deflate data, over a cap of :class:`ArchiveLimits`)."""


MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
  """Caps on what one zip member may cost (module docstring). A DiffusionDB image is 0.1 - 2 MB and its
  compressed size is about its size (PNG and WebP data are already compressed); a part JSON is about 0.3 MB.

  max_member_bytes: largest uncompressed image member read.
  max_ratio: largest uncompressed / compressed size, checked for members of at least `ratio_min_bytes`.
  max_json_bytes: largest part JSON read (larger is a DiffusionDBError: the whole part's metadata).
  chunk_bytes: how much is decompressed at a time.
  """

  max_member_bytes: int = 64 * MiB
  max_ratio: float = 100.0
  ratio_min_bytes: int = 1 * MiB
  max_json_bytes: int = 32 * MiB
  chunk_bytes: int = 1 * MiB


DEFAULT_LIMITS = ArchiveLimits()

_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA", 9: "deflate64"}


def _size(n: int) -> str:
  return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


def member_problem(
  info: zipfile.ZipInfo, limits: ArchiveLimits = DEFAULT_LIMITS, max_bytes: int | None = None
) -> str | None:
  """Why a member must not be decompressed, judged from its headers (or None)."""
  cap = limits.max_member_bytes if max_bytes is None else max_bytes
  if info.flag_bits & 0x1:
    return "encrypted member (no password is tried)"
  if info.compress_type not in _METHODS:
    method = _METHOD_NAMES.get(info.compress_type, "an unknown method")
    return f"compressed with {method} (method {info.compress_type}): only stored and deflated members are read"
  if info.file_size > cap:
    return f"member of {info.file_size} bytes uncompressed exceeds the cap of {_size(cap)} (a possible zip bomb)"
  if info.file_size >= limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
    ratio = info.file_size / max(info.compress_size, 1)
    return (
      f"compression ratio {ratio:.0f}:1 ({info.file_size} bytes from {info.compress_size}) exceeds the cap of "
      f"{limits.max_ratio:g}:1 (a possible zip bomb)"
    )
  return None


def read_member(
  zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits = DEFAULT_LIMITS, max_bytes: int | None = None
) -> bytes:
  """A member's bytes, read in chunks with the caps checked on its headers first and then on the bytes actually
  decompressed (headers can lie). Raises MemberError."""
  bad = member_problem(info, limits, max_bytes)
  if bad is not None:
    raise MemberError(bad)
  cap = limits.max_member_bytes if max_bytes is None else max_bytes
  ratio_cap = limits.max_ratio * max(info.compress_size, 1)
  chunks, total = [], 0
  try:
    with zf.open(info) as f:
      while chunk := f.read(limits.chunk_bytes):
        total += len(chunk)
        if total > cap:
          raise MemberError(
            f"member decompresses to more than the cap of {_size(cap)} (its header said {info.file_size} bytes: "
            "a possible zip bomb)"
          )
        if total >= limits.ratio_min_bytes and total > ratio_cap:
          raise MemberError(
            f"member decompresses more than {limits.max_ratio:g}:1 (its header said {info.file_size} bytes from "
            f"{info.compress_size}: a possible zip bomb)"
          )
        chunks.append(chunk)
  except MemberError:
    raise
  except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, NotImplementedError, RuntimeError) as e:
    raise MemberError(f"cannot read zip member: {e}") from e
  return b"".join(chunks)


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
    raise FileNotFoundError(errno.ENOENT, "no such directory", str(root))
  parts = [p for p in root.rglob("part-*.zip") if _PART.match(p.name) and p.is_file()]
  if not parts:
    raise DiffusionDBError(
      f"{root}: no part-NNNNNN.zip archives (expected a DiffusionDB download: part zips in "
      "the folder, images/ or diffusiondb-large-part-N/)"
    )
  return sorted(parts, key=lambda p: (int(_PART.match(p.name).group(1)), str(p)))


def read_parquet_metadata(
  root, names: set[str], part_ids: set[int] | None = None, *, files: list[Path] | None = None
) -> dict[str, dict]:
  """image_name -> {prompt, seed, step, cfg, sampler, width, height, part_id} for the `names` found in
  ROOT's `metadata*.parquet` files (searched recursively unless `files` lists them; the first file naming an image
  wins)."""
  out: dict[str, dict] = {}
  files = sorted(Path(root).rglob("metadata*.parquet")) if files is None else files
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


def _read_part_json(zf: zipfile.ZipFile, zip_path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> dict:
  member = zip_path.stem + ".json"
  infos = [i for i in zf.infolist() if i.filename == member]
  if not infos:
    return {}
  where = f"{zip_path}:{member}"
  if len(infos) > 1:
    raise DiffusionDBError(f"{where}: {len(infos)} members share this name (which one holds the metadata is ambiguous)")
  try:
    text = read_member(zf, infos[0], limits, max_bytes=limits.max_json_bytes).decode("utf-8")
    meta = json.loads(text)
  except MemberError as e:
    raise DiffusionDBError(f"{where}: unreadable part metadata ({e})") from e
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise DiffusionDBError(f"{where}: unreadable part metadata, expected UTF-8 JSON ({e})") from e
  if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
    raise DiffusionDBError(
      f"{where}: expected an object mapping image names to "
      '{"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}'
    )
  return meta


def _open_zip(path: Path) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except Exception as e:  # BadZipFile, OSError, EOFError, UnicodeDecodeError of a name, errors of broken headers
    raise DiffusionDBError(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from e


def _listing(zp: Path, limits: ArchiveLimits) -> tuple[dict, list[zipfile.ZipInfo]]:
  """A part's JSON metadata and its other members (sorted by name), from the zip's headers."""
  with _open_zip(zp) as zf:
    part_json = _read_part_json(zf, zp, limits)
    infos = [i for i in zf.infolist() if not i.is_dir() and i.filename != zp.stem + ".json"]
  return part_json, sorted(infos, key=lambda i: i.filename)


def _part_records(
  root: Path, zp: Path, part_json: dict, infos, parquet: dict, skip: Skip, require_prompt: bool, limits: ArchiveLimits
) -> list[Record]:
  part = zp.relative_to(root).with_suffix("").as_posix()
  part_id = int(_PART.match(zp.name).group(1))
  shared, reported = Counter(i.filename for i in infos), set()
  records = []
  for info in infos:
    m = info.filename
    where = f"{zp}:{m}"
    if shared[m] > 1:
      if m not in reported:  # one skip per name, not per copy
        reported.add(m)
        skip(where, f"{shared[m]} members share this name (which one is meant is ambiguous): none is read")
      continue
    if not m.lower().endswith(IMAGE_SUFFIXES):
      skip(where, f"not an image member (expected {', '.join(IMAGE_SUFFIXES)})")
      continue
    bad = member_problem(info, limits)
    if bad is not None:
      skip(where, bad)
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
    if prompt is not None and text_problem(prompt) is not None:
      skip(where, f"prompt is {text_problem(prompt)}")
      continue
    if prompt is None and require_prompt:
      skip(where, f"no prompt (not in metadata*.parquet nor in {zp.stem}.json)")
      continue
    records.append(Record(name=m, prompt=prompt, archive=str(zp), part=part, part_id=part_id, **fields))
  present = {i.filename for i in infos}
  for m in sorted(k for k in part_json if k not in present):
    skip(f"{zp}:{m}", f"listed in {zp.stem}.json but not in the archive")
  return records


def read_diffusiondb(
  root, skip: Skip, require_prompt: bool = True, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> list[Record]:
  """The records (without bytes) of a local DiffusionDB download, in deterministic order (module docstring)."""
  root = Path(root)
  listing = [(zp, *_listing(zp, limits)) for zp in find_parts(root)]
  names = {i.filename for _, _, infos in listing for i in infos}
  part_ids = {int(_PART.match(zp.name).group(1)) for zp, _, _ in listing}
  parquet = read_parquet_metadata(root, names, part_ids)
  records = []
  for zp, part_json, infos in listing:
    records += _part_records(root, zp, part_json, infos, parquet, skip, require_prompt, limits)
  return records


PARTS_PER_LOOKUP = 64  # parts whose parquet metadata `iter_diffusiondb_parts` looks up in one read


def iter_diffusiondb_parts(
  root, skip: Skip, require_prompt: bool = True, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> Iterator[list[Record]]:
  """`read_diffusiondb`'s records one part at a time (memory bounded by `PARTS_PER_LOOKUP` parts' listings, not
  the download's): one list per `part-*.zip`, in `find_parts` order, empty when the part holds no usable image.
  The parquet metadata is looked up for `PARTS_PER_LOOKUP` parts at a time (rows whose `part_id` is one of theirs,
  as in every DiffusionDB download); a zip, part JSON or parquet file that cannot be read raises DiffusionDBError
  when its part is reached."""
  root = Path(root)
  parts = find_parts(root)
  files = sorted(root.rglob("metadata*.parquet"))
  for start in range(0, len(parts), PARTS_PER_LOOKUP):
    group = [(zp, *_listing(zp, limits)) for zp in parts[start : start + PARTS_PER_LOOKUP]]
    names = {i.filename for _, _, infos in group for i in infos}
    part_ids = {int(_PART.match(zp.name).group(1)) for zp, _, _ in group}
    parquet = read_parquet_metadata(root, names, part_ids, files=files)
    for zp, part_json, infos in group:
      yield _part_records(root, zp, part_json, infos, parquet, skip, require_prompt, limits)


class ArchiveReader:
  """Reads record bytes under `limits`; keeps the most recently used zip open (records come grouped by zip)."""

  def __init__(self, limits: ArchiveLimits = DEFAULT_LIMITS):
    self.limits = limits
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
      info = self._zip.getinfo(record.name)
    except KeyError as e:
      raise MemberError(f"cannot read zip member: no member named {record.name!r}") from e
    return read_member(self._zip, info, self.limits)

  def close(self):
    if self._zip is not None:
      self._zip.close()
    self._zip, self._path = None, None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def iter_diffusiondb(
  root, skip: Skip, with_bytes: bool = True, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> Iterator[Record]:
  """Records of a DiffusionDB download with `data` filled (members that fail to read are skipped via `skip`)."""
  records = read_diffusiondb(root, skip, limits=limits)
  if not with_bytes:
    yield from records
    return
  with ArchiveReader(limits) as reader:
    for r in records:
      try:
        data = reader.read(r)
      except MemberError as e:
        skip(r.where, str(e))
        continue
      yield dataclasses.replace(r, data=data)


def read_jsonl_records(path, skip: Skip, *, allow_outside: bool = False) -> list[Record]:
  """Records of a JSONL of {"image": PATH, "prompt": TEXT} rows (relative paths resolve against its folder and
  must stay inside it unless `allow_outside`); bad rows go to `skip` (see hps_jax.data.pairs). Raises InputError
  for an unreadable or unusable file."""

  rows = read_image_rows(path, skip, require_prompt=True, allow_outside=allow_outside)
  return [Record(name=img, prompt=prompt) for img, prompt in rows]


JSONL_UNIT = 4096  # JSONL rows per unit of `iter_record_units`


def iter_record_units(
  path, skip: Skip, *, allow_outside: bool = False, limits: ArchiveLimits = DEFAULT_LIMITS
) -> Iterator[list[Record]]:
  """`read_records`' records, streamed in units: one list per DiffusionDB part (`iter_diffusiondb_parts`), or
  blocks of `JSONL_UNIT` rows of a JSONL file (read line by line). The same records in the same order as
  `read_records`; errors as there (a DiffusionDB file that cannot be read raises when it is reached)."""
  p = Path(path)
  if p.is_dir():
    yield from iter_diffusiondb_parts(p, skip, limits=limits)
    return
  _check_jsonl(p)
  block: list[Record] = []
  for img, prompt in read_image_rows(p, skip, require_prompt=True, allow_outside=allow_outside):
    block.append(Record(name=img, prompt=prompt))
    if len(block) == JSONL_UNIT:
      yield block
      block = []
  if block:
    yield block


def _check_jsonl(p: Path) -> None:
  if not p.exists():
    raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(p))
  if p.suffix.lower() != ".jsonl":
    raise InputError(
      f'{p}: expected a DiffusionDB folder (part-*.zip + metadata*.parquet) or a .jsonl of {{"image", "prompt"}} rows'
    )


def read_records(
  path, skip: Skip, *, allow_outside: bool = False, limits: ArchiveLimits = DEFAULT_LIMITS
) -> list[Record]:
  """A DiffusionDB folder or an (image, prompt) JSONL file -> records without bytes. `allow_outside`: JSONL image
  paths may leave the JSONL's folder (`--allow-outside-paths`)."""
  p = Path(path)
  if p.is_dir():
    return read_diffusiondb(p, skip, limits=limits)
  _check_jsonl(p)
  return read_jsonl_records(p, skip, allow_outside=allow_outside)
