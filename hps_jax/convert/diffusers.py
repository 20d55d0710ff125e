"""diffusers' folder layout (`model_index.json`, `vae/`, `unet/`, `text_encoder/`, ...) <-> hps_jax NNX models: the
Stable Diffusion loaders and savers (`load_unet` / `save_unet`, `load_vae` / `save_vae`, `load_text_encoder` /
`save_text_encoder`) in one place.

The mapping is generic: every NNX model converted here has parameter paths that mirror diffusers' module names
(`hps_jax.models.sd_blocks`), so a parameter path and a state-dict key differ only in separators and leaf names:

  NNX path            torch key            value
  a/b/0/c/kernel      a.b.0.c.weight       conv: HWIO <-> OIHW; linear: (in, out) <-> (out, in)
  a/b/0/c/scale       a.b.0.c.weight       identity (GroupNorm / LayerNorm)
  a/b/0/c/embedding   a.b.0.c.weight       identity (nnx.Embed)
  a/b/0/c/bias        a.b.0.c.bias         identity
  a/b/other           a.b.other            identity (any other nnx.Param)

A kernel is a conv when it has 4 dims, a linear when it has 2. A 1x1 conv weight (O, I, 1, 1) is accepted for a
linear kernel and a linear weight for a 1x1 conv kernel (old checkpoints store attention projections either way).
Loading is strict: a parameter without a key, a key without a parameter, or a shape that does not fit raises
`CheckpointError` naming the weights file. The pre-0.14 names of the VAE's attention (`query`, `key`, `value`,
`proj_attn`) are read as `to_q`, `to_k`, `to_v`, `to_out.0`, as diffusers itself does.

The loaders check untrusted folders before committing memory: config.json must be a JSON object whose values pass
the config's `validate()` (types, sane bounds), and the model it describes (built abstractly, `nnx.eval_shape`) is
matched key by key against the shapes in the weights file's header (`tensor_info`, no tensor data read) before the
weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax import files
from hps_jax.convert.clip import (
  build_model,
  check_text_weights,
  config_to_hf,
  hf_weights_file,
  read_hf_config,
  text_config_from_hf,
  text_params_from_hf,
  text_params_to_hf,
)
from hps_jax.convert.io import (
  CheckpointError,
  check_float_weights,
  load_state_dict,
  one_line,
  read_json,
  save_safetensors,
  tensor_info,
)
from hps_jax.models.clip import CLIPTextEncoder
from hps_jax.models.unet import UNet2DConditionModel, UNetConfig
from hps_jax.models.vae import AutoencoderKL, VAEConfig

# Weights file names in the order diffusers / transformers prefer them.
WEIGHT_NAMES = (
  "diffusion_pytorch_model.safetensors",
  "diffusion_pytorch_model.safetensors.index.json",
  "diffusion_pytorch_model.bin",
  "diffusion_pytorch_model.bin.index.json",
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)
# Leaf names of NNX parameters that torch calls `weight`.
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
# Current attention sub-module name -> its pre-0.14 diffusers name.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------
def _variant_name(name: str, variant: str | None) -> str:
  if not variant:
    return name
  stem, _, rest = name.partition(".")
  return f"{stem}.{variant}.{rest}"


def component_files(model_dir, subfolder: str | None = None, variant: str | None = None) -> tuple[Path, Path]:
  """(config.json, weights file) of one component of a diffusers model dir (or of a component dir itself when
  `subfolder` is None). `variant` selects e.g. `diffusion_pytorch_model.fp16.safetensors`."""
  d = Path(model_dir) / subfolder if subfolder else Path(model_dir)
  if not d.is_dir():
    raise CheckpointError(f"{d}: no such directory (expected a diffusers component folder)")
  config = d / "config.json"
  if not config.exists():
    raise CheckpointError(f"{d}: a diffusers component folder needs config.json")
  for name in WEIGHT_NAMES:
    if (d / _variant_name(name, variant)).exists():
      return config, d / _variant_name(name, variant)
  raise CheckpointError(f"{d}: no weights file; expected one of {[_variant_name(n, variant) for n in WEIGHT_NAMES]}")


def load_component(model_dir, subfolder: str | None = None, variant: str | None = None) -> tuple[dict, dict]:
  """Reads `model_dir/subfolder/config.json` and its weights -> (config dict, {key: np.ndarray} state dict)."""
  config_path, weights = component_files(model_dir, subfolder, variant)
  config = read_json(config_path, "a diffusers component config (a JSON object)")
  return config, load_state_dict(weights)


def save_component(out_dir, config: Mapping, state_dict: Mapping[str, np.ndarray]) -> Path:
  """Writes config.json + diffusion_pytorch_model.safetensors (float32) into `out_dir`."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_safetensors(
    {k: np.asarray(v, np.float32) for k, v in state_dict.items()},
    out / "diffusion_pytorch_model.safetensors",
    metadata={"format": "pt"},
  )
  files.write_text(out / "config.json", json.dumps(dict(config), indent=2))
  return out


