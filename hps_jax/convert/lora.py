"""LoRA files <-> LoRA adapters as plain arrays (`{our layer path: Adapter}`, what `hps_jax.lora` loads into and
reads out of a model), for the SD UNet.

Our layer paths are diffusers' module names with slashes (`down_blocks/0/attentions/0/transformer_blocks/0/attn1/
to_out/0` <-> `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`). Every format stores a torch
`down` (r, in) and `up` (out, r); ours are their transposes, down (in, r) and up (r, out). The adapter adds
`alpha / r * up(down(x))`.

Formats `load_lora` recognizes (key by key, so prefixes may vary):

  attn_procs  the HPS v1 release and diffusers <= 0.13 `save_attn_procs` (`pytorch_lora_weights.bin`):
              `<attention>.processor.to_q_lora.down.weight` / `.up.weight` (to_q, to_k, to_v, to_out -> to_out.0).
              No alpha: scale 1.
  diffusers   diffusers 0.14 - 0.2x (`LoRACompatibleLinear`, and what today's training scripts write through
              `convert_state_dict_to_diffusers`): `unet.<module>.lora.down.weight` / `.lora.up.weight`
              (also `.lora_linear_layer.`).
  peft        today's diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also unprefixed,
              `base_model.model.` prefixed, or with an adapter name `lora_A.<name>.weight`).
  kohya       kohya-ss sd-scripts / A1111: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight` and a
              scalar `.alpha`.

Alpha, in order: a per-module `.alpha` tensor (kohya; also honoured in the other layouts); the `LoraConfig` that
diffusers (>= 0.34) stores as JSON under the safetensors metadata key `lora_adapter_metadata` (`r`, `lora_alpha`,
`rank_pattern`, `alpha_pattern`, `use_rslora`; keys prefixed `unet.` when the pipeline wrote the file); PEFT's
`adapter_config.json` next to the file; else alpha = rank (scale 1, the diffusers convention without metadata).

Text-encoder keys (`text_encoder.`, `text_encoder_2.`, `lora_te_`, `lora_te1_`, `lora_te2_`) are skipped and
counted (`info["skipped_text_encoder"]`): this package adapts the UNet only. Any other key, DoRA keys and LoRA
biases raise `CheckpointError` naming the file and the key.

`load_lora` runs one parser per format: each key is matched against the formats' key patterns (`_FORMATS`, in
order), and the format that recognizes it turns it into (module, down | up | alpha).

Writers, from `{our layer path: Adapter}`: `save_peft` (what `pipe.load_lora_weights` reads, alpha in the
metadata), `save_kohya` (A1111, ComfyUI and diffusers' kohya conversion), `save_legacy` (the attn-procs layout;
scale folded into `up`). This module works on files and plain arrays only; what needs a live NNX model (the same
writers taking a model, `apply_lora_file`, `save_merged_unet`, kohya names resolved against the model's layers)
is in `hps_jax.lora`. torch is needed only to read or write `.bin` pickles and is imported lazily.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from safetensors import safe_open

from hps_jax import files
from hps_jax.convert.io import CheckpointError, _is_safetensors, load_state_dict, read_json, save_safetensors

LORA_WEIGHT_NAMES = (
  "pytorch_lora_weights.safetensors",
  "pytorch_lora_weights.bin",
  "adapter_model.safetensors",
  "adapter_model.bin",
)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON LoraConfig)
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
_STRIP_PREFIXES = ("base_model.model.", "unet.")
_LEGACY_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}

_KOHYA = re.compile(r"^lora_unet_(?P<name>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_ATTN_PROCS = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_DIFFUSERS = re.compile(r"^(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up)\.weight$")
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_MODULE_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_UNSUPPORTED = re.compile(
  r"(lora_magnitude_vector|dora_scale|lora_B(\.[^.]+)?\.bias|lora_up\.bias|hada_|lokr_"
  r"|lora_mid\.)"
)

# diffusers UNet module names that contain underscores, as token tuples (for kohya names, where every `.` became
# `_`). Longest first: the greedy parse must prefer conv_norm_out to conv_out.
_COMPOUNDS = sorted(
  (
    tuple(w.split("_"))
    for w in (
      "down_blocks",
      "up_blocks",
      "mid_block",
      "transformer_blocks",
      "to_q",
      "to_k",
      "to_v",
      "to_out",
      "proj_in",
      "proj_out",
      "conv_in",
      "conv_out",
      "conv_norm_out",
      "conv_shortcut",
      "time_emb_proj",
      "time_embedding",
      "linear_1",
      "linear_2",
      "add_embedding",
      "add_time_proj",
      "encoder_hid_proj",
    )
  ),
  key=len,
  reverse=True,
)


# ------------------------------------------------------------------------------------------------------------
# the adapter of one layer
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Adapter:
  """One layer's adapter in our layout: down (in, r), up (r, out), alpha (scale = alpha / r)."""

  down: np.ndarray
  up: np.ndarray
  alpha: float

  @property
  def rank(self) -> int:
    return int(self.down.shape[1])


