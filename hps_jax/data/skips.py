"""The one record of skipped inputs: every input a command could not use is named with the reason, counted and
reported at the end of the run (never silently dropped). The command line turns it into the summary and exit 1."""

from __future__ import annotations


class Skips:
  """(what, why) pairs in the order they were met (`items`)."""

  def __init__(self):
    self.items: list[tuple[str, str]] = []

  def add(self, what: str, why: str) -> None:
    self.items.append((str(what), str(why)))

  def extend(self, other: Skips, prefix: str = "") -> None:
    """Takes over another record's items, each name prefixed (e.g. 'base: ')."""
    self.items.extend((prefix + what, why) for what, why in other.items)
