"""JSONL lists of images (and prompts), the input format of `hps-jax score --pairs`, `hps-jax metrics` and
`hps-jax label`: one {"image": PATH, "prompt": TEXT} object per line. Relative image paths are relative to the
JSONL file's folder and must stay inside it unless `allow_outside=True` (`--allow-outside-paths`); absolute paths
are taken as written (the rule and its reasons: `hps_jax.data.paths`).

What a reader does with a hostile or broken file:

* a whole file that cannot be JSON Lines text (unreadable, binary data, a UTF-16 file) raises
  :class:`~hps_jax.errors.InputError` naming it; so does a file with no rows at all (`read_image_rows`);
* each bad line is passed to `skip("FILE:LINE", why)` and the read goes on: a line that is not valid UTF-8, is
  longer than `MAX_LINE_CHARS`, is not valid JSON (or nests too deeply), is JSON but not an object, lacks a
  field, has a field of the wrong type, holds a string that is not valid Unicode (a lone surrogate `"\\ud800"`
  is valid JSON but cannot be written back or tokenized), or names an image path that escapes the folder.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Callable, Iterator

from hps_jax.data.paths import OutsidePathError, confine, text_problem
from hps_jax.errors import InputError

MAX_LINE_CHARS = 16 * 1024 * 1024  # one JSON object per line; longer lines are skipped without being held whole
_SNIFF = 8192


def _binary_problem(head: bytes) -> str | None:
  if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
    return "a UTF-16/32 text file (byte order mark)"
  if b"\x00" in head:
    return "binary data (NUL bytes)"
  return None


def _lines(p: Path, skip: Callable[[str, str], None]) -> Iterator[tuple[int, str]]:
  """(line number, decoded line) of a UTF-8 text file read in binary, one line at a time (never the whole file);
  undecodable and over-long lines go to `skip`."""
  limit = MAX_LINE_CHARS * 4  # bytes: a line of MAX_LINE_CHARS characters takes at most 4 bytes each
  try:
    f = open(p, "rb")
  except OSError as e:
    raise InputError(f"cannot read {p}: {e.strerror or e}") from e
  with f:
    try:
      head = f.peek(_SNIFF)[:_SNIFF] if hasattr(f, "peek") else b""
    except OSError as e:
      raise InputError(f"cannot read {p}: {e.strerror or e}") from e
    bad = _binary_problem(head)
    if bad is not None:
      raise InputError(f"{p}: {bad}, expected UTF-8 JSON Lines text (one JSON object per line)")
    n = 0
    while True:
      try:
        raw = f.readline(limit + 1)
      except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from e
      if not raw:
        return
      n += 1
      where = f"{p}:{n}"
      if len(raw) > limit and not raw.endswith(b"\n"):
        while raw and not raw.endswith(b"\n"):  # drop the rest of the line, a chunk at a time
          raw = f.readline(limit)
        skip(where, f"line longer than {MAX_LINE_CHARS} characters")
        continue
      if n == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        skip(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start})")
        continue
      if len(line) > MAX_LINE_CHARS:
        skip(where, f"line longer than {MAX_LINE_CHARS} characters")
        continue
      yield n, line


def jsonl_objects(path, skip: Callable[[str, str], None]) -> Iterator[tuple[str, object]]:
  """Yields (`file:line`, parsed value) for every non-blank line of a JSONL file, read line by line; a line that
  cannot be read or is not valid JSON goes to `skip(where, why)` and the read goes on. A file that cannot be
  read, or is not text, raises InputError (a ValueError)."""
  p = Path(path)
  if p.is_dir():
    raise InputError(f"cannot read {p}: is a directory, expected a .jsonl file")
  for n, line in _lines(p, skip):
    if not line.strip():
      continue
    where = f"{p}:{n}"
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      skip(where, f"not valid JSON ({e.msg})")
      continue
    except RecursionError:
      skip(where, "not valid JSON (nested too deeply)")
      continue
    yield where, value


def _row_problem(row, require_prompt: bool) -> str | None:
  want = 'string fields "image" and "prompt"' if require_prompt else 'a string field "image"'
  if not isinstance(row, dict):
    return f"expected an object with {want}, got a JSON {_json_type(row)}"
  image, prompt = row.get("image"), row.get("prompt")
  if "image" not in row or (require_prompt and "prompt" not in row):
    missing = [k for k in ("image", "prompt")[: 2 if require_prompt else 1] if k not in row]
    return f"expected an object with {want} (missing {', '.join(repr(k) for k in missing)})"
  if not isinstance(image, str):
    return f'expected an object with {want} ("image" is a JSON {_json_type(image)})'
  if require_prompt and not isinstance(prompt, str):
    return f'expected an object with {want} ("prompt" is a JSON {_json_type(prompt)})'
  if isinstance(prompt, str):
    bad = text_problem(prompt)
    if bad is not None:
      return f'"prompt" is {bad}'
  return None


def _json_type(v) -> str:
  if v is None:
    return "null"
  return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
    type(v), type(v).__name__
  )


def read_image_rows(
  path, skip: Callable[[str, str], None], require_prompt: bool = True, *, allow_outside: bool = False
) -> Iterator[tuple[str, str | None]]:
  """Yields (image path, prompt or None), image paths resolved against the JSONL's folder (module docstring).
  Every bad line is passed to `skip(where, why)` with its `file:line` and the run goes on; an unreadable or
  non-text file, one with no rows at all, or one whose every row is bad, raises InputError (a ValueError) once
  the lines are read."""
  p = Path(path)
  lines = yielded = 0
  first: list[tuple[str, str]] = []

  def counted(where: str, why: str) -> None:
    nonlocal lines
    lines += 1
    first[:] = first or [(where, why)]
    skip(where, why)

  for where, row in jsonl_objects(p, counted):
    lines += 1
    bad = _row_problem(row, require_prompt)
    if bad is None:
      try:
        img = confine(row["image"], p.parent, allow_outside=allow_outside)
      except OutsidePathError as e:
        bad = str(e)
    if bad is not None:
      first[:] = first or [(where, bad)]
      skip(where, bad)
      continue
    yielded += 1
    prompt = row.get("prompt")
    yield img, prompt if isinstance(prompt, str) else None
  if yielded == 0:
    want = '{"image", "prompt"}' if require_prompt else '{"image"}'
    if lines == 0:
      raise InputError(f"{p}: no rows (expected one {want} JSON object per line)")
    where, why = first[0]
    raise InputError(f"{p}: no usable row, all {lines} skipped (first: {where}: {why})")