# ------------------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------------------
def module_name(path: str) -> str:
  """Our layer path -> the diffusers module name ('a/b/0/to_out/0' -> 'a.b.0.to_out.0')."""
  return path.replace("/", ".")


def layer_path(module: str) -> str:
  return module.replace(".", "/")


def kohya_name(path: str) -> str:
  """Our layer path -> the kohya LoRA name ('lora_unet_down_blocks_0_..._attn1_to_q')."""
  return "lora_unet_" + path.replace("/", "_")


def _parse_kohya(name: str) -> str:
  """'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0' -> 'down_blocks.0....attn1.to_out.0'."""
  tokens, parts, i = name.split("_"), [], 0
  while i < len(tokens):
    for c in _COMPOUNDS:
      if tuple(tokens[i : i + len(c)]) == c:
        parts.append("_".join(c))
        i += len(c)
        break
    else:
      parts.append(tokens[i])
      i += 1
  return ".".join(parts)


def _kohya_lookup(layer_paths: Iterable[str]) -> dict[str, str]:
  """{kohya name without 'lora_unet_': module name} for the given layer paths (exact resolution)."""
  return {p.replace("/", "_"): module_name(p) for p in layer_paths}


def _strip(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for p in _STRIP_PREFIXES:
      if key.startswith(p):
        key, changed = key[len(p) :], True
  return key


# ------------------------------------------------------------------------------------------------------------
# reading: the file, its LoraConfig, alphas
# ------------------------------------------------------------------------------------------------------------
def resolve_lora_file(path) -> Path:
  """A LoRA weights file, or a folder holding one (diffusers / PEFT names first, else its only .safetensors)."""
  p = Path(path)
  if p.is_dir():
    for name in LORA_WEIGHT_NAMES:
      if (p / name).exists():
        return p / name
    found = sorted(p.glob("*.safetensors"))
    if len(found) == 1:
      return found[0]
    raise CheckpointError(
      f"{p}: no LoRA weights file; expected one of {list(LORA_WEIGHT_NAMES)} or a single "
      f".safetensors file (found {[f.name for f in found]})"
    )
  if not p.exists():
    raise CheckpointError(f"{p}: no such file")
  return p


def _file_metadata(path: Path) -> dict[str, str]:
  if not _is_safetensors(path):
    return {}
  try:
    with safe_open(str(path), framework="numpy") as f:
      return dict(f.metadata() or {})
  except Exception:  # unreadable metadata: load_state_dict already reported real problems
    return {}


def _peft_config(path: Path, metadata: Mapping[str, str]) -> tuple[dict | None, str | None]:
  """The UNet's LoraConfig dict from diffusers' safetensors metadata or a PEFT adapter_config.json, and where from."""
  raw = metadata.get(METADATA_KEY)
  if raw:
    try:
      conf = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
      raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({str(e)[:120]})") from e
    if not isinstance(conf, dict):
      raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} is {type(conf).__name__}; expected a JSON object")
    if any(k.startswith("unet.") for k in conf):
      conf = {k[len("unet.") :]: v for k, v in conf.items() if k.startswith("unet.")}
    elif any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in conf):
      conf = {}
    if conf:
      return conf, f"safetensors metadata {METADATA_KEY!r}"
  side = path.parent / "adapter_config.json"
  if side.exists():
    return read_json(side, "a PEFT adapter config (a JSON object)"), str(side)
  return None, None