# ------------------------------------------------------------------------------------------------------------
# The generic key / value mapping
# ------------------------------------------------------------------------------------------------------------
def torch_key(path: str) -> str:
  """'down_blocks/0/resnets/1/conv1/kernel' -> 'down_blocks.0.resnets.1.conv1.weight'."""
  *module, leaf = path.split("/")
  leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
  return ".".join([*module, leaf])


def to_nnx_value(path: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A torch tensor -> the layout of the NNX parameter at `path` with `shape` (no shape check here)."""
  a = np.asarray(value)
  if not path.endswith("/kernel"):
    return a
  if len(shape) == 4:
    if a.ndim == 2:  # linear weight stored for a 1x1 conv
      a = a[:, :, None, None]
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0)) if a.ndim == 4 else a
  if len(shape) == 2:
    if a.ndim == 4 and a.shape[2:] == (1, 1):  # 1x1 conv weight stored for a linear
      a = a[:, :, 0, 0]
    return np.ascontiguousarray(a.T) if a.ndim == 2 else a
  return a


def to_torch_value(path: str, value: np.ndarray) -> np.ndarray:
  a = np.asarray(value)
  if path.endswith("/kernel"):
    if a.ndim == 4:
      return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if a.ndim == 2:
      return np.ascontiguousarray(a.T)
  return a


def model_params(model) -> dict[str, np.ndarray]:
  """{'encoder/conv_in/kernel': np.ndarray, ...} for every nnx.Param of `model`."""
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _legacy_alias(key: str) -> str | None:
  for new, old in _LEGACY_ATTENTION.items():
    for leaf in ("weight", "bias"):
      suffix = f".{new}.{leaf}"
      if key.endswith(suffix):
        return key[: -len(suffix)] + f".{old}.{leaf}"
  return None


def to_nnx_shape(path: str, shape: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...]:
  """The shape `to_nnx_value` gives a tensor of `shape` for the parameter at `path` of shape `target` (shapes
  only: for checking a weights file's header before reading it)."""
  shape = tuple(shape)
  if not path.endswith("/kernel"):
    return shape
  if len(target) == 4:
    if len(shape) == 2:
      shape = (*shape, 1, 1)
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
  if len(target) == 2:
    if len(shape) == 4 and shape[2:] == (1, 1):
      shape = shape[:2]
    return (shape[1], shape[0]) if len(shape) == 2 else shape
  return shape


def _plan(params, shapes: Mapping[str, tuple], source: str, model_name: str, ignore) -> list[tuple[str, str, object]]:
  """[(parameter path, state-dict key, variable)] for every parameter of the split `params`, matched against the
  state dict's `shapes` ({key: shape}); CheckpointError (naming `source`) on missing keys, unexpected keys and shape
  mismatches (the first of each listed)."""
  remaining = dict(shapes)
  plan, missing, mismatched = [], [], []
  for path, var in nnx.to_flat_state(params):
    p = "/".join(map(str, path))
    key = torch_key(p)
    if key not in remaining:
      alias = _legacy_alias(key)
      if alias is None or alias not in remaining:
        missing.append(key)
        continue
      key = alias
    shape = tuple(var.shape)
    got = to_nnx_shape(p, remaining.pop(key), shape)
    if got != shape:
      mismatched.append(f"{key}: checkpoint {tuple(shapes[key])} -> {got}, model {shape} ({p})")
      continue
    plan.append((p, key, var))
  unexpected = sorted(k for k in remaining if not (ignore and ignore(k)))
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing keys {missing[:8]}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected keys {unexpected[:8]}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches {mismatched[:4]}")
  if problems:
    raise CheckpointError(f"{source}: state dict does not fit {model_name}: " + "; ".join(problems))
  return plan


def check_fits(model, shapes: Mapping[str, object], source: str = "state dict", *, ignore=None) -> None:
  """Raises what `params_from_diffusers` would raise for a state dict of these shapes ({key: shape, array or
  `TensorInfo`}), without any tensor data: the check of a weights file's header against a config's model (built
  with `nnx.eval_shape`) before the weights are read."""
  _, params, _ = nnx.split(model, nnx.Param, ...)
  as_shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
  plan = _plan(params, as_shapes, source, type(model).__name__, ignore)
  if all(hasattr(v, "dtype") for v in shapes.values()):
    check_float_weights({key: shapes[key] for _, key, _ in plan}, source)


def params_from_diffusers(
  model,
  state_dict: Mapping[str, np.ndarray],
  source: str = "state dict",
  *,
  ignore: Callable[[str], bool] | None = None,
):
  """Returns `model` (concrete or from `nnx.eval_shape`) with every nnx.Param replaced by its value from the
  diffusers `state_dict`, cast to the parameter's dtype. Keys for which `ignore(key)` is true may be left over.
  Raises CheckpointError (naming `source`) on missing keys, unexpected keys and shape mismatches, before any value
  is set."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  for p, key, var in _plan(params, shapes, source, type(model).__name__, ignore):
    var.set_value(jnp.asarray(to_nnx_value(p, state_dict[key], tuple(var.shape)), dtype=var.dtype))
  return nnx.merge(graphdef, params, rest)


def build_from_diffusers(
  constructor: Callable[[], object], state_dict: Mapping[str, np.ndarray], source: str = "state dict", **kw
):
  """Builds `constructor()` abstractly (no random initialization) and fills it from `state_dict`."""
  return params_from_diffusers(nnx.eval_shape(constructor), state_dict, source, **kw)


def params_to_diffusers(model) -> dict[str, np.ndarray]:
  """The inverse mapping: `model`'s parameters as a diffusers state dict of numpy arrays (parameter dtype)."""
  return {torch_key(p): to_torch_value(p, v) for p, v in model_params(model).items()}


# ------------------------------------------------------------------------------------------------------------
# Components: unet/
# ------------------------------------------------------------------------------------------------------------
def load_unet(
  model_dir,
  subfolder: str | None = "unet",
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  variant: str | None = None,
  **config_overrides,
) -> UNet2DConditionModel:
  """A diffusers UNet folder (`model_dir/unet/{config.json, diffusion_pytorch_model.safetensors|.bin}`, or
  `model_dir` itself with subfolder=None) -> `UNet2DConditionModel`, built abstractly and filled from the weights
  (strict: missing / unexpected keys raise). `config_overrides` set our own fields (attention_backend, remat)."""
  config_path, weights = component_files(model_dir, subfolder, variant)
  config = read_json(config_path, "a diffusers UNet config (a JSON object)")
  if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise CheckpointError(f"{config_path}: _class_name {config['_class_name']!r:.60} is not 'UNet2DConditionModel'")
  try:
    cfg = UNetConfig.from_diffusers(config, **config_overrides).validate()
  except (TypeError, ValueError, ArithmeticError) as e:
    raise CheckpointError(f"{config_path}: unsupported UNet config ({one_line(e, 200)})") from e
  return _load_checked(lambda: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=param_dtype), config_path, weights)


def _load_checked(constructor, config_path: Path, weights: Path):
  """Builds `constructor()` abstractly, checks it against the weights file's header, then reads and fills it."""
  abstract = nnx.eval_shape(constructor)
  info = tensor_info(weights)
  try:
    check_fits(abstract, info, str(weights))
  except CheckpointError as e:
    raise CheckpointError(f"{e} (architecture from {config_path})") from None
  return params_from_diffusers(abstract, load_state_dict(weights), str(weights))


def save_unet(model: UNet2DConditionModel, out_dir, *, state_dict: Mapping[str, np.ndarray] | None = None) -> Path:
  """Writes `model` as a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors, float32).
  `state_dict` (diffusers keys) is written instead of the model's own parameters when given (e.g. with LoRA
  adapters merged in, `hps_jax.lora.save_merged_unet`)."""
  config = {"_class_name": "UNet2DConditionModel", **model.config.to_diffusers()}
  return save_component(out_dir, config, params_to_diffusers(model) if state_dict is None else state_dict)


# ------------------------------------------------------------------------------------------------------------
# Components: vae/
# ------------------------------------------------------------------------------------------------------------
def load_vae(
  model_dir,
  subfolder: str | None = "vae",
  *,
  dtype=None,
  param_dtype=None,
  variant: str | None = None,
  attention_backend: str = "auto",
) -> AutoencoderKL:
  """A diffusers AutoencoderKL folder (`model_dir/vae`, or `model_dir` itself with subfolder=None; falls back to
  it when `model_dir/vae` does not exist) -> `hps_jax.models.vae.AutoencoderKL`."""
  if subfolder and not (Path(model_dir) / subfolder).is_dir() and (Path(model_dir) / "config.json").exists():
    subfolder = None
  config_path, weights = component_files(model_dir, subfolder, variant)
  config = read_json(config_path, "a diffusers AutoencoderKL config (a JSON object)")
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise CheckpointError(f"{config_path}: _class_name {config['_class_name']!r:.60} is not 'AutoencoderKL'")
  try:
    cfg = VAEConfig.from_diffusers(config, attention_backend=attention_backend).validate()
  except (TypeError, ValueError, ArithmeticError) as e:
    raise CheckpointError(f"{config_path}: unsupported VAE config ({one_line(e, 200)})") from e
  dtype, param_dtype = dtype or jnp.float32, param_dtype or jnp.float32
  return _load_checked(lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=param_dtype), config_path, weights)


