"""Hand-written LoRA for the Stable Diffusion UNet (and any NNX model built from `nnx.Linear`).

`apply_lora` swaps selected `nnx.Linear` layers for `LoRALinear`: the same frozen `kernel` / `bias` Variables (so
parameter paths, sharding metadata and the diffusers converter are untouched) plus two adapter Variables,

  y = x @ W + b + scale * (x @ down) @ up,      down: (in, r),  up: (r, out),  scale = alpha / r * multiplier.

Adapters are `LoRAParam`s (an `nnx.Variable` type that is NOT an `nnx.Param`): `nnx.split(model, LORA, ...)` gives
the trainable adapters alone, and everything that walks `nnx.Param` (converters, base-model savers, parameter
counts) never sees them. Adapters are kept and computed in float32 while the base may run in bf16; at init `up` is
zero, so the adapted model equals the base exactly.

Default targets: to_q, to_k, to_v and to_out.0 of attn1 (self) and attn2 (cross) in every transformer block, the
layers the HPS v1 release and diffusers' LoRA training adapt. `alpha` defaults to the rank (scale 1, the diffusers /
HPS v1 convention). `A` ("down") is kaiming-uniform like PEFT (bound 1/sqrt(in)) or normal with std 1/r like
diffusers' legacy LoRA layers.

LoRA files: the formats are read and written in `hps_jax.convert.lora` (plain `{layer path: Adapter}` dicts);
this module adds what needs the model: `load_lora` resolving kohya names against its layers, the writers taking a
model, `apply_lora_file` and `save_merged_unet`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax.convert import lora as lora_io
from hps_jax.convert.diffusers import params_to_diffusers, save_unet
from hps_jax.convert.io import CheckpointError
from hps_jax.convert.lora import Adapter, module_name

DEFAULT_TARGETS = r".*transformer_blocks/\d+/attn[12]/(to_q|to_k|to_v|to_out/0)"


class LoRAParam(nnx.Variable):
  """A LoRA adapter matrix (trainable while the base model's `nnx.Param`s stay frozen)."""


LORA = nnx.OfType(LoRAParam)  # nnx filter: the adapters


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 4
  alpha: float | None = None  # None = rank (scale 1)
  init: str = "kaiming"  # kaiming (PEFT) | normal (std 1/rank, diffusers' legacy layers)
  targets: str = DEFAULT_TARGETS  # regex, fully matched against the layer's path ('a/b/0/to_q')
  seed: int = 0

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if self.init not in ("kaiming", "normal"):
      raise ValueError(f"LoRA init must be 'kaiming' or 'normal', got {self.init!r}")


def _no_alloc(key, shape, dtype):
  return jnp.zeros((1,) * len(shape), dtype)  # placeholder: the real kernel / bias Variables are assigned after


def _linear_shell(like: nnx.Linear) -> nnx.Linear:
  """An `nnx.Linear` with `like`'s settings and placeholder parameters (the caller assigns the real Variables)."""
  with nnx.use_eager_sharding(False):
    return nnx.Linear(
      like.in_features,
      like.out_features,
      use_bias=like.use_bias,
      dtype=like.dtype,
      param_dtype=like.param_dtype,
      precision=like.precision,
      rngs=nnx.Rngs(0),
      kernel_init=_no_alloc,
      bias_init=_no_alloc,
    )


class LoRALinear(nnx.Linear):
  """`nnx.Linear` with a low-rank adapter. Built from an existing layer, whose kernel / bias Variables it shares."""

  def __init__(
    self,
    base: nnx.Linear,
    rank: int,
    alpha: float | None = None,
    *,
    init: str = "kaiming",
    key: jax.Array | None = None,
  ):
    in_f, out_f = base.in_features, base.out_features
    with nnx.use_eager_sharding(False):
      super().__init__(
        in_f,
        out_f,
        use_bias=base.use_bias,
        dtype=base.dtype,
        param_dtype=base.param_dtype,
        precision=base.precision,
        rngs=nnx.Rngs(0),
        kernel_init=_no_alloc,
        bias_init=_no_alloc,
      )
    self.kernel = base.kernel
    self.bias = base.bias
    self.rank = int(rank)
    self.alpha = float(rank if alpha is None else alpha)
    self.multiplier = 1.0
    self.merged = False
    key = jax.random.key(0) if key is None else key
    if init == "kaiming":  # kaiming_uniform(a=sqrt(5)) on a (r, in) torch weight: bound 1/sqrt(in)
      bound = 1.0 / math.sqrt(in_f)
      down = jax.random.uniform(key, (in_f, rank), jnp.float32, -bound, bound)
    else:
      down = jax.random.normal(key, (in_f, rank), jnp.float32) / rank
    self.lora_down = LoRAParam(down)
    self.lora_up = LoRAParam(jnp.zeros((rank, out_f), jnp.float32))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank * self.multiplier

  def delta(self) -> jax.Array:
    """The adapter as a dense (in, out) float32 matrix, scale included."""
    return self.scale * (self.lora_down[...] @ self.lora_up[...])

  def __call__(self, x, out_sharding=None):
    y = super().__call__(x, out_sharding)
    if self.merged or self.multiplier == 0.0:
      return y
    h = x.astype(jnp.float32) @ self.lora_down[...]
    return y + (self.scale * (h @ self.lora_up[...])).astype(y.dtype)


# ------------------------------------------------------------------------------------------------------------
# finding / replacing layers
# ------------------------------------------------------------------------------------------------------------
def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _linears(model) -> Iterator[tuple[str, nnx.Linear]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear):
      yield _path_str(path), node


def linear_paths(model) -> list[str]:
  """The path of every `nnx.Linear` layer of `model` (adapted or not), in graph order."""
  return [p for p, _ in _linears(model)]


def _set_child(model, path: str, value):
  *parents, leaf = path.split("/")
  node = model
  for p in parents:
    node = node[int(p)] if isinstance(node, (nnx.List, list)) else getattr(node, p)
  if isinstance(node, (nnx.List, list)):
    node[int(leaf)] = value
  else:
    setattr(node, leaf, value)


def lora_layers(model) -> dict[str, LoRALinear]:
  """{layer path: LoRALinear} of `model`, in graph order."""
  return {p: m for p, m in _linears(model) if isinstance(m, LoRALinear)}


def target_paths(model, targets: str = DEFAULT_TARGETS) -> list[str]:
  rx = re.compile(targets)
  return [p for p, _ in _linears(model) if rx.fullmatch(p)]


def apply_lora(
  model,
  config: LoRAConfig = LoRAConfig(),
  *,
  ranks: Mapping[str, int] | None = None,
  alphas: Mapping[str, float] | None = None,
) -> list[str]:
  """Adds adapters in place to every `nnx.Linear` of `model` whose path matches `config.targets` (or, with
  `ranks`, exactly the layers named there, each with its own rank and optional alpha). Returns the adapted paths.
  Layers that already carry an adapter are an error (merge or `remove_lora` first)."""
  if ranks is not None:
    paths = list(ranks)
    present = dict(_linears(model))
    unknown = [p for p in paths if p not in present]
    if unknown:
      raise KeyError(f"{len(unknown)} LoRA layers are not linear layers of {type(model).__name__}: {unknown[:4]}")
  else:
    paths = target_paths(model, config.targets)
    if not paths:
      raise ValueError(f"LoRA targets {config.targets!r} match no linear layer of {type(model).__name__}")
  layers = dict(_linears(model))
  root = jax.random.key(config.seed)
  for i, p in enumerate(paths):
    base = layers[p]
    if isinstance(base, LoRALinear):
      raise ValueError(f"{p} already has a LoRA adapter")
    rank = int(ranks[p]) if ranks is not None else config.rank
    alpha = (alphas or {}).get(p, config.alpha if ranks is None else None)
    _set_child(model, p, LoRALinear(base, rank, alpha, init=config.init, key=jax.random.fold_in(root, i)))
  return paths


def remove_lora(model) -> int:
  """Drops every adapter (unmerging merged ones first), restoring plain `nnx.Linear` layers. Returns the count."""
  paths = list(lora_layers(model))
  for p in paths:
    remove_lora_at(model, p)
  return len(paths)


def remove_lora_at(model, path: str):
  """Drops the adapter of the layer at `path` (unmerging it first if merged)."""
  layer = lora_layers(model)[path]
  if layer.merged:
    _unmerge_one(layer)
  plain = _linear_shell(layer)
  plain.kernel, plain.bias = layer.kernel, layer.bias
  _set_child(model, path, plain)


# ------------------------------------------------------------------------------------------------------------
# adapter values (`Adapter`: down (in, r), up (r, out), alpha; defined in hps_jax.convert.lora)
# ------------------------------------------------------------------------------------------------------------
def get_adapters(model) -> dict[str, Adapter]:
  """{layer path: Adapter} (float32 numpy copies)."""
  return {
    p: Adapter(np.asarray(m.lora_down[...], np.float32), np.asarray(m.lora_up[...], np.float32), m.alpha)
    for p, m in lora_layers(model).items()
  }


def set_adapters(model, adapters: Mapping[str, Adapter], *, source: str = "adapters") -> list[str]:
  """Loads `adapters` into `model`: layers without an adapter get one of the right rank; layers whose adapter has
  another rank are rebuilt. Every path must name a linear layer of `model` (clear error otherwise)."""
  layers = dict(_linears(model))
  problems = []
  for p, a in adapters.items():
    if p not in layers:
      problems.append(f"{p}: no such linear layer")
      continue
    m = layers[p]
    want_in, want_out = m.in_features, m.out_features
    if (
      a.down.ndim != 2
      or a.up.ndim != 2
      or a.down.shape[0] != want_in
      or a.up.shape[1] != want_out
      or a.down.shape[1] != a.up.shape[0]
    ):
      problems.append(
        f"{p}: adapter shapes down {a.down.shape} / up {a.up.shape} do not fit a {want_in} -> {want_out} layer"
      )
  if problems:
    raise ValueError(f"{source}: {len(problems)} adapters do not fit {type(model).__name__}: {problems[:4]}")
  for p, a in adapters.items():
    m = layers[p]
    if isinstance(m, LoRALinear) and m.merged:
      raise ValueError(f"{p}: the current adapter is merged; unmerge it before loading another")
    if not isinstance(m, LoRALinear) or m.rank != a.rank:
      base = m
      if isinstance(m, LoRALinear):
        remove_lora_at(model, p)
        base = dict(_linears(model))[p]
      m = LoRALinear(base, a.rank, a.alpha)
      _set_child(model, p, m)
    m.alpha = float(a.alpha)
    m.lora_down.set_value(jnp.asarray(a.down, jnp.float32))
    m.lora_up.set_value(jnp.asarray(a.up, jnp.float32))
  return list(adapters)


def set_lora_scale(model, multiplier: float) -> None:
  """Multiplies every adapter's alpha / r by `multiplier` (0 disables them; the `--lora-scale` of `sample`).
  Merged adapters must be unmerged first."""
  for p, m in lora_layers(model).items():
    if m.merged:
      raise ValueError(f"{p}: cannot rescale a merged adapter; unmerge first")
    m.multiplier = float(multiplier)


# ------------------------------------------------------------------------------------------------------------
# merge / unmerge
# ------------------------------------------------------------------------------------------------------------
def _merge_one(m: LoRALinear):
  w = m.kernel[...]
  m.kernel.set_value((w.astype(jnp.float32) + m.delta()).astype(w.dtype))
  m.merged = True


def _unmerge_one(m: LoRALinear):
  w = m.kernel[...]
  m.kernel.set_value((w.astype(jnp.float32) - m.delta()).astype(w.dtype))
  m.merged = False


def merge_lora(model) -> int:
  """W += scale * down @ up for every unmerged adapter (computed in float32); the adapter then stops running
  separately. Exact to float32 rounding; with a bf16 base the merged kernel is rounded to bf16. Returns the count."""
  n = 0
  for m in lora_layers(model).values():
    if not m.merged:
      _merge_one(m)
      n += 1
  return n


def unmerge_lora(model) -> int:
  """The inverse of `merge_lora`: W -= scale * down @ up. Returns the count."""
  n = 0
  for m in lora_layers(model).values():
    if m.merged:
      _unmerge_one(m)
      n += 1
  return n


def count_lora_params(model) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, LORA))))


