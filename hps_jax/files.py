"""Atomic output files: every result file is written to a temporary file in the target's folder and renamed over
the target only when complete, so a crash, a signal or a full disk never leaves a half-written output (or a
truncated input, when a user points an output at it)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path, *, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary path next to `path` (with `suffix`, for writers that choose the format by extension);
  on success it is fsynced and renamed to `path`, on any exception it is removed and the target is untouched."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
  os.close(fd)
  tmp = Path(name)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    if e.filename is None:  # a write that failed (disk full, file too large): name the output it was for
      raise OSError(e.errno, f"cannot write it ({e.strerror or e})", str(path)) from e
    raise
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None):
  """`open(path, mode)` written atomically (see `atomic_path`); text files are UTF-8 unless told otherwise."""
  with atomic_path(path) as tmp:
    kw = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    with open(tmp, mode, **kw) as f:
      yield f


def write_text(path, text: str) -> None:
  with atomic_write(path) as f:
    f.write(text)
