"""The exceptions of the error contract that every layer may raise (models excepted: they raise plain ValueError and
their loaders name the file).

- `InputError`: a bad input file, record, checkpoint, config or argument: the command prints one line naming it
  and what was expected, and exits 2 (no traceback).
- `Interrupted`: a clean stop on SIGINT / SIGTERM (the work done so far is saved): exit 128 + the signal number
  (130 / 143).
"""

from __future__ import annotations

import signal


class InputError(ValueError):
  """Bad input (file, record, checkpoint, config, argument); its message is the one line the user sees."""


class Interrupted(Exception):
  """The run stopped cleanly on a signal; `exit_code` is 128 + the signal number."""

  def __init__(self, signum: int, message: str = ""):
    self.signum = int(signum)
    name = signal.Signals(self.signum).name if self.signum in iter(signal.Signals) else str(self.signum)
    super().__init__(message or f"stopped by {name}")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum
