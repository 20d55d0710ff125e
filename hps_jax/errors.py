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


class Interrupted(BaseException):
  """The run stopped cleanly on a signal; `exit_code` is 128 + the signal number. A BaseException (like
  KeyboardInterrupt), so the `except Exception` of per-item error handling never swallows a stop."""

  def __init__(self, signum: int, message: str = ""):
    self.signum = int(signum)
    name = signal.Signals(self.signum).name if self.signum in iter(signal.Signals) else str(self.signum)
    super().__init__(message or f"stopped by {name}")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


# The signal a command was asked to stop on (set by the CLI's handler, None while running normally). Long loops
# check it at their progress points (`check_stop`), so a stop lands even if the exception the handler raised was
# swallowed where Python cannot propagate it (a finalizer, a callback).
pending_stop: list[int] = []


def check_stop() -> None:
  """Raises Interrupted if a stop signal arrived."""
  if pending_stop:
    raise Interrupted(pending_stop[0])
