"""The README's Install and Weights sections: every `hps-jax ...` command they show runs offline as printed, and the
weights table names exactly the registry's entries with the registry's sha256 and sizes."""

import re
import shlex
from pathlib import Path

import pytest

from hps_jax import weights
from hps_jax.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
  start = README.index(f"## {title}\n")
  end = README.index("\n## ", start + 1)
  return README[start:end]


def _commands(section: str) -> list[list[str]]:
  cmds = []
  for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
    for line in block.splitlines():
      line = line.split("#", 1)[0].strip()
      if line.startswith("hps-jax "):
        cmds.append(shlex.split(line)[1:])
  return cmds


def test_install_commands_run_offline(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HPS_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HPS_JAX_OFFLINE", "1")
  cmds = _commands(_section("Install"))
  assert ["--version"] in cmds and ["weights", "list"] in cmds
  for argv in cmds:
    if argv == ["--version"]:
      with pytest.raises(SystemExit) as e:
        main(argv)
      assert e.value.code == 0
    else:
      assert main(argv) == 0, argv
  out = capsys.readouterr().out
  for name in weights.REGISTRY:
    assert name in out  # `weights list` shows every known name


def test_weights_table_matches_the_registry():
  rows = [line for line in _section("Weights and data").splitlines() if line.startswith("| `")]
  names = [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]
  assert names == list(weights.REGISTRY)
  for row, name in zip(rows, names):
    entry = weights.REGISTRY[name]
    if entry.sha256:
      assert entry.sha256 in row, name
    if entry.size:
      assert f"{entry.size:,}" in row, name