def save_vae(model: AutoencoderKL, out_dir) -> Path:
  """Writes `model` as a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)."""
  return save_component(out_dir, model.config.to_diffusers(), params_to_diffusers(model))


# ------------------------------------------------------------------------------------------------------------
# Components: text_encoder/ (a transformers CLIPTextModel; its key map lives in `hps_jax.convert.clip`)
# ------------------------------------------------------------------------------------------------------------
def load_text_encoder(path, *, dtype=None, param_dtype=None) -> CLIPTextEncoder:
  """A transformers CLIPTextModel dir (config.json + model.safetensors / pytorch_model.bin) -> CLIPTextEncoder."""
  d = Path(path)
  if not d.is_dir():
    raise CheckpointError(f"{d}: no such directory (expected a CLIPTextModel dir with config.json)")
  config_path, tc = read_hf_config(d, ("clip_text_model",))
  cfg = text_config_from_hf(tc, str(config_path))
  weights = hf_weights_file(d)
  check_text_weights(cfg, tensor_info(weights), config_path, weights)
  flat = text_params_from_hf(load_state_dict(weights), cfg, str(weights))
  return build_model(cfg, flat, dtype=dtype, param_dtype=param_dtype, source=str(weights), cls=CLIPTextEncoder)


def save_text_encoder(model: CLIPTextEncoder, out_dir) -> Path:
  """Writes our CLIPTextEncoder as a transformers CLIPTextModel dir (Stable Diffusion's `text_encoder/`)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_safetensors(
    {k: v.astype(np.float32) for k, v in text_encoder_state_dict(model).items()},
    out / "model.safetensors",
    metadata={"format": "pt"},
  )
  tc = {"architectures": ["CLIPTextModel"], **config_to_hf(model.config)["text_config"]}
  files.write_text(out / "config.json", json.dumps(tc, indent=2))
  return out


def text_encoder_state_dict(model: CLIPTextEncoder) -> dict[str, np.ndarray]:
  """Our CLIPTextEncoder -> CLIPTextModel state dict (numpy), with the `text_model.` prefix that the released
  Stable Diffusion checkpoints use (and every transformers version reads)."""
  return text_params_to_hf(model_params(model), model.config)
