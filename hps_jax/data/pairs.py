"""JSONL lists of images (and prompts), the input format of `hps-jax score --pairs` and `hps-jax metrics`:
one {"image": PATH, "prompt": TEXT} object per line; relative image paths are relative to the JSONL file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator


def jsonl_objects(path, skip: Callable[[str, str], None]) -> Iterator[tuple[str, object]]:
  """Yields (`file:line`, parsed value) for every non-blank line of a JSONL file; a line that is not valid JSON
  goes to `skip(where, why)` and the read goes on. An unreadable file raises ValueError."""
  p = Path(path)
  try:
    lines = p.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {p}: {e}") from e
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{p}:{n}"
    try:
      yield where, json.loads(line)
    except json.JSONDecodeError as e:
      skip(where, f"not valid JSON ({e.msg})")


def read_image_rows(
  path, skip: Callable[[str, str], None], require_prompt: bool = True
) -> Iterator[tuple[str, str | None]]:
  """Yields (image path, prompt or None). A line that is not valid JSON or lacks the required fields is passed to
  `skip(where, why)` with its `file:line` and the run goes on; an unreadable file raises ValueError."""
  p = Path(path)
  for where, row in jsonl_objects(p, skip):
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if (
      not isinstance(row, dict)
      or not isinstance(row.get("image"), str)
      or (require_prompt and not isinstance(prompt, str))
    ):
      skip(
        where,
        'expected an object with string fields "image" and "prompt"'
        if require_prompt
        else 'expected an object with a string field "image"',
      )
      continue
    img = Path(row["image"])
    yield str(img if img.is_absolute() else p.parent / img), prompt if isinstance(prompt, str) else None
