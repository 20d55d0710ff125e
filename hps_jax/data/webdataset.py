"""img2dataset-style webdataset shards: plain `.tar` files whose members are grouped into samples by key.

    laion/00000.tar
        000000000.jpg    the image (.jpg / .jpeg / .png / .webp)
        000000000.txt    its caption (UTF-8; surrounding whitespace is stripped, an empty one is no caption)
        000000000.json   its metadata (a JSON object: url, width, height, similarity, ...)
        000000001.jpg
        ...

A member's key is its name up to the first dot of its last component and the rest is its extension (webdataset's
own rule, `webdataset.tariterators.base_plus_ext`: `sub/000.jpg` is key `sub/000`, extension `jpg`; a leading `./`
is dropped). The members of one sample must be adjacent in the tar (as every webdataset writer puts them); members
with other extensions (`.cls`, `.npy`, ...) are passed over unread, and so are directory entries.

Shard specs (`expand_shards`): a `.tar` path, a folder (its `*.tar` files, not recursive, sorted by name), or a
brace pattern `laion/{00000..00099}.tar` (expanded by `webdataset.shardlists.expand_urls`, which also splits
`a.tar::b.tar` and substitutes `WDS_`-prefixed environment variables). The order is the order given, and within a
shard the tar's member order: the sample order is deterministic. `shard_share` gives each of N processes a
disjoint share of the shards.

The `webdataset` package (the `wds` extra) is used for brace expansion and the key rule; it imports without torch.
Its tar iteration (`tar_file_iterator`) is not used: it reads every member whole whatever the header declares
and cannot tell which sample a read error broke. Members are read here with `tarfile` in random-access mode through
a file object that refuses any single read over `TAR_HEADER_CAP` (a pax or GNU long-name header declaring gigabytes
is refused, not allocated), and member data is read only after its declared size passed the caps.

What a shard may hold and what happens (each skip goes to `Skips` as `(where, why)`, the run goes on):

* a shard that is missing or not a readable uncompressed tar: `SHARD` is skipped;
* a read error mid-shard (a truncated download, a corrupt header, data ending before its declared size, no
  end-of-archive marker): the sample being read, `SHARD:KEY`, and the rest of the shard are skipped (the samples
  before it are kept);
* a member with an unsafe name (absolute, `..`, backslashes, control characters; `hps_jax.data.paths.
  safe_member_path`): `SHARD:NAME` is skipped (names are never used as paths to write to anyway);
* an image / caption / metadata member that is not a regular file (symlink, hard link, device, FIFO, sparse), that
  declares more than the cap (`ArchiveLimits.max_member_bytes` for images, `max_json_bytes` for `.txt` / `.json`,
  `hps_jax.data.diffusiondb.DEFAULT_LIMITS`), that appears twice in a sample, a second image of another extension,
  an undecodable caption or metadata that is not a JSON object: the sample `SHARD:KEY` is skipped;
* a sample without an image member: `SHARD:KEY` is skipped.

Memory is bounded by one sample (its image at most `max_member_bytes`) whatever the shard holds.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from hps_jax.data.diffusiondb import DEFAULT_LIMITS, ArchiveLimits
from hps_jax.data.paths import safe_member_path, text_problem
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
META_EXT = "json"
TAR_HEADER_CAP = 1024 * 1024  # the largest single read tarfile may make (pax / GNU long-name headers are ~1 KB)
_BLOCK = tarfile.BLOCKSIZE


class WebdatasetError(InputError):
  """A shard spec that names nothing usable (an empty folder, a malformed brace pattern); one line naming it."""


class Sample(NamedTuple):
  """One webdataset sample. `index` is the sample's position among the shard's samples (skipped ones counted),
  `image` the encoded image bytes, `ext` its extension (lowercase), `caption` the `.txt` text (stripped; None when
  absent or empty), `meta` the `.json` object or None."""

  key: str
  shard: Path
  index: int
  image: bytes
  ext: str
  caption: str | None
  meta: dict | None

  @property
  def where(self) -> str:
    """`SHARD/KEY.EXT`: how outputs name the image (e.g. `laion/00000.tar/000000012.jpg`)."""
    return f"{self.shard}/{self.key}.{self.ext}"


def _wds():
  try:
    from webdataset.shardlists import expand_urls  # optional: the [wds] extra
    from webdataset.tariterators import base_plus_ext
  except ImportError as e:
    raise InputError(f"reading webdataset shards needs the webdataset package: pip install 'hps_jax[wds]' ({e})") from e
  return expand_urls, base_plus_ext


# ------------------------------------------------------------------------------------------------------------
# shard lists
# ------------------------------------------------------------------------------------------------------------
def expand_shards(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
  """The shards named by `spec` (one spec or several), in order, each once (module docstring). A folder with no
  `.tar` file, or a spec that expands to nothing, raises WebdatasetError; shards that do not exist are returned
  (`iter_samples` counts each as a skip), so a range with a failed download goes on without it."""
  expand_urls, _ = _wds()
  specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  out: dict[str, Path] = {}
  for s in specs:
    s = os.fspath(s)
    if not s:
      raise WebdatasetError("empty shard spec: expected a .tar file, a folder of .tar files or a brace pattern")
    try:
      names = list(expand_urls(s))
    except Exception as e:  # noqa: BLE001  (braceexpand raises its own error types on unbalanced braces)
      raise WebdatasetError(f"shard spec {s}: cannot expand it ({type(e).__name__}: {e})") from e
    if not names:
      raise WebdatasetError(f"shard spec {s} expands to no shard")
    for name in names:
      p = Path(name)
      if p.is_dir():
        tars = sorted(f for f in p.iterdir() if f.suffix.lower() == ".tar" and f.is_file())
        if not tars:
          raise WebdatasetError(f"{p}: no .tar shards in this folder")
        for t in tars:
          out.setdefault(str(t), t)
      else:
        out.setdefault(str(p), p)
  return list(out.values())


def shard_share(shards: Sequence, process_index: int, process_count: int) -> list:
  """Process `process_index`'s share of `shards` among `process_count` processes: every `process_count`-th shard
  from its index (`shards[i::n]`), so the shares are disjoint, cover every shard, keep the shards' order and differ
  in size by at most one. A process may get none when there are fewer shards than processes."""
  if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count must be an integer >= 1, got {process_count!r}")
  if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be an integer in [0, {process_count}), got {process_index!r}")
  return list(shards)[process_index::process_count]


# ------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------
class _TarReadError(Exception):
  """A read error mid-shard (truncated data, corrupt or oversized header)."""


class _CappedReads:
  """The shard's file as tarfile sees it: any single read larger than `cap` raises (tarfile reads headers, pax
  records and GNU long names in one read of their declared size)."""

  def __init__(self, f, cap: int):
    self._f, self._cap = f, cap
    self.name = getattr(f, "name", None)

  def read(self, n: int = -1) -> bytes:
    if n is None or n < 0 or n > self._cap:
      raise tarfile.ReadError(f"a header declares {n} bytes, over the cap of {self._cap} (refused)")
    return self._f.read(n)

  def seek(self, pos: int, whence: int = 0) -> int:
    return self._f.seek(pos, whence)

  def tell(self) -> int:
    return self._f.tell()


def _member_problem(info: tarfile.TarInfo, cap: int) -> str | None:
  if info.issparse():
    return "a sparse member (not read)"
  if not info.isreg():
    kind = {
      tarfile.SYMTYPE: "a symbolic link",
      tarfile.LNKTYPE: "a hard link",
      tarfile.CHRTYPE: "a character device",
      tarfile.BLKTYPE: "a block device",
      tarfile.FIFOTYPE: "a FIFO",
    }.get(info.type, f"not a regular file (type {info.type!r})")
    return f"{kind}, not a regular file (not read)"
  if info.size > cap:
    return f"declares {info.size} bytes, over the cap of {cap} (refused before reading)"
  return None


class _Group:
  __slots__ = ("key", "index", "parts", "problem")

  def __init__(self, key: str, index: int):
    self.key, self.index, self.parts, self.problem = key, index, {}, None


def _finish(group: _Group, shard: Path, skips: Skips) -> Sample | None:
  where = f"{shard}:{group.key}"
  if group.problem is not None:
    skips.add(where, group.problem)
    return None
  exts = [e for e in IMAGE_EXTS if e in group.parts]
  if not exts:
    skips.add(where, f"no image member ({', '.join('.' + e for e in IMAGE_EXTS)})")
    return None
  caption = meta = None
  if CAPTION_EXT in group.parts:
    try:
      caption = group.parts[CAPTION_EXT].decode("utf-8").strip() or None
    except UnicodeDecodeError as e:
      skips.add(where, f"caption .txt is not valid UTF-8 (byte {e.start})")
      return None
  if META_EXT in group.parts:
    try:
      meta = json.loads(group.parts[META_EXT].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
      skips.add(where, f"metadata .json is not UTF-8 JSON ({e})")
      return None
    if not isinstance(meta, dict):
      skips.add(where, f"metadata .json is a JSON {type(meta).__name__}, expected an object")
      return None
    if text_problem(json.dumps(meta, ensure_ascii=False)) is not None:
      skips.add(where, "metadata .json holds a string that is not valid Unicode")
      return None
  return Sample(group.key, shard, group.index, group.parts[exts[0]], exts[0], caption, meta)


def iter_shard(shard, skips: Skips, limits: ArchiveLimits = DEFAULT_LIMITS) -> Iterator[Sample]:
  """The samples of one shard in member order; what cannot be used goes to `skips` (module docstring)."""
  _, base_plus_ext = _wds()
  shard = Path(shard)
  if not shard.exists():
    skips.add(shard, "no such shard")
    return
  if not shard.is_file():  # a folder, or a FIFO / device whose read would block or never end
    skips.add(shard, "not a regular file")
    return
  try:
    raw = open(shard, "rb")
  except OSError as e:
    skips.add(shard, f"cannot open shard: {e.strerror or e}")
    return
  with raw:
    try:
      tf = tarfile.open(fileobj=_CappedReads(raw, TAR_HEADER_CAP), mode="r:")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
      skips.add(shard, f"not a readable uncompressed tar ({e})")
      return
    group: _Group | None = None
    count = 0
    try:
      while True:
        header_at = tf.offset
        try:
          info = tf.next()
        except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as e:
          raise _TarReadError(f"read error at byte {header_at} ({e})") from e
        tf.members = []  # tarfile keeps every header it read: not for a shard of a million members
        if info is None:
          raw.seek(header_at)
          if raw.read(_BLOCK) != b"\0" * _BLOCK:  # tarfile ends quietly at a torn or corrupt header
            raise _TarReadError(f"no end-of-archive marker at byte {header_at} (truncated or corrupt header)")
          break
        if info.isdir():
          continue
        name = info.name[2:] if info.name.startswith("./") else info.name
        if safe_member_path(name) is None:
          skips.add(f"{shard}:{name!r}", "unsafe member name (absolute, '..', backslash or control characters)")
          continue
        key, ext = base_plus_ext(name)
        if key is None:
          continue  # no extension: not part of any sample
        ext = ext.lower()
        if group is None or key != group.key:
          if group is not None:
            sample = _finish(group, shard, skips)
            if sample is not None:
              yield sample
          group = _Group(key, count)
          count += 1
        if ext not in IMAGE_EXTS and ext not in (CAPTION_EXT, META_EXT):
          continue
        if group.problem is not None:
          continue
        cap = limits.max_member_bytes if ext in IMAGE_EXTS else limits.max_json_bytes
        bad = _member_problem(info, cap)
        if bad is None and ext in group.parts:
          bad = f"member .{ext} appears twice (which one is meant is ambiguous)"
        if bad is None and ext in IMAGE_EXTS and any(e in group.parts for e in IMAGE_EXTS):
          bad = "two image members (which one is meant is ambiguous)"
        if bad is not None:
          group.problem = f"{name}: {bad}"
          continue
        raw.seek(info.offset_data)
        data = raw.read(info.size)
        if len(data) != info.size:
          raise _TarReadError(f"member {name} ends after {len(data)} of its {info.size} bytes")
        group.parts[ext] = data
    except _TarReadError as e:
      where = f"{shard}:{group.key}" if group is not None else str(shard)
      also = f" ({group.problem})" if group is not None and group.problem else ""
      skips.add(where, f"truncated or corrupt shard: {e}{also}; the rest of the shard is not read")
      return
    if group is not None:
      sample = _finish(group, shard, skips)
      if sample is not None:
        yield sample


def iter_samples(
  shards: Iterable[str | os.PathLike], skips: Skips, limits: ArchiveLimits = DEFAULT_LIMITS
) -> Iterator[Sample]:
  """Every sample of `shards`, shard after shard (module docstring); files are opened one at a time."""
  for shard in shards:
    yield from iter_shard(shard, skips, limits)


__all__ = [
  "Sample",
  "WebdatasetError",
  "expand_shards",
  "iter_samples",
  "iter_shard",
  "shard_share",
  "IMAGE_EXTS",
]