# ------------------------------------------------------------------------------------------------------------
# LoRA files of a model (the formats: hps_jax.convert.lora)
# ------------------------------------------------------------------------------------------------------------
def adapters_of(model_or_adapters) -> dict[str, Adapter]:
  """`{layer path: Adapter}` as given, or read out of a model (`get_adapters`)."""
  if isinstance(model_or_adapters, Mapping):
    return dict(model_or_adapters)
  return get_adapters(model_or_adapters)


def load_lora(path, model=None) -> tuple[dict[str, Adapter], dict]:
  """`hps_jax.convert.lora.load_lora`; with `model`, kohya names are resolved against the model's own linear
  layers (otherwise through the known diffusers UNet module names)."""
  return lora_io.load_lora(path, linear_paths(model) if model is not None else None)


def save_peft(model_or_adapters, path, *, prefix: str | None = "unet", fp16: bool = False) -> Path:
  """`hps_jax.convert.lora.save_peft` of a model's adapters (or of an `{path: Adapter}` dict)."""
  return lora_io.save_peft(adapters_of(model_or_adapters), path, prefix=prefix, fp16=fp16)


def save_kohya(model_or_adapters, path, *, fp16: bool = False) -> Path:
  """`hps_jax.convert.lora.save_kohya` of a model's adapters (or of an `{path: Adapter}` dict)."""
  return lora_io.save_kohya(adapters_of(model_or_adapters), path, fp16=fp16)