def _no_constant(name):
  raise ValueError(f"{name} is not a JSON number")


# An alpha_pattern key is a regex matched against module names (as PEFT does). Untrusted, so only the forms PEFT
# and diffusers write are accepted: module names, optionally with `.*` / `^` / `$` / `|` / escapes; no groups,
# classes or counted / `+` / `?` quantifiers (which could backtrack exponentially), a few `*` at most.
_SAFE_PATTERN = re.compile(r"^[A-Za-z0-9_.\-*^$|\\]{1,300}$")


def _pattern_value(patterns: Mapping[str, float], module: str, source="LoRA config"):
  """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
  for key, value in patterns.items():
    if not isinstance(key, str) or not _SAFE_PATTERN.match(key) or key.count("*") > 2:
      raise CheckpointError(f"{source}: unsupported alpha_pattern key {key!r:.80} (expected a module name)")
    try:
      found = re.match(rf"(.*\.)?({key})$", module)
    except re.error as e:
      raise CheckpointError(f"{source}: alpha_pattern key {key!r:.80} is not a valid pattern ({e})") from e
    if found:
      return value
  return None


def _alpha_number(value, what: str, source) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise CheckpointError(f"{source}: {what} = {value!r:.40} is not a finite number")
  return float(value)


def _config_alpha(conf: Mapping, module: str, rank: int, source="LoRA config") -> float:
  patterns = conf.get("alpha_pattern") or {}
  if not isinstance(patterns, Mapping):
    raise CheckpointError(f"{source}: alpha_pattern is {type(patterns).__name__}; expected a JSON object")
  alpha = _pattern_value(patterns, module, source)
  what = f"alpha_pattern for {module}"
  if alpha is None:
    alpha, what = conf.get("lora_alpha", rank), "lora_alpha"
  alpha = _alpha_number(alpha, what, source)
  if conf.get("use_rslora"):  # PEFT's rsLoRA scale alpha / sqrt(r), in our alpha / r convention
    alpha *= math.sqrt(rank)
  return alpha


def _as_matrix(a: np.ndarray, key: str, source) -> np.ndarray:
  a = np.asarray(a, np.float32)
  if a.ndim == 4 and a.shape[2:] == (1, 1):  # 1x1-conv LoRA (kohya's proj_in / proj_out on SD 1.x)
    a = a[:, :, 0, 0]
  if a.ndim != 2:
    raise CheckpointError(f"{source}: {key} has shape {a.shape}; only linear (and 1x1-conv) LoRA is supported")
  return a


# ------------------------------------------------------------------------------------------------------------
# reading: one parser per format
# ------------------------------------------------------------------------------------------------------------
_Known = Mapping[str, str] | None  # {kohya name without 'lora_unet_': module name}, from the model's layers


def _kohya_entry(m: re.Match, known: _Known) -> tuple[str, str]:
  module = known.get(m["name"]) if known is not None else None
  return module or _parse_kohya(m["name"]), _KOHYA_PARTS[m["part"]]


def _attn_procs_entry(m: re.Match, known: _Known) -> tuple[str, str]:
  return f"{m['attn']}.{_LEGACY_TARGETS[m['proj']]}", m["part"]


def _diffusers_entry(m: re.Match, known: _Known) -> tuple[str, str]:
  return m["module"], m["part"]


def _peft_entry(m: re.Match, known: _Known) -> tuple[str, str]:
  return m["module"], {"A": "down", "B": "up"}[m["part"]]


@dataclasses.dataclass(frozen=True)
class _Format:
  """A LoRA file layout: the pattern its (prefix-stripped) keys match, and the parser of a match ->
  (diffusers module name, 'down' | 'up' | 'alpha')."""

  name: str
  pattern: re.Pattern
  parse: Callable[[re.Match, _Known], tuple[str, str]]
  config_alpha: bool  # without `.alpha` keys, alpha comes from a LoraConfig (metadata / adapter_config.json)


# In detection order (the first pattern that matches a key decides its format).
_FORMATS = (
  _Format("kohya", _KOHYA, _kohya_entry, config_alpha=False),
  _Format("attn_procs", _ATTN_PROCS, _attn_procs_entry, config_alpha=False),
  _Format("diffusers", _DIFFUSERS, _diffusers_entry, config_alpha=True),
  _Format("peft", _PEFT, _peft_entry, config_alpha=True),
)
_CONFIG_ALPHA = {f.name for f in _FORMATS if f.config_alpha}


def _detect(key: str) -> tuple[_Format, re.Match] | None:
  """The format whose key pattern matches the (prefix-stripped) `key`, and the match."""
  for fmt in _FORMATS:
    if m := fmt.pattern.match(key):
      return fmt, m
  return None


@dataclasses.dataclass
class _Parsed:
  """A LoRA state dict sorted by module: down / up matrices (torch layout, with their keys) and alphas."""

  downs: dict[str, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  ups: dict[str, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  alphas: dict[str, float] = dataclasses.field(default_factory=dict)
  formats: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: int = 0  # text-encoder keys


def _parse(sd: Mapping[str, np.ndarray], source: str, known: _Known) -> _Parsed:
  """Every key -> its format's parser; text-encoder keys are counted and skipped, anything else raises."""
  out = _Parsed()
  for key, value in sd.items():
    if key.startswith(_TEXT_PREFIXES) or _strip(key).startswith(_TEXT_PREFIXES):
      out.skipped += 1
      continue
    if _UNSUPPORTED.search(key):
      raise CheckpointError(
        f"{source}: key {key!r} belongs to an unsupported adapter type (DoRA, LoRA bias, LyCORIS "
        "LoHa / LoKr / LoCon-mid); only plain LoRA is supported"
      )
    k = _strip(key)
    if found := _detect(k):
      fmt, m = found
      module, part = fmt.parse(m, known)
      out.formats[fmt.name] += 1
    elif m := _MODULE_ALPHA.match(k):  # a per-module alpha next to any layout's matrices
      module, part = m["module"], "alpha"
    else:
      raise CheckpointError(
        f"{source}: unrecognized LoRA key {key!r} (expected the attn-procs, diffusers, PEFT or "
        "kohya layout of a UNet LoRA)"
      )
    if part == "alpha":
      a = np.asarray(value)
      if a.size != 1 or a.dtype.kind not in "biuf":
        raise CheckpointError(f"{source}: {key} has shape {a.shape} ({a.dtype}); expected one number")
      out.alphas[module] = _alpha_number(float(a.reshape(-1)[0]), key, source)
    else:
      (out.downs if part == "down" else out.ups)[module] = (key, _as_matrix(value, key, source))
  return out


def _check_pairs(parsed: _Parsed, source: str) -> None:
  if not parsed.downs and not parsed.ups:
    what = f" (skipped {parsed.skipped} text-encoder keys)" if parsed.skipped else ""
    raise CheckpointError(f"{source}: holds no UNet LoRA weights{what}")
  lonely = sorted(set(parsed.downs) ^ set(parsed.ups))
  if lonely:
    raise CheckpointError(f"{source}: {len(lonely)} modules have only one of the down / up matrices: {lonely[:4]}")
  stray = sorted(set(parsed.alphas) - set(parsed.downs))
  if stray:
    raise CheckpointError(f"{source}: alpha without LoRA weights for {stray[:4]}")


def _build_adapters(parsed: _Parsed, conf: Mapping | None, source: str, conf_source=None) -> dict[str, Adapter]:
  adapters: dict[str, Adapter] = {}
  for module, (dkey, down) in parsed.downs.items():
    ukey, up = parsed.ups[module]
    rank = down.shape[0]
    if up.shape[1] != rank:
      raise CheckpointError(f"{source}: {dkey} {down.shape} and {ukey} {up.shape} disagree on the rank")
    if rank < 1 or down.shape[1] < 1 or up.shape[0] < 1:
      raise CheckpointError(f"{source}: {dkey} {down.shape} / {ukey} {up.shape}: an empty adapter")
    if module in parsed.alphas:
      alpha = parsed.alphas[module]
    elif conf is not None:
      alpha = _config_alpha(conf, module, rank, conf_source or source)
    else:
      alpha = float(rank)
    adapters[layer_path(module)] = Adapter(np.ascontiguousarray(down.T), np.ascontiguousarray(up.T), alpha)
  return adapters


