"""The command line's conventions: --version, bare `hps-jax`, defaults in every --help, one-line config errors with
exit 2, packaged configs usable from any directory, lazy subcommand imports, and the layering rule that nothing
outside hps_jax/cli imports the CLI."""

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hps_jax
from hps_jax.cli import COMMANDS, build_parser, main
from hps_jax.cli.common import shows_default

ROOT = Path(__file__).resolve().parents[2]


def _one_error_line(err: str, command: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err
  assert len(lines) == 1, err
  assert lines[0].startswith(f"hps-jax {command}: error: "), err
  return lines[0]


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip() == f"hps-jax {hps_jax.__version__}"


def test_bare_command_prints_help_and_exits_2(capsys):
  assert main([]) == 2
  out = capsys.readouterr().out
  assert out.startswith("usage: hps-jax")
  for name in COMMANDS:  # every subcommand is listed with its help
    assert name in out


def test_unknown_command_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    main(["scoer"])
  assert e.value.code == 2
  assert "invalid choice: 'scoer'" in capsys.readouterr().err


def _subparsers(parser):
  action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return action.choices


def _all_parsers(parser, prefix=""):
  """(name, parser) of every subcommand, nested ones (`collect discord`, `dataset stats`) included."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        yield f"{prefix}{name}", sub
        yield from _all_parsers(sub, f"{prefix}{name} ")


def test_every_help_shows_every_default():
  """Every option with a default (other than None, False, '' — but 0 included) shows it in `COMMAND --help`, for
  every command and sub-command."""
  missing, checked = [], 0
  for name, sub in _all_parsers(build_parser(full=True)):
    text = " ".join(sub.format_help().split())
    for action in sub._actions:
      if not action.option_strings or not shows_default(action):
        continue
      checked += 1
      if f"(default: {action.default})" not in text:
        missing.append(f"{name} {action.option_strings[0]}")
  assert not missing, missing
  assert checked > 60  # the test sees the options (67 when written)


def test_one_name_for_one_thing():
  """The HPS checkpoint is --checkpoint in every command that takes one (old names stay as aliases)."""
  subs = _subparsers(build_parser(full=True))
  for name in ("score", "eval-preference", "metrics", "sample", "label", "eval-generator"):
    dests = {a.dest: a.option_strings for a in subs[name]._actions}
    assert "checkpoint" in dests and dests["checkpoint"][0] == "--checkpoint", name
  ref = {a.dest: a.option_strings for a in subs["eval-generator"]._actions}["reference"]
  assert ref[0] == "--reference"  # as in `metrics`


CONFIG_ERRORS = [
  ("hps_classifier:tiy", [], "unknown preset 'tiy' (did you mean 'tiny'?); choose from tiny, paper"),
  (
    "hps_classifier:tiny",
    ["--config.optim.lrr=1"],
    "unknown config key --config.optim.lrr: did you mean --config.optim.lr?",
  ),
  ("hps_classifier:tiny", ["--config.optim.lr=fast"], "--config.optim.lr=fast: expected a number"),
  ("hps_classifier:tiny", ["--config.num_steps=1.5"], "--config.num_steps=1.5: expected an integer"),
  ("hps_classifier:tiny", ["--config.progress=maybe"], "--config.progress=maybe: expected true or false"),
  ("hps_classifier:tiny", ["--config.optim=1"], "--config.optim is a section"),
  ("hps_classifier:tiny", ["--lr=1"], "unrecognized argument '--lr=1'"),
  ("no_such_config.py:tiny", [], "config 'no_such_config.py' not found"),
  ("hps_clasifier:tiny", [], "did you mean 'hps_classifier'?"),
  ("lora_sd14:papr", [], "unknown preset 'papr' (did you mean 'paper'?)"),
  ("lora_sd14:tiny", ["--config.lora.rnk=8"], "did you mean --config.lora.rank?"),
]


@pytest.mark.parametrize("config, overrides, message", CONFIG_ERRORS)
def test_config_errors_are_one_line_exit_2(config, overrides, message, tmp_path, capsys):
  command = "train-lora" if config.startswith("lora") else "train-preference"
  rc = main([command, "--config", config, "--workdir", str(tmp_path / "w"), "--dry-run", *overrides])
  assert rc == 2
  assert message in _one_error_line(capsys.readouterr().err, command)


def test_config_file_path_still_works(capsys):
  assert (
    main(["train-preference", "--config", f"{ROOT}/configs/hps_classifier.py:tiny", "--workdir", "x", "--dry-run"]) == 0
  )
  assert "parameters:" in capsys.readouterr().out


def test_dry_run_with_a_packaged_config_outside_the_checkout(tmp_path):
  """`--config hps_classifier:tiny` resolves the config shipped in the package, from a directory with no configs/."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(
    [sys.executable, "-m", "hps_jax.cli", "train-preference", "--config", "hps_classifier:tiny", "--workdir", "w",
     "--dry-run", "--config.optim.lr=3e-4"],
    capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
  )  # fmt: skip
  assert res.returncode == 0, res.stderr
  assert "trainable" in res.stdout and "lr: 0.0003" in res.stdout
  assert not (tmp_path / "w").exists()  # a dry run writes nothing


def test_help_imports_no_subcommand_module():
  """`hps-jax --help` builds only the table: no subcommand module, no JAX."""
  code = (
    "import sys; from hps_jax.cli import build_parser; build_parser().format_help(); "
    "print(sorted(m for m in sys.modules if m.startswith('hps_jax.cli.') or m == 'jax'))"
  )
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "['hps_jax.cli.common']"


def test_nothing_outside_cli_imports_the_cli():
  offenders = []
  for path in (ROOT / "hps_jax").rglob("*.py"):
    if (ROOT / "hps_jax" / "cli") in path.parents:
      continue
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      if any(n == "hps_jax.cli" or n.startswith("hps_jax.cli.") for n in names):
        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
  assert not offenders, offenders
