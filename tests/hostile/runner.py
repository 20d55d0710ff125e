"""`python -m tests.hostile.runner ARGS...`: the real `hps-jax` entry point (`hps_jax.cli.main`), plus the process's
peak resident memory written to $HOSTILE_PEAK_FILE when it ends (VmHWM: measured from this process's exec, unlike
ru_maxrss, which carries the forking parent's resident set over). An exception main lets through is not caught here:
it prints its traceback and exits 1, exactly as `hps-jax` would."""

import os


def peak_kib() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1])
  return -1


def inject_faults() -> None:
  """Faults a case asks for: HOSTILE_FSIZE=N caps the size of any file this process writes (a full disk: writes
  past N bytes fail with EFBIG instead of killing the process with SIGXFSZ); HOSTILE_FAULT=scorer makes scoring
  raise an unexpected RuntimeError (a bug: the contract says exit 3 with the traceback in a log file)."""
  size = os.environ.get("HOSTILE_FSIZE")
  if size:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(size), int(size)))
  if os.environ.get("HOSTILE_FAULT") == "scorer":
    from hps_jax.preference import scorer

    def broken(self, items):
      raise RuntimeError("injected fault")
      yield

    scorer.Scorer.iter_scores = broken


def write_peak() -> None:
  out = os.environ.get("HOSTILE_PEAK_FILE")
  if out:
    with open(out, "w", encoding="ascii") as f:
      f.write(str(peak_kib()))


def run() -> None:
  """`hps_jax.cli.entry` (what the console script runs), with the peak written however the process ends."""
  inject_faults()
  import hps_jax.cli as cli

  main = cli.main

  def measured_main(argv=None):
    try:
      return main(argv)
    finally:
      write_peak()

  cli.main = measured_main
  if hasattr(cli, "entry"):
    cli.entry()
  else:  # an older tree (tests/hostile/survey.py measures the corpus on earlier commits)
    raise SystemExit(measured_main())


if __name__ == "__main__":
  run()