def load_lora(path, layer_paths: Iterable[str] | None = None) -> tuple[dict[str, Adapter], dict]:
  """Reads a LoRA file (or a folder holding one) in any format above -> ({our layer path: Adapter}, info).

  info: format ('attn_procs' | 'diffusers' | 'peft' | 'kohya', '+'-joined if a file mixes them), file, layers,
  rank (int, or None when ranks differ), ranks (sorted), alpha (float or None), alphas, alpha_source,
  skipped_text_encoder (number of text-encoder keys skipped). With `layer_paths` (the model's linear layers, e.g.
  `hps_jax.lora.linear_paths(model)`), kohya names are resolved against them exactly (otherwise through the known
  diffusers UNet module names)."""
  path = resolve_lora_file(path)
  source = str(path)
  known = _kohya_lookup(layer_paths) if layer_paths is not None else None
  parsed = _parse(load_state_dict(path), source, known)
  _check_pairs(parsed, source)

  conf, conf_source = (None, None)
  if set(parsed.formats) & _CONFIG_ALPHA:
    conf, conf_source = _peft_config(path, _file_metadata(path))
  if conf and conf.get("use_dora"):
    raise CheckpointError(f"{source}: {conf_source} says use_dora; DoRA is not supported")
  adapters = _build_adapters(parsed, conf, source, f"{source} ({conf_source})" if conf_source else None)

  ranks = sorted({a.rank for a in adapters.values()})
  alpha_values = sorted({a.alpha for a in adapters.values()})
  info = {
    "format": "+".join(sorted(parsed.formats)) or "unknown",
    "file": source,
    "layers": len(adapters),
    "rank": ranks[0] if len(ranks) == 1 else None,
    "ranks": ranks,
    "alpha": alpha_values[0] if len(alpha_values) == 1 else None,
    "alphas": alpha_values,
    "alpha_source": ("alpha keys" if parsed.alphas else conf_source if conf is not None else "rank (no alpha stored)"),
    "skipped_text_encoder": parsed.skipped,
  }
  return adapters, info


# ------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------
def _adapters(adapters: Mapping[str, Adapter]) -> dict[str, Adapter]:
  if not isinstance(adapters, Mapping):
    raise TypeError(
      f"expected {{layer path: Adapter}}, got {type(adapters).__name__} (hps_jax.lora's writers take a model)"
    )
  out = dict(adapters)
  if not out:
    raise ValueError("no LoRA adapters to save")
  return out


def _out_file(path, default_name: str) -> Path:
  p = Path(path)
  if p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
    p.parent.mkdir(parents=True, exist_ok=True)
    return p
  p.mkdir(parents=True, exist_ok=True)
  return p / default_name


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def _dtype(fp16: bool):
  return np.float16 if fp16 else np.float32


def peft_config(adapters: Mapping[str, Adapter]) -> dict:
  """The PEFT `LoraConfig` kwargs describing `adapters`: the most common rank / alpha, the others as patterns."""
  modules = {module_name(p): a for p, a in adapters.items()}
  r = collections.Counter(a.rank for a in modules.values()).most_common(1)[0][0]
  alpha = collections.Counter(a.alpha for a in modules.values()).most_common(1)[0][0]
  return {
    "r": r,
    "lora_alpha": _number(alpha),
    "rank_pattern": {m: a.rank for m, a in modules.items() if a.rank != r},
    "alpha_pattern": {m: _number(a.alpha) for m, a in modules.items() if a.alpha != alpha},
    "target_modules": sorted(modules),
    "init_lora_weights": True,
    "use_dora": False,
    "use_rslora": False,
    "lora_bias": False,
  }


