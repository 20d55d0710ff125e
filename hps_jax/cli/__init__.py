"""`hps-jax` command line: one entry point, one subcommand per job.

The table below names every subcommand, the module that implements it and its one-line help. Only the chosen
subcommand's module is imported (so `hps-jax --help` and `hps-jax score --help` stay fast, and a command never pays
for another's dependencies). Each module registers its parser through `add_<name>(sub)`; `run` is set as its
default. The error contract is in `hps_jax.cli.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from hps_jax import __version__
from hps_jax.cli.common import EXIT_FAILED, EXIT_USAGE, HelpFormatter, UsageError
from hps_jax.errors import InputError, Interrupted, pending_stop

# name -> (module, one-line help); the order is the order of `hps-jax --help`
COMMANDS: dict[str, tuple[str, str]] = {
  "score": ("hps_jax.cli.score", "HPS of images against prompts (JSONL out)"),
  "aesthetic": ("hps_jax.cli.score", "LAION aesthetic score of images (JSONL out)"),
  "train-preference": ("hps_jax.cli.preference", "train the preference classifier (HPS) from a config"),
  "eval-preference": ("hps_jax.cli.preference", "preference accuracy of a scorer on a dataset (the paper's Table 2)"),
  "dataset": (
    "hps_jax.cli.dataset",
    "statistics of a preference dataset and its Table 1 metrics (IS / FID of preferred vs non-preferred)",
  ),
  "fid": ("hps_jax.cli.metrics", "Frechet Inception Distance between two image sets (or a set and saved stats)"),
  "metrics": ("hps_jax.cli.metrics", "generator metrics of an image set: fid, is, kid, clip, aesthetic, hps"),
  "sample": ("hps_jax.cli.sample", "Stable Diffusion v1.x text-to-image (CFG with a negative prompt)"),
  "label": ("hps_jax.cli.adapt", "HPS-label generated images (DiffusionDB) for the LoRA adaptation"),
  "train-lora": ("hps_jax.cli.adapt", "LoRA-adapt Stable Diffusion on an HPS-labelled manifest"),
  "eval-generator": ("hps_jax.cli.adapt", "Table 4: FID, aesthetic, CLIP score, HPS of base vs LoRA-adapted SD"),
  "benchmark": (
    "hps_jax.cli.benchmark",
    "generator leaderboard on a prompt set (HPSv2 / ImageReward protocols) with one or more scorers",
  ),
  "correlate": ("hps_jax.cli.correlate", "per-image agreement of two or more scores (Pearson / Spearman / Kendall)"),
  "weights": ("hps_jax.cli.weights", "list, locate and verify the published weights hps_jax knows (cache, sha256)"),
  "convert": ("hps_jax.cli.convert", "any supported PyTorch / safetensors checkpoint to safetensors (no torch needed)"),
  "collect": ("hps_jax.cli.collect", "build a preference dataset from Discord chat exports (DiscordChatExporter JSON)"),
  "study": ("hps_jax.cli.study", "human A/B preference studies: create, serve (web app), export the votes, report"),
  "demo": ("hps_jax.cli.demo", "the whole paper pipeline offline on tiny random models (what `make demo` runs)"),
}


def _adder(name: str):
  module = importlib.import_module(COMMANDS[name][0])
  return getattr(module, "add_" + name.replace("-", "_"))


def build_parser(command: str | None = None, *, full: bool = False) -> argparse.ArgumentParser:
  """The parser; only `command`'s module is imported, the other subcommands are listed by name and help
  (full=True: every subcommand's parser is built, e.g. to inspect all of them)."""
  parser = argparse.ArgumentParser(
    prog="hps-jax",
    description="Human Preference Score (HPS) in JAX: score images, train and evaluate preference models, measure "
    "and adapt generators. `hps-jax COMMAND --help` shows a command's options and their defaults.",
    formatter_class=HelpFormatter,
  )
  parser.add_argument("--version", action="version", version=f"hps-jax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
  for name, (_, help) in COMMANDS.items():
    if full or name == command:
      _adder(name)(sub)
    else:
      sub.add_parser(name, help=help)  # listed in --help; its options are only built when it is chosen
  return parser


def _chosen(argv: list[str]) -> str | None:
  """The subcommand in argv: the first argument that is not an option."""
  for arg in argv:
    if not arg.startswith("-"):
      return arg if arg in COMMANDS else None
  return None


def _join_distributed_run():
  """`hps_jax.parallel.initialize()` when the environment may describe a multi-process run (HPS_COORDINATOR /
  HPS_NUM_PROCESSES / HPS_PROCESS_ID / HPS_DISTRIBUTED, a Slurm job, libtpu installed); otherwise JAX is not even
  imported here, so a single-process command starts as fast as it can."""
  keys = ("HPS_COORDINATOR", "HPS_NUM_PROCESSES", "HPS_PROCESS_ID", "HPS_DISTRIBUTED", "SLURM_JOB_ID")
  if not (any(k in os.environ for k in keys) or importlib.util.find_spec("libtpu") is not None):
    return
  from hps_jax import parallel  # imports JAX: only for a run that may span processes

  try:
    parallel.initialize()
  except ValueError as e:
    raise UsageError(f"cannot join the multi-process run: {e}") from e


def main(argv=None) -> int:
  """The error contract of every command: 0 all done; 1 some inputs skipped (each named); 2 bad usage or a bad
  input file / checkpoint / config (one line naming it); 3 internal error (one line + the log file holding the
  traceback); 130 / 143 after a clean stop on SIGINT / SIGTERM."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser(_chosen(argv))
  if not argv:
    parser.print_help()
    return EXIT_USAGE
  args, extra = parser.parse_known_args(argv)
  if args.command is None:
    parser.error("choose a COMMAND")
  if extra and not getattr(args, "accepts_config_overrides", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.overrides = extra
  name = f"hps-jax {args.command}"
  try:
    with _sigterm_raises():
      _join_distributed_run()
      return args.run(args)
  except Interrupted as e:
    print(f"{name}: {e}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:
    print(f"{name}: stopped by SIGINT", file=sys.stderr)
    return 128 + signal.SIGINT
  except InputError as e:
    print(f"{name}: error: {_first_line(e, 400)}", file=sys.stderr)
    return EXIT_USAGE
  except OSError as e:  # a file the user named: missing, a directory, unreadable, not writable, disk full
    path_errors = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    if e.filename is None and not isinstance(e, path_errors):
      return _internal_error(name, argv, e)
    text = f"{e.filename}: {e.strerror or e}" if e.filename is not None else _first_line(e, 400)
    print(f"{name}: error: {text}", file=sys.stderr)
    return EXIT_USAGE
  except RecursionError as e:
    print(f"{name}: error: an input nests too deeply to be read ({_first_line(e)})", file=sys.stderr)
    return EXIT_USAGE
  except MemoryError:
    print(f"{name}: error: out of host memory: lower --batch-size or the input sizes", file=sys.stderr)
    return EXIT_USAGE
  except Exception as e:  # noqa: BLE001
    if _out_of_memory(e):
      print(
        f"{name}: error: the accelerator ran out of memory ({_first_line(e)}): lower --batch-size "
        "(or --height / --width, or use --dtype bfloat16)",
        file=sys.stderr,
      )
      return EXIT_USAGE
    return _internal_error(name, argv, e)


def entry() -> None:
  """The `hps-jax` console script and `python -m hps_jax.cli`: `main` with the process exit. After a stop on a
  signal the process ends at once (`os._exit`, once stdout / stderr are flushed): the outputs were abandoned
  atomically while the stop unwound, and background threads still inside a device computation must not be
  joined by interpreter shutdown (that can crash the process instead of exiting 130 / 143)."""
  rc = main()
  if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):
        stream.flush()
    os._exit(rc)
  sys.exit(rc)


@contextlib.contextmanager
def _sigterm_raises():
  """SIGTERM (what schedulers and preemptible VMs send) stops the command like Ctrl-C does: an `Interrupted`
  raised in the main thread, so outputs being written are abandoned (writes are atomic) and the exit code is 143.
  The training loop installs its own handlers for its duration (checkpoint at the next step, then stop)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    pending_stop.append(signum)
    raise Interrupted(signum)

  previous = signal.signal(signal.SIGTERM, handler)
  pending_stop.clear()
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def log_dir() -> Path:
  """Where exit-3 tracebacks go: $HPS_JAX_LOG_DIR, else hps-jax-logs/ in the system's temporary directory."""
  return Path(os.environ.get("HPS_JAX_LOG_DIR") or Path(tempfile.gettempdir()) / "hps-jax-logs")


def _internal_error(name: str, argv: list[str], e: BaseException) -> int:
  """Exit 3: one line on stderr, the traceback in a log file (named in that line)."""
  text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
  try:
    d = log_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(
      prefix=f"{name.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log", dir=d
    )
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(f"hps-jax {__version__}; argv: {argv!r}\n{text}")
    where = f"the traceback is in {path}"
  except OSError as log_error:
    where = f"the traceback could not be logged ({log_error}); rerun with HPS_JAX_LOG_DIR set to a writable folder"
  print(f"{name}: internal error: {type(e).__name__}: {_first_line(e)}; {where}", file=sys.stderr)
  return EXIT_FAILED


def _out_of_memory(e: BaseException) -> bool:
  """An XLA allocation failure (RESOURCE_EXHAUSTED / out of memory), whatever JAX version raised it."""
  text = str(e)
  return type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and (
    "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
  )


def _first_line(e: BaseException, limit: int = 160) -> str:
  line = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
  return line if len(line) <= limit else line[: limit - 3] + "..."
