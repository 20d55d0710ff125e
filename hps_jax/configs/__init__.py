"""Training configs (ml_collections `get_config(preset)` files) and their loader.

`load_config("hps_classifier:tiny", ["--config.optim.lr=3e-5"])`: the spec is a packaged config's name
(`hps_classifier`, `lora_sd14`, resolved inside the installed package, so it works from any directory) or the path
of a config file, then `:preset`. Overrides use the absl `--config.KEY=VALUE` syntax (`--config.KEY VALUE` too);
each value is parsed to the type of the field it replaces. Every mistake — a missing file, an unknown preset, a
misspelled key, a value of the wrong type — raises ConfigError with one line naming it and the valid choices.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import itertools
from pathlib import Path

import ml_collections

from hps_jax.errors import InputError

PACKAGED_DIR = Path(__file__).resolve().parent
_NOT_CONFIGS = {"__init__", "common"}
_counter = itertools.count()


class ConfigError(InputError):
  """A config that cannot be loaded as asked; the message is one line."""


def packaged_configs() -> list[str]:
  return sorted(p.stem for p in PACKAGED_DIR.glob("*.py") if p.stem not in _NOT_CONFIGS)


def resolve(spec: str) -> tuple[Path, str | None]:
  """'name[:preset]' or 'path/to/file.py[:preset]' -> (config file, preset or None)."""
  name, sep, preset = spec.partition(":")
  path = Path(name).expanduser()
  if path.is_file():
    return path, (preset if sep else None)
  if path.is_dir():
    raise ConfigError(f"config {name!r} is a directory, expected a config .py file or one of {packaged_configs()}")
  if len(path.parts) == 1 and path.suffix in ("", ".py") and path.stem not in _NOT_CONFIGS:
    packaged = PACKAGED_DIR / f"{path.stem}.py"
    if packaged.is_file():
      return packaged, (preset if sep else None)
  close = difflib.get_close_matches(path.stem, packaged_configs(), n=1)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  raise ConfigError(
    f"config {name!r} not found: expected a config file or one of the packaged configs {packaged_configs()}{hint}"
  )


def _load_module(path: Path):
  spec = importlib.util.spec_from_file_location(f"hps_jax_config_{next(_counter)}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a config file is the user's code: whatever it raises is a bad config, named
    raise ConfigError(f"config file {path}: cannot be loaded ({type(e).__name__}: {e})") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path}: defines no get_config(preset) function")
  return module


def _base_config(path: Path, preset: str | None) -> ml_collections.ConfigDict:
  module = _load_module(path)
  presets = tuple(getattr(module, "PRESETS", ()))
  if preset is not None and presets and preset not in presets:
    close = difflib.get_close_matches(preset, presets, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"config {path.stem}: unknown preset {preset!r}{hint}; choose from {', '.join(presets)}")
  try:
    config = module.get_config(preset) if preset is not None else module.get_config()
  except Exception as e:  # noqa: BLE001  (the config file's own code failed)
    raise ConfigError(f"config {path.stem}: get_config failed ({type(e).__name__}: {e})") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config returned {type(config).__name__}, expected a ConfigDict")
  return config


def _split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
  """['--config.a.b=1', '--config.c', '2'] -> [('a.b', '1'), ('c', '2')]."""
  pairs, i = [], 0
  while i < len(overrides):
    arg = overrides[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unrecognized argument {arg!r}: overrides are --config.KEY=VALUE")
    key, sep, value = arg[len("--config.") :].partition("=")
    if not sep:
      if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
        raise ConfigError(f"--config.{key}: no value (use --config.{key}=VALUE)")
      value, i = overrides[i + 1], i + 1
    if not key:
      raise ConfigError(f"{arg!r}: no key after --config.")
    pairs.append((key, value))
    i += 1
  return pairs


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _parse(key: str, raw: str, old):
  """`raw` as a value of the type of `old` (the field's current value)."""

  def bad(expected: str):
    return ConfigError(f"--config.{key}={raw}: expected {expected} (the field holds {old!r})")

  if isinstance(old, bool):
    if raw.lower() in _TRUE:
      return True
    if raw.lower() in _FALSE:
      return False
    raise bad("true or false")
  if isinstance(old, int):
    try:
      return int(raw)
    except ValueError:
      try:
        as_float = float(raw)
      except ValueError:
        raise bad("an integer") from None
      if as_float.is_integer():
        return int(as_float)
      raise bad("an integer") from None
  if isinstance(old, float):
    try:
      return float(raw)
    except ValueError:
      raise bad("a number") from None
  if isinstance(old, str):
    return raw
  if isinstance(old, (list, tuple)):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      raise bad(f"a {type(old).__name__} literal such as {list(old)[:2]!r}") from None
    if not isinstance(value, (list, tuple)):
      raise bad(f"a {type(old).__name__}")
    return type(old)(value)
  if old is None:
    try:
      return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
  raise bad(type(old).__name__)


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  parts = key.split(".")
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key}: config.{'.'.join(parts[:depth])} is a value, not a section")
    keys = sorted(node.keys())
    if part not in keys:
      prefix = ".".join(parts[:depth])
      close = difflib.get_close_matches(part, keys, n=1)
      where = f"config.{prefix}" if prefix else "config"
      hint = f"did you mean --config.{'.'.join([*parts[:depth], close[0]])}?" if close else f"{where} has {keys}"
      raise ConfigError(f"unknown config key --config.{key}: {hint}")
    if depth < len(parts) - 1:
      node = node[part]
  old = node[parts[-1]]
  if isinstance(old, ml_collections.ConfigDict):
    raise ConfigError(f"--config.{key} is a section ({sorted(old.keys())}): set one of its keys")
  value = _parse(key, raw, old)
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--config.{key}={raw}: {e}") from e


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The config `spec` names ('hps_classifier:tiny', 'path/x.py:paper') with the overrides applied."""
  path, preset = resolve(spec)
  config = _base_config(path, preset)
  for key, raw in _split_overrides(list(overrides)):
    apply_override(config, key, raw)
  config.lock()  # a typo in code that sets a key later fails loudly too
  return config