def save_peft(adapters: Mapping[str, Adapter], path, *, prefix: str | None = "unet", fp16: bool = False) -> Path:
  """Writes `{layer path: Adapter}` as today's diffusers LoRA file:
  `unet.<module>.lora_A.weight` (r, in), `.lora_B.weight` (out, r), the LoraConfig (rank / alpha, per-module
  patterns where they differ) as JSON under the safetensors metadata key `lora_adapter_metadata`. `path` is a
  .safetensors file or a folder (-> folder/pytorch_lora_weights.safetensors). `pipe.load_lora_weights(path)` reads
  it. Returns the file written."""
  adapters = _adapters(adapters)
  out = _out_file(path, "pytorch_lora_weights.safetensors")
  if out.suffix != ".safetensors":
    raise ValueError(f"{out}: save_peft writes safetensors (the alpha lives in its metadata)")
  pre = f"{prefix}." if prefix else ""
  dt = _dtype(fp16)
  tensors = {}
  for p, a in adapters.items():
    m = module_name(p)
    tensors[f"{pre}{m}.lora_A.weight"] = np.asarray(a.down, np.float32).T.astype(dt)
    tensors[f"{pre}{m}.lora_B.weight"] = np.asarray(a.up, np.float32).T.astype(dt)
  conf = peft_config(adapters)
  meta = {f"{pre}{k}": v for k, v in conf.items()}
  save_safetensors(tensors, out, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
  return out


def save_kohya(adapters: Mapping[str, Adapter], path, *, fp16: bool = False) -> Path:
  """Writes the adapters in the kohya-ss / A1111 layout: `lora_unet_<module with _>.lora_down.weight` (r, in),
  `.lora_up.weight` (out, r) and a 0-d float32 `.alpha` per layer. `path` is a .safetensors file or a folder
  (-> folder/lora.safetensors). Returns the file written."""
  adapters = _adapters(adapters)
  out = _out_file(path, "lora.safetensors")
  if out.suffix != ".safetensors":
    raise ValueError(f"{out}: save_kohya writes safetensors")
  dt = _dtype(fp16)
  tensors = {}
  for p, a in adapters.items():
    name = kohya_name(p)
    tensors[f"{name}.lora_down.weight"] = np.asarray(a.down, np.float32).T.astype(dt)
    tensors[f"{name}.lora_up.weight"] = np.asarray(a.up, np.float32).T.astype(dt)
    tensors[f"{name}.alpha"] = np.asarray(a.alpha, np.float32)
  ranks = sorted({a.rank for a in adapters.values()})
  alphas = sorted({a.alpha for a in adapters.values()})
  meta = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
    "ss_network_alpha": str(_number(alphas[0])) if len(alphas) == 1 else "Dynamic",
  }
  save_safetensors(tensors, out, metadata=meta)
  return out


def save_legacy(adapters: Mapping[str, Adapter], path) -> Path:
  """Writes the attn-procs layout of diffusers <= 0.13 / the HPS v1 release
  (`<attention>.processor.to_q_lora.down.weight`, ...). It has no alpha, so each scale alpha / r is folded into
  `up` (reading it back gives alpha = r and the same delta). Only to_q / to_k / to_v / to_out.0 of attention
  modules fit. `path`: a .bin (torch.save; needs torch) or .safetensors file, or a folder
  (-> folder/pytorch_lora_weights.bin). Returns the file written."""
  adapters = _adapters(adapters)
  out = _out_file(path, "pytorch_lora_weights.bin")
  inverse = {v: k for k, v in _LEGACY_TARGETS.items()}
  tensors = {}
  for p, a in adapters.items():
    m = module_name(p)
    attn, proj = None, None
    for target, name in inverse.items():
      if m.endswith("." + target):
        attn, proj = m[: -len(target) - 1], name
        break
    if attn is None:
      raise ValueError(f"{p}: the legacy attn-procs layout holds only to_q / to_k / to_v / to_out.0 adapters")
    tensors[f"{attn}.processor.{proj}_lora.down.weight"] = np.ascontiguousarray(np.asarray(a.down, np.float32).T)
    tensors[f"{attn}.processor.{proj}_lora.up.weight"] = np.ascontiguousarray(
      (np.asarray(a.up, np.float32) * (a.alpha / a.rank)).T
    )
  if out.suffix == ".safetensors":
    save_safetensors(tensors, out, metadata={"format": "pt"})
  else:
    try:
      import torch
    except ImportError as e:
      raise CheckpointError(f"{out}: writing a .bin pickle needs torch; write .safetensors instead") from e
    with files.atomic_path(out) as tmp:
      torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, str(tmp))
  return out