def save_legacy(model_or_adapters, path) -> Path:
  """`hps_jax.convert.lora.save_legacy` of a model's adapters (or of an `{path: Adapter}` dict)."""
  return lora_io.save_legacy(adapters_of(model_or_adapters), path)


def apply_lora_file(model, path, multiplier: float = 1.0, *, replace: bool = True) -> dict:
  """Loads a LoRA file into `model` (any format `load_lora` reads): adapters are created or rebuilt at the file's
  ranks, then every adapter's scale is alpha / r * `multiplier`. With `replace`, adapters on layers the file does
  not name are removed, so the model runs exactly the file's LoRA. Returns load_lora's info."""
  linear = linear_paths(model)
  adapters, info = lora_io.load_lora(path, linear)
  linear = set(linear)
  other = sorted(p for p in adapters if p not in linear)
  if other:  # before touching the model
    raise CheckpointError(
      f"{info['file']}: {len(other)} adapters target layers that are not linear layers of "
      f"{type(model).__name__} (LoRA on convolutions, LoCon, is not supported): {other[:4]}"
    )
  if replace:
    for p in list(lora_layers(model)):
      if p not in adapters:
        remove_lora_at(model, p)
  set_adapters(model, adapters, source=info["file"])
  set_lora_scale(model, multiplier)
  return info


def merged_state_dict(model) -> dict[str, np.ndarray]:
  """`model`'s diffusers state dict with every unmerged adapter folded in (W + scale * down @ up, in float32),
  computed on a copy: the model is left as it is."""
  sd = params_to_diffusers(model)
  for p, m in lora_layers(model).items():
    if m.merged:  # already in the kernel
      continue
    key = f"{module_name(p)}.weight"
    sd[key] = np.asarray(sd[key], np.float32) + np.asarray(m.delta(), np.float32).T
  return sd


def save_merged_unet(model, out_dir) -> Path:
  """Writes `model` (a UNet2DConditionModel with adapters) as a plain diffusers UNet folder (config.json +
  diffusion_pytorch_model.safetensors, float32) with the adapters merged at their current scale; loadable by
  `hps_jax.convert.diffusers.load_unet` and diffusers without any LoRA support. The model itself is not modified."""
  return save_unet(model, out_dir, state_dict=merged_state_dict(model))
