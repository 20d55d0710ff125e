"""Atomic output files: every result file is written to a temporary file in the target's folder and renamed over
the target only when complete, so a crash, a signal or a full disk never leaves a half-written output (or a
truncated input, when a user points an output at it)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from hps_jax.errors import InputError


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


class ResumeError(InputError):
  """A resumable output that cannot be continued (other settings, damaged file); one line naming it."""


class JsonlAppender:
  """The results of a long job, written as they come: JSON lines appended to `PATH.partial` in chunks, each chunk
  flushed and fsynced (a killed run loses at most the chunk in flight), renamed to PATH by `finish()` — so PATH
  itself only ever holds a complete result, as every other output does.

  `PATH.partial.json` records `settings` (whatever decides the results: checkpoint, inputs, options). With
  `resume=True` an existing partial run is continued: its settings must equal these (else `ResumeError`), its
  complete lines are kept and returned by `rows` (a torn last line, from a kill mid-write, is cut off) and new rows
  are appended after them. Without `resume`, a partial run left behind is started over. `rows_written` counts the
  rows this process appended (what a resumed run redid is `rows_written` minus the new inputs)."""

  def __init__(self, path, settings: dict, *, resume: bool = False):
    import json

    self.path = Path(path)
    self.partial = self.path.with_name(self.path.name + ".partial")
    self.meta = self.path.with_name(self.path.name + ".partial.json")
    self.settings = json.loads(json.dumps(settings))  # what reading it back from JSON gives
    self.rows: list[dict] = []
    self.rows_written = 0
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume and self.partial.exists():
      self._load(json)
    else:
      self.partial.unlink(missing_ok=True)
      write_text(self.meta, json.dumps({"settings": self.settings}, indent=1))
    self._f = open(self.partial, "ab")

  def _load(self, json) -> None:
    try:
      recorded = json.loads(self.meta.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ResumeError(f"{self.meta}: cannot resume, the run's settings file is unreadable ({e})") from None
    if recorded != self.settings:
      diff = sorted(k for k in set(recorded) | set(self.settings) if recorded.get(k) != self.settings.get(k))
      raise ResumeError(
        f"{self.partial}: cannot resume, it was written with other settings ({', '.join(diff)} differ): rerun without "
        "--resume to start over"
      )
    data = self.partial.read_bytes()
    keep = data.rfind(b"\n") + 1  # a line without its newline was torn by a kill: cut it off
    for i, line in enumerate(data[:keep].splitlines()):
      try:
        row = json.loads(line)
      except ValueError:
        raise ResumeError(f"{self.partial}:{i + 1}: cannot resume, not a JSON line") from None
      self.rows.append(row)
    if keep < len(data):
      with open(self.partial, "rb+") as f:
        f.truncate(keep)

  def write(self, rows) -> None:
    """Appends `rows` (dicts) as one chunk: written, flushed and fsynced before returning."""
    import json

    data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)
    if data:
      self._f.write(data)
      self._f.flush()
      os.fsync(self._f.fileno())
      self.rows_written += len(rows)

  def finish(self) -> Path:
    """Renames the complete result into place and removes the settings file."""
    self._f.close()
    os.replace(self.partial, self.path)
    self.meta.unlink(missing_ok=True)
    return self.path

  def close(self) -> None:
    """Leaves the partial result (and its settings) for a later `resume`."""
    if not self._f.closed:
      self._f.close()

  def __enter__(self) -> "JsonlAppender":
    return self

  def __exit__(self, exc_type, *_) -> None:
    self.close()
