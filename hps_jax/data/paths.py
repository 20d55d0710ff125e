"""Paths taken from files (JSONL rows, manifests, zip member names): resolved against the file's folder and kept
inside it, and names made safe before anything is written under an output folder.

The rule of :func:`confine`, used by every reader of such paths (`hps_jax.data.pairs`, `hps_jax.data.diffusiondb`,
`hps_jax.adapt.label`, `hps_jax.adapt.train_lora`):

* a **relative** path is resolved against ROOT, the folder of the file that names it, and must stay inside ROOT
  after normalization: `imgs/a.png` and `imgs/../b.png` are fine, `../b.png` and `imgs/../../etc/x` escape. This is
  what makes a dataset folder self-contained and shareable: a relative path that leaves its folder is a moved
  dataset or a path-traversal attempt, and is refused unless the user allows it (`allow_outside=True`, the
  command line's `--allow-outside-paths`);
* an **absolute** path is taken as written. Real manifests hold absolute paths (and `hps-jax label` itself
  writes them for images it does not copy), an absolute path names a location on purpose rather than by
  traversal, and refusing them by default would break those files for no protection (the images are only read,
  never written or echoed);
* the check is lexical (`os.path.normpath`), symlinks are not followed: a folder the user links into the dataset
  (images on another disk) stays usable. Writes never go through paths read from files (see
  :func:`safe_member_path`), so a symlink can at worst make a read find a file the user linked;
* empty paths, paths holding a NUL character and strings that are not valid Unicode (a lone surrogate such as
  `"\\ud800"`, valid JSON but not encodable) are refused whatever the flag.

Refusals raise :class:`OutsidePathError` (an `InputError`); readers of row-per-line files catch it and count the
row as a skip naming its line, readers of files that must be whole (a training manifest) let it propagate.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import PurePosixPath

from hps_jax.errors import InputError

ALLOW_FLAG = "--allow-outside-paths"


class OutsidePathError(InputError):
  """A path read from a file that escapes its root (or cannot be a path at all); the message says which."""


def text_problem(s: str) -> str | None:
  """Why `s` cannot be used as text (written to a UTF-8 file, passed to a tokenizer or the OS), or None."""
  try:
    s.encode("utf-8")
  except UnicodeEncodeError as e:
    return f"not valid Unicode (lone surrogate {s[e.start]!r} at character {e.start})"
  return None


def confine(path: str, root, *, allow_outside: bool = False, what: str = "image path") -> str:
  """`path` (read from a file in folder `root`) resolved against `root`, normalized; raises OutsidePathError when
  it escapes `root` (module docstring). The result is absolute when `path` or `root` is."""
  if not isinstance(path, str):
    raise OutsidePathError(f"{what} must be a string, got {type(path).__name__}")
  if not path:
    raise OutsidePathError(f"{what} is empty")
  if "\x00" in path:
    raise OutsidePathError(f"{what} {path!r} holds a NUL character")
  bad = text_problem(path)
  if bad is not None:
    raise OutsidePathError(f"{what} {path!r} is {bad}")
  if os.path.isabs(path):
    return os.path.normpath(path)
  root = os.fspath(root) or "."
  joined = os.path.normpath(os.path.join(root, path))
  if not allow_outside:
    rel = os.path.relpath(os.path.abspath(joined), os.path.abspath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
      raise OutsidePathError(f"{what} {path} escapes {root} (pass {ALLOW_FLAG} to allow)")
  return joined


# ------------------------------------------------------------------------------------------------------------
# names of files written from untrusted names (zip members)
# ------------------------------------------------------------------------------------------------------------
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\:*?\"<>|]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_member_path(name: str) -> PurePosixPath | None:
  """The archive member name as a relative path that is safe to create under an output folder as it is, or None
  when it is not: absolute, a drive letter, empty / `.` / `..` components, backslashes, control or
  Windows-reserved characters, or not valid Unicode."""
  if not name or name.startswith("/") or _DRIVE.match(name) or _UNSAFE_CHARS.search(name) or text_problem(name):
    return None
  parts = name.split("/")
  if any(p in ("", ".", "..") or p != p.strip() or p.endswith(".") for p in parts):
    return None
  return PurePosixPath(*parts)


def safe_basename(name: str, max_len: int = 100) -> str:
  """A harmless file name derived from the last component of `name` (unsafe characters become `_`, the
  extension is kept, at most `max_len` characters)."""
  base = re.split(r"[/\\]", name)[-1]
  base = base.encode("utf-8", "replace").decode("utf-8")
  base = _UNSAFE_CHARS.sub("_", base).strip(" .") or "member"
  if len(base) > max_len:
    stem, dot, ext = base.rpartition(".")
    base = (stem[: max_len - len(ext) - 1] + "." + ext) if dot and len(ext) < 16 else base[:max_len]
  return base


def collision_key(rel: PurePosixPath) -> str:
  """The key two output paths collide under on any common file system (case-insensitive, Unicode-normalized)."""
  return unicodedata.normalize("NFC", rel.as_posix()).casefold()
