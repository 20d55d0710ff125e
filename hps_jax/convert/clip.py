"""CLIP checkpoints <-> `hps_jax.models.clip.CLIP`: the key maps for every format, in one place.

Formats
  hf         transformers `CLIPModel.save_pretrained` dirs (config.json + model.safetensors / pytorch_model.bin);
             openai/clip-vit-large-patch14, PickScore. Also a bare HF-key state dict (architecture from shapes).
  openai     OpenAI CLIP state dicts (the `clip` package), incl. the HPS v1 release `hpc.pt`
             ({'state_dict': ...}, optional `module.` prefix). QuickGELU unless told otherwise.
  open_clip  open_clip state dicts (HPS v2 / v2.1 `HPS_v2*_compressed.pt`). Same key names as `openai`;
             the activation is GELU unless the model is a `-quickgelu` variant (pass activation='quick_gelu').
  ResNet     OpenAI's ModifiedResNet CLIPs (RN50, RN101, RN50x4, RN50x16, RN50x64) in the `openai` / open_clip
             layout (`visual.layer{1-4}.*`, `visual.attnpool.*`, BatchNorm running statistics); the stage depths,
             width, image size and embedding size are read from the shapes. Also inside OpenAI's TorchScript
             archives (`RN50x64.pt`, `ViT-L-14.pt`: what `clip.load` downloads), read without torch.

State dicts carry no activation: `auto` picks QuickGELU for the widths OpenAI released (ViT-B, ViT-L) and GELU
for the LAION-only sizes (ViT-H and up). Pass `activation=` to override; a wrong choice silently shifts scores.

Conventions of the maps: torch Linear weight (out, in) -> kernel (in, out); Conv OIHW -> HWIO; LayerNorm
weight -> scale; OpenAI's fused attention `in_proj_weight` (3W, W) is split into query/key/value.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax import files
from hps_jax.convert.io import (
  CheckpointError,
  check_float_weights,
  load_state_dict,
  one_line,
  read_json,
  save_safetensors,
  tensor_info,
)
from hps_jax.models.clip import CLIP, CLIPConfig, int_field_problem

FORMATS = ("auto", "hf", "openai", "open_clip")
# Buffers some writers include that carry no learned weights.
_IGNORED = re.compile(r"(^|\.)(position_ids|attn_mask|input_resolution|context_length|vocab_size|num_batches_tracked)$")

_T = lambda a: np.ascontiguousarray(np.asarray(a).T)
_ID = lambda a: np.asarray(a)
_CONV_TO_HWIO = lambda a: np.ascontiguousarray(np.asarray(a).transpose(2, 3, 1, 0))
_HWIO_TO_CONV = lambda a: np.ascontiguousarray(np.asarray(a).transpose(3, 2, 0, 1))


# ------------------------------------------------------------------------------------------------------------
# Key maps: lists of (our_path, their_key, to_ours, to_theirs)
# ------------------------------------------------------------------------------------------------------------
def _linear(ours, theirs):
  return [(f"{ours}/kernel", f"{theirs}.weight", _T, _T), (f"{ours}/bias", f"{theirs}.bias", _ID, _ID)]


def _norm(ours, theirs):
  return [(f"{ours}/scale", f"{theirs}.weight", _ID, _ID), (f"{ours}/bias", f"{theirs}.bias", _ID, _ID)]


def hf_key_map(cfg: CLIPConfig):
  m = []
  for tower, prefix, layers in (("vision", "vision_model", cfg.vision_layers), ("text", "text_model", cfg.text_layers)):
    for i in range(layers):
      o, t = f"{tower}/blocks/{i}", f"{prefix}.encoder.layers.{i}"
      m += _norm(f"{o}/ln1", f"{t}.layer_norm1") + _norm(f"{o}/ln2", f"{t}.layer_norm2")
      for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
        m += _linear(f"{o}/attn/{ours}", f"{t}.self_attn.{theirs}")
      m += _linear(f"{o}/mlp/fc1", f"{t}.mlp.fc1") + _linear(f"{o}/mlp/fc2", f"{t}.mlp.fc2")
  m += [
    ("vision/patch_embed/kernel", "vision_model.embeddings.patch_embedding.weight", _CONV_TO_HWIO, _HWIO_TO_CONV),
    ("vision/class_embedding", "vision_model.embeddings.class_embedding", _ID, _ID),
    ("vision/pos_embedding", "vision_model.embeddings.position_embedding.weight", _ID, _ID),
    ("vision/proj", "visual_projection.weight", _T, _T),
    ("text/token_embedding/embedding", "text_model.embeddings.token_embedding.weight", _ID, _ID),
    ("text/pos_embedding", "text_model.embeddings.position_embedding.weight", _ID, _ID),
    ("text/proj", "text_projection.weight", _T, _T),
    ("logit_scale", "logit_scale", _ID, _ID),
  ]
  m += _norm("vision/ln_pre", "vision_model.pre_layrnorm") + _norm("vision/ln_post", "vision_model.post_layernorm")
  m += _norm("text/ln_final", "text_model.final_layer_norm")
  return m


def _bn(ours, theirs):
  return _norm(ours, theirs) + [
    (f"{ours}/mean", f"{theirs}.running_mean", _ID, _ID),
    (f"{ours}/var", f"{theirs}.running_var", _ID, _ID),
  ]


def _conv(ours, theirs):
  return [(f"{ours}/kernel", f"{theirs}.weight", _CONV_TO_HWIO, _HWIO_TO_CONV)]


def resnet_key_map(cfg: CLIPConfig):
  """The ModifiedResNet image tower's OpenAI / open_clip names."""
  m = []
  for i in (1, 2, 3):
    m += _conv(f"vision/conv{i}", f"visual.conv{i}") + _bn(f"vision/bn{i}", f"visual.bn{i}")
  for stage, blocks in enumerate(cfg.resnet_layers):
    for j in range(blocks):
      o, t = f"vision/layers/{stage}/{j}", f"visual.layer{stage + 1}.{j}"
      for i in (1, 2, 3):
        m += _conv(f"{o}/conv{i}", f"{t}.conv{i}") + _bn(f"{o}/bn{i}", f"{t}.bn{i}")
      if j == 0:  # every stage's first block changes the width (and from the second stage on, the size)
        m += _conv(f"{o}/downsample/conv", f"{t}.downsample.0") + _bn(f"{o}/downsample/bn", f"{t}.downsample.1")
  m.append(("vision/attnpool/pos_embedding", "visual.attnpool.positional_embedding", _ID, _ID))
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "c_proj")):
    m += _linear(f"vision/attnpool/{ours}", f"visual.attnpool.{theirs}")
  return m


def openai_key_map(cfg: CLIPConfig):
  """OpenAI / open_clip names. The fused in_proj tensors are handled separately (see `_split_in_proj`)."""
  m = resnet_key_map(cfg) if cfg.is_resnet else []
  towers = [("text", "transformer", cfg.text_layers)]
  if not cfg.is_resnet:
    towers.insert(0, ("vision", "visual.transformer", cfg.vision_layers))
  for tower, prefix, layers in towers:
    for i in range(layers):
      o, t = f"{tower}/blocks/{i}", f"{prefix}.resblocks.{i}"
      m += _norm(f"{o}/ln1", f"{t}.ln_1") + _norm(f"{o}/ln2", f"{t}.ln_2")
      m += _linear(f"{o}/attn/out", f"{t}.attn.out_proj")
      m += _linear(f"{o}/mlp/fc1", f"{t}.mlp.c_fc") + _linear(f"{o}/mlp/fc2", f"{t}.mlp.c_proj")
  if not cfg.is_resnet:
    m += [
      ("vision/patch_embed/kernel", "visual.conv1.weight", _CONV_TO_HWIO, _HWIO_TO_CONV),
      ("vision/class_embedding", "visual.class_embedding", _ID, _ID),
      ("vision/pos_embedding", "visual.positional_embedding", _ID, _ID),
      ("vision/proj", "visual.proj", _ID, _ID),
    ]
    m += _norm("vision/ln_pre", "visual.ln_pre") + _norm("vision/ln_post", "visual.ln_post")
  m += [
    ("text/token_embedding/embedding", "token_embedding.weight", _ID, _ID),
    ("text/pos_embedding", "positional_embedding", _ID, _ID),
    ("text/proj", "text_projection", _ID, _ID),
    ("logit_scale", "logit_scale", _ID, _ID),
  ]
  m += _norm("text/ln_final", "ln_final")
  return m


def _in_proj_blocks(cfg: CLIPConfig):
  towers = [("text", "transformer", cfg.text_layers)]
  if not cfg.is_resnet:
    towers.insert(0, ("vision", "visual.transformer", cfg.vision_layers))
  for tower, prefix, layers in towers:
    for i in range(layers):
      yield f"{tower}/blocks/{i}/attn", f"{prefix}.resblocks.{i}.attn"


# ------------------------------------------------------------------------------------------------------------
# Architecture inference (from arrays or from `TensorInfo`s: only shapes are read)
# ------------------------------------------------------------------------------------------------------------
def _count_layers(sd, pattern, source="state dict"):
  rx = re.compile(pattern)
  idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
  if not idx:
    return 0
  if idx != set(range(max(idx) + 1)):
    shown = sorted(idx)
    raise CheckpointError(
      f"{source}: non-contiguous layer indices for {pattern}: {shown[:10]}{'...' if len(shown) > 10 else ''}"
    )
  return max(idx) + 1


def _heads(width: int, source="state dict") -> int:
  """State dicts do not store the head count; OpenAI and open_clip use 64-wide heads."""
  if width % 64 or width <= 0:
    raise CheckpointError(
      f"{source}: cannot infer the attention heads of a {width}-wide tower (not a multiple of 64): pass an explicit "
      "config"
    )
  return width // 64


def _shape(sd, key: str, ndim: int, source) -> tuple[int, ...]:
  """The shape of `sd[key]`, which must exist and have `ndim` dims."""
  if key not in sd:
    raise CheckpointError(f"{source}: missing key {key!r}")
  shape = tuple(int(n) for n in sd[key].shape)
  if len(shape) != ndim:
    raise CheckpointError(f"{source}: {key} has shape {shape}, expected {ndim} dims")
  return shape


class _Evidence(dict):
  """{config field: (value, what in the weights shows it)} inferred from a state dict's shapes."""

  def put(self, field, value, why):
    self[field] = (value, why)

  def values_only(self) -> dict:
    return {k: v for k, (v, _) in self.items()}


def _grid(npos: int, key: str, shape, source) -> int:
  grid = math.isqrt(max(npos - 1, 0))
  if npos < 2 or grid * grid != npos - 1:
    raise CheckpointError(f"{source}: {key} has shape {shape}; expected 1 + a square number of positions")
  return grid


def _tower_fields(sd, ev: _Evidence, source, *, tower: str, layer_rx: str, layer_name: str, mlp_key: str):
  """Fills `ev` with one tower's width, depth and MLP width."""
  layers = _count_layers(sd, layer_rx, source)
  if layers == 0:
    raise CheckpointError(f"{source}: no {tower} layers ({layer_name}.0...)")
  ev.put(f"{tower}_layers", layers, f"{layers} {tower} layers ({layer_name}.0-{layers - 1})")
  key = mlp_key.format(0)
  shape = _shape(sd, key, 2, source)
  ev.put(f"{tower}_mlp_dim", shape[0], f"{key} has shape {shape}")


def _infer_hf_fields(sd, source="state dict", text_only: bool = False) -> _Evidence:
  """The architecture of an HF-key state dict, field by field with the key that shows it."""
  ev = _Evidence()
  key = "text_model.final_layer_norm.weight"
  (tw,) = _shape(sd, key, 1, source)
  ev.put("text_width", tw, f"{key} has shape {(tw,)}")
  key = "text_model.embeddings.token_embedding.weight"
  shape = _shape(sd, key, 2, source)
  ev.put("vocab_size", shape[0], f"{key} has shape {shape}")
  key = "text_model.embeddings.position_embedding.weight"
  shape = _shape(sd, key, 2, source)
  ev.put("context_length", shape[0], f"{key} has shape {shape}")
  _tower_fields(
    sd,
    ev,
    source,
    tower="text",
    layer_rx=r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight",
    layer_name="text_model.encoder.layers",
    mlp_key="text_model.encoder.layers.{}.mlp.fc1.weight",
  )
  if text_only:
    return ev
  key = "vision_model.embeddings.patch_embedding.weight"
  shape = _shape(sd, key, 4, source)
  vw, _, p, _ = shape
  ev.put("vision_width", vw, f"{key} has shape {shape}")
  ev.put("patch_size", p, f"{key} has shape {shape}")
  key = "vision_model.embeddings.position_embedding.weight"
  pos = _shape(sd, key, 2, source)
  ev.put("image_size", p * _grid(pos[0], key, pos, source), f"{key} has shape {pos} with {p}-pixel patches")
  key = "text_projection.weight"
  shape = _shape(sd, key, 2, source)
  ev.put("embed_dim", shape[0], f"{key} has shape {shape}")
  _tower_fields(
    sd,
    ev,
    source,
    tower="vision",
    layer_rx=r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight",
    layer_name="vision_model.encoder.layers",
    mlp_key="vision_model.encoder.layers.{}.mlp.fc1.weight",
  )
  return ev


def is_resnet_state_dict(sd) -> bool:
  """OpenAI / open_clip keys of a ModifiedResNet image tower."""
  return "visual.attnpool.positional_embedding" in sd or any(k.startswith("visual.layer1.") for k in sd)


def _infer_resnet_fields(sd, ev: _Evidence, source) -> None:
  stages = []
  for b in (1, 2, 3, 4):
    n = _count_layers(sd, rf"visual\.layer{b}\.(\d+)\.conv1\.weight", source)
    if n == 0:
      raise CheckpointError(f"{source}: a ResNet CLIP needs visual.layer{b}.0.conv1.weight (four stages)")
    stages.append(n)
  ev.put("resnet_layers", tuple(stages), f"blocks per stage visual.layer1-4: {stages}")
  ev.put("vision_layers", sum(stages), f"blocks per stage visual.layer1-4: {stages}")
  key = "visual.layer1.0.conv1.weight"
  shape = _shape(sd, key, 4, source)
  ev.put("vision_width", shape[0], f"{key} has shape {shape}")
  key = "visual.attnpool.positional_embedding"
  pos = _shape(sd, key, 2, source)
  ev.put("image_size", 32 * _grid(pos[0], key, pos, source), f"{key} has shape {pos} (stride 32)")
  ev.put("patch_size", 32, "a ModifiedResNet's total stride")
  ev.put("vision_mlp_dim", pos[1], f"{key} has shape {pos}")


def _infer_openai_fields(sd, source="state dict") -> _Evidence:
  ev = _Evidence()
  if is_resnet_state_dict(sd):
    _infer_resnet_fields(sd, ev, source)
  elif "visual.conv1.weight" not in sd:
    raise CheckpointError(f"{source}: not an OpenAI/open_clip CLIP state dict: 'visual.conv1.weight' missing")
  else:
    key = "visual.conv1.weight"
    shape = _shape(sd, key, 4, source)
    vw, _, p, _ = shape
    ev.put("vision_width", vw, f"{key} has shape {shape}")
    ev.put("patch_size", p, f"{key} has shape {shape}")
    key = "visual.positional_embedding"
    pos = _shape(sd, key, 2, source)
    ev.put("image_size", p * _grid(pos[0], key, pos, source), f"{key} has shape {pos} with {p}-pixel patches")
  key = "ln_final.weight"
  (tw,) = _shape(sd, key, 1, source)
  ev.put("text_width", tw, f"{key} has shape {(tw,)}")
  key = "text_projection"
  shape = _shape(sd, key, 2, source)
  ev.put("embed_dim", shape[1], f"{key} has shape {shape}")
  key = "token_embedding.weight"
  shape = _shape(sd, key, 2, source)
  ev.put("vocab_size", shape[0], f"{key} has shape {shape}")
  key = "positional_embedding"
  shape = _shape(sd, key, 2, source)
  ev.put("context_length", shape[0], f"{key} has shape {shape}")
  towers = [("text", "transformer.resblocks")]
  if "resnet_layers" not in ev:
    towers.insert(0, ("vision", "visual.transformer.resblocks"))
  for tower, prefix in towers:
    _tower_fields(
      sd,
      ev,
      source,
      tower=tower,
      layer_rx=re.escape(prefix) + r"\.(\d+)\.attn\.in_proj_weight",
      layer_name=prefix,
      mlp_key=prefix + ".{}.mlp.c_fc.weight",
    )
  return ev


def _checked(cfg_kw: dict, source) -> CLIPConfig:
  """A CLIPConfig from inferred / given fields, validated (types, bounds): CheckpointError naming `source`."""
  try:
    return CLIPConfig(**cfg_kw).validate()
  except (TypeError, ValueError, ArithmeticError) as e:
    raise CheckpointError(f"{source}: unsupported CLIP architecture ({one_line(e, 200)})") from e


def default_activation(vision_width: int) -> str:
  """OpenAI released ViT-B and ViT-L (QuickGELU); wider towers (ViT-H, g, bigG) exist only as LAION/open_clip
  models trained with GELU. (ResNet towers, at most 128 wide at the stem, are OpenAI's: QuickGELU text.)"""
  return "quick_gelu" if vision_width <= 1024 else "gelu"


def infer_openai_config(sd, activation: str | None = None, fmt: str = "auto", source="state dict") -> CLIPConfig:
  """The architecture of an OpenAI / open_clip state dict (arrays or `TensorInfo`s), from its shapes."""
  fields = _infer_openai_fields(sd, source).values_only()
  if activation is None:
    activation = {"openai": "quick_gelu", "open_clip": "gelu"}.get(fmt) or default_activation(fields["vision_width"])
  attn_width = 32 * fields["vision_width"] if "resnet_layers" in fields else fields["vision_width"]
  heads = dict(vision_heads=_heads(attn_width, source), text_heads=_heads(fields["text_width"], source))
  return _checked({**fields, **heads, "activation": activation}, source)


_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# transformers' CLIPTextConfig default, and the legacy value that makes CLIPTextTransformer pool at argmax(ids).
_HF_DEFAULT_EOS, _HF_LEGACY_EOS = 49407, 2
# our field -> (config.json section, key, transformers' default)
_HF_INT_FIELDS = {
  "embed_dim": ("", "projection_dim", 512),
  "image_size": ("vision_config", "image_size", 224),
  "patch_size": ("vision_config", "patch_size", 32),
  "vision_width": ("vision_config", "hidden_size", 768),
  "vision_layers": ("vision_config", "num_hidden_layers", 12),
  "vision_heads": ("vision_config", "num_attention_heads", 12),
  "vision_mlp_dim": ("vision_config", "intermediate_size", 3072),
  "vocab_size": ("text_config", "vocab_size", 49408),
  "context_length": ("text_config", "max_position_embeddings", 77),
  "text_width": ("text_config", "hidden_size", 512),
  "text_layers": ("text_config", "num_hidden_layers", 12),
  "text_heads": ("text_config", "num_attention_heads", 8),
  "text_mlp_dim": ("text_config", "intermediate_size", 2048),
}


def _json_name(field: str, text_only: bool = False) -> str:
  section, key, _ = _HF_INT_FIELDS[field]
  return key if not section or text_only else f"{section}.{key}"


def _eos_from_hf(tc: dict, source="config.json", vocab: int | None = None) -> int | None:
  """Our `eos_token_id` from a text_config: None (argmax pooling) for transformers' legacy `eos_token_id == 2`,
  else the id whose first position transformers pools at."""
  eos = tc.get("eos_token_id", _HF_DEFAULT_EOS)
  if isinstance(eos, (list, tuple)) and len(eos) == 1:
    eos = eos[0]
  if eos is None or (not isinstance(eos, bool) and isinstance(eos, int) and eos == _HF_LEGACY_EOS):
    return None
  if isinstance(eos, bool) or not isinstance(eos, int):
    raise CheckpointError(f"{source}: text_config eos_token_id {eos!r:.40} is not a single token id")
  vocab = tc.get("vocab_size", 49408) if vocab is None else vocab
  if not 0 <= eos < vocab:
    raise CheckpointError(f"{source}: text_config eos_token_id {eos} is outside the {vocab}-token vocabulary")
  return eos


def _section(hf: dict, name: str, source) -> dict:
  sec = hf.get(name)
  if sec is None:
    return {}
  if not isinstance(sec, dict):
    raise CheckpointError(f"{source}: {name} is {type(sec).__name__} {sec!r:.40}; expected a JSON object")
  return sec


def _hf_number(sec: dict, key: str, default, where: str, source):
  v = sec.get(key, default)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise CheckpointError(f"{source}: {where}{key} = {v!r:.40} is not a finite number")
  return float(v)


def config_from_hf(hf: dict, source="config.json", *, _text_only: bool = False) -> CLIPConfig:
  """Maps a transformers CLIPConfig dict (config.json) to ours, with transformers' defaults for missing keys. Every
  value is checked (types, `FIELD_LIMITS`) before anything is built: a `CheckpointError` names `source` and the key."""
  if not isinstance(hf, dict):
    raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
  secs = {
    "": hf,
    "text_config": _section(hf, "text_config", source),
    "vision_config": _section(hf, "vision_config", source),
  }
  tc, vc = secs["text_config"], secs["vision_config"]
  kw = {}
  for field, (section, key, default) in _HF_INT_FIELDS.items():
    value = secs[section].get(key, default)
    problem = int_field_problem(field, value)
    if problem:
      raise CheckpointError(f"{source}: {_json_name(field, _text_only)} {problem}")
    kw[field] = value
  acts = [tc.get("hidden_act", "quick_gelu"), vc.get("hidden_act", "quick_gelu")]
  if any(not isinstance(a, str) or a not in _HF_ACT for a in acts) or acts[0] != acts[1]:
    shown = [a if isinstance(a, str) else repr(a)[:40] for a in acts]
    raise CheckpointError(
      f"{source}: unsupported CLIP activations {shown} (need one of {sorted(_HF_ACT)} for both towers)"
    )
  eps = [
    _hf_number(sec, "layer_norm_eps", 1e-5, "" if _text_only else f"{name}.", source)
    for name, sec in (("text_config", tc), ("vision_config", vc))
  ]
  if eps[0] != eps[1]:
    raise CheckpointError(f"{source}: different layer_norm_eps per tower {sorted(eps)} are not supported")
  kw.update(
    eos_token_id=_eos_from_hf(tc, source, kw["vocab_size"]),
    activation=_HF_ACT[acts[0]],
    layer_norm_eps=eps[0],
    logit_scale_init=_hf_number(hf, "logit_scale_init_value", 2.6592, "", source),
  )
  return _checked(kw, source)


def config_to_hf(cfg: CLIPConfig) -> dict:
  """Our config as a transformers CLIPConfig dict; `eos_token_id=None` (argmax pooling) is written as the legacy 2,
  which transformers reads as argmax too, so `config_from_hf(config_to_hf(cfg)) == cfg`."""
  common = dict(hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps)
  return {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": cfg.embed_dim,
    "logit_scale_init_value": cfg.logit_scale_init,
    "text_config": dict(
      model_type="clip_text_model",
      hidden_size=cfg.text_width,
      intermediate_size=cfg.text_mlp_dim,
      num_hidden_layers=cfg.text_layers,
      num_attention_heads=cfg.text_heads,
      max_position_embeddings=cfg.context_length,
      vocab_size=cfg.vocab_size,
      projection_dim=cfg.embed_dim,
      bos_token_id=49406,
      eos_token_id=_HF_LEGACY_EOS if cfg.eos_token_id is None else cfg.eos_token_id,
      pad_token_id=1,
      **common,
    ),
    "vision_config": dict(
      model_type="clip_vision_model",
      hidden_size=cfg.vision_width,
      intermediate_size=cfg.vision_mlp_dim,
      num_hidden_layers=cfg.vision_layers,
      num_attention_heads=cfg.vision_heads,
      image_size=cfg.image_size,
      patch_size=cfg.patch_size,
      projection_dim=cfg.embed_dim,
      num_channels=3,
      **common,
    ),
  }


def infer_hf_config(sd, activation: str | None = None, source="state dict") -> CLIPConfig:
  """Architecture of a bare HF-key state dict (no config.json; arrays or `TensorInfo`s)."""
  fields = _infer_hf_fields(sd, source).values_only()
  heads = dict(vision_heads=_heads(fields["vision_width"], source), text_heads=_heads(fields["text_width"], source))
  return _checked({**fields, **heads, "activation": activation or default_activation(fields["vision_width"])}, source)


def check_config_matches(cfg: CLIPConfig, ev: _Evidence, config_source, weights, *, names=None) -> None:
  """Refuses (one line naming both files, the config key and the tensor that disagrees) a config whose
  architecture differs from what the weights' shapes show. `names`: field -> how the config file calls it."""
  for field, (value, why) in ev.items():
    ours = getattr(cfg, field)
    if ours != value:
      name = names(field) if names else field
      raise CheckpointError(
        f"{config_source}: {name} = {ours} does not match the weights {weights}: {why} (i.e. {field} {value})"
      )


# ------------------------------------------------------------------------------------------------------------
# State dict <-> flat params
# ------------------------------------------------------------------------------------------------------------
def _apply_map(sd, key_map, source: str) -> tuple[dict, set]:
  flat, used = {}, set()
  for ours, theirs, to_ours, _ in key_map:
    if theirs not in sd:
      raise CheckpointError(f"{source}: missing key {theirs!r} (needed for {ours})")
    flat[ours] = to_ours(sd[theirs])
    used.add(theirs)
  return flat, used


def _check_unused(sd, used, source):
  extra = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
  if extra:
    more = f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""
    raise CheckpointError(
      f"{source}: {len(extra)} unexpected keys, e.g. {extra[:8]}{more}; the architecture "
      "does not match a plain ViT or ModifiedResNet CLIP"
    )


def params_from_hf(sd, cfg: CLIPConfig, source="state dict") -> dict[str, np.ndarray]:
  flat, used = _apply_map(sd, hf_key_map(cfg), source)
  _check_unused(sd, used, source)
  return flat


def params_to_hf(flat, cfg: CLIPConfig) -> dict[str, np.ndarray]:
  return {theirs: to_theirs(flat[ours]) for ours, theirs, _, to_theirs in hf_key_map(cfg)}


def params_from_openai(sd, cfg: CLIPConfig, source="state dict") -> dict[str, np.ndarray]:
  flat, used = _apply_map(sd, openai_key_map(cfg), source)
  w_of = {"vision": cfg.vision_width, "text": cfg.text_width}
  for ours, theirs in _in_proj_blocks(cfg):
    w = w_of[ours.split("/")[0]]
    wk, bk = f"{theirs}.in_proj_weight", f"{theirs}.in_proj_bias"
    for k in (wk, bk):
      if k not in sd:
        raise CheckpointError(f"{source}: missing key {k!r}")
    weight, bias = np.asarray(sd[wk]), np.asarray(sd[bk])
    if weight.shape != (3 * w, w):
      raise CheckpointError(f"{source}: {wk} has shape {weight.shape}, expected {(3 * w, w)}")
    for j, name in enumerate(("query", "key", "value")):
      flat[f"{ours}/{name}/kernel"] = _T(weight[j * w : (j + 1) * w])
      flat[f"{ours}/{name}/bias"] = bias[j * w : (j + 1) * w]
    used |= {wk, bk}
  _check_unused(sd, used, source)
  return flat


def params_to_openai(flat, cfg: CLIPConfig) -> dict[str, np.ndarray]:
  sd = {theirs: to_theirs(flat[ours]) for ours, theirs, _, to_theirs in openai_key_map(cfg)}
  for ours, theirs in _in_proj_blocks(cfg):
    sd[f"{theirs}.in_proj_weight"] = np.concatenate([_T(flat[f"{ours}/{n}/kernel"]) for n in ("query", "key", "value")])
    sd[f"{theirs}.in_proj_bias"] = np.concatenate(
      [np.asarray(flat[f"{ours}/{n}/bias"]) for n in ("query", "key", "value")]
    )
  return sd


# ------------------------------------------------------------------------------------------------------------
# NNX model <-> flat params
# ------------------------------------------------------------------------------------------------------------
def model_params(model) -> dict[str, np.ndarray]:
  """The model's parameters as {'vision/blocks/0/attn/query/kernel': np.ndarray, ...}."""

  return {
    "/".join(map(str, path)): np.asarray(var[...])
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  }


def build_model(
  cfg: CLIPConfig, flat: dict[str, np.ndarray], *, dtype=None, param_dtype=None, source="checkpoint", cls=None
):
  """Creates a CLIP (or `cls`, e.g. CLIPTextEncoder) whose parameters are `flat` (shapes checked, every parameter
  required, nothing left over), without running the random initializers."""

  dtype = dtype or jnp.float32
  param_dtype = param_dtype or jnp.float32
  cls = cls or CLIP
  abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
  remaining = dict(flat)
  for path, var in nnx.to_flat_state(params):
    key = "/".join(map(str, path))
    if key not in remaining:
      raise CheckpointError(f"{source}: no value for parameter {key}")
    arr = np.asarray(remaining.pop(key))
    if arr.shape != tuple(var.shape):
      raise CheckpointError(f"{source}: {key} has shape {arr.shape}, the config expects {tuple(var.shape)}")
    var.set_value(jnp.asarray(arr, dtype=param_dtype))
  if remaining:
    raise CheckpointError(f"{source}: values for unknown parameters {sorted(remaining)[:8]}")
  return nnx.merge(graphdef, params, rest)


# ------------------------------------------------------------------------------------------------------------
# Format detection and the public loaders
# ------------------------------------------------------------------------------------------------------------
def hf_weights_file(d: Path) -> Path:
  """The weights file of a transformers model dir (safetensors first)."""
  for name in (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
  ):
    if (d / name).exists():
      return d / name
  raise CheckpointError(f"{d}: a Hugging Face model dir needs model.safetensors or pytorch_model.bin")


def detect_format(sd: dict, source="state dict") -> str:
  if "vision_model.embeddings.patch_embedding.weight" in sd or "text_model.embeddings.token_embedding.weight" in sd:
    return "hf"
  if "visual.conv1.weight" in sd or "token_embedding.weight" in sd:
    return "openai"
  raise CheckpointError(
    f"{source}: unrecognised CLIP state dict: expected Hugging Face keys (vision_model.*, text_model.*) "
    "or OpenAI/open_clip keys (visual.*, transformer.*)"
  )


def read_hf_config(d: Path, model_types=("clip",)) -> tuple[Path, dict]:
  """(path, contents) of a transformers model dir's config.json: a JSON object whose model_type (if any) is one of
  `model_types`; CheckpointError naming the file otherwise."""
  path = Path(d) / "config.json"
  if not path.exists():
    raise CheckpointError(f"{d}: directory without config.json; expected a Hugging Face {model_types[0]} dir")
  conf = read_json(path, f"a transformers {model_types[0]} config (a JSON object)")
  if conf.get("model_type") not in (None, *model_types):
    raise CheckpointError(f"{path}: model_type {conf.get('model_type')!r:.60} is not {model_types[0]!r}")
  return path, conf


def load_clip_params(
  path, format: str = "auto", activation: str | None = None, config: CLIPConfig | None = None
) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
  """Reads any supported CLIP checkpoint into (config, flat params). `config` overrides inferred architecture.

  The architecture (a Hugging Face dir's config.json, `config`, or the one inferred from the weights) is checked
  against the shapes in the weights file's header before any tensor data is read or anything is built: a config
  that disagrees is a `CheckpointError` naming the config key and the tensor whose shape shows otherwise."""
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  if config is not None:
    config.validate()
  path = Path(path)
  hf_config = config_path = None
  if path.is_dir():
    config_path, hf_config = read_hf_config(path)
    weights = hf_weights_file(path)
  else:
    weights = path
  info = tensor_info(weights)
  layout = detect_format(info, str(weights))
  check_float_weights(info, weights, skip=_IGNORED.search)
  if format == "hf" and layout != "hf" or format in ("openai", "open_clip") and layout != "openai":
    raise CheckpointError(f"{weights}: format={format!r} requested but the keys are in the {layout!r} layout")
  if layout == "hf":
    ev = _infer_hf_fields(info, str(weights))
    if config is not None:
      cfg = config
    elif hf_config is not None:
      cfg = config_from_hf(hf_config, str(config_path))
    else:
      cfg = infer_hf_config(info, activation, str(weights))
    if activation and config is None:
      cfg = cfg.replace(activation=activation)
  else:
    ev = _infer_openai_fields(info, str(weights))
    cfg = config or infer_openai_config(info, activation, format, str(weights))
  if config is not None:
    check_config_matches(cfg, ev, "config", weights)
  elif config_path is not None:
    check_config_matches(cfg, ev, config_path, weights, names=_json_name)
  sd = load_state_dict(weights)
  if layout == "hf":
    return cfg, params_from_hf(sd, cfg, str(weights))
  return cfg, params_from_openai(sd, cfg, str(weights))


def load_clip(
  path,
  format: str = "auto",
  *,
  activation: str | None = None,
  dtype=None,
  param_dtype=None,
  config: CLIPConfig | None = None,
) -> CLIP:
  cfg, flat = load_clip_params(path, format, activation, config)
  weights = hf_weights_file(Path(path)) if Path(path).is_dir() else path
  return build_model(cfg, flat, dtype=dtype, param_dtype=param_dtype, source=str(weights))


def save_hf(model: CLIP, out_dir) -> Path:
  """Writes `model` as a transformers CLIPModel dir (config.json + model.safetensors)."""
  cfg = model.config
  if cfg.is_resnet:
    raise CheckpointError("transformers has no ResNet CLIP: save a ResNet CLIP with params_to_openai instead")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  sd = params_to_hf({k: v.astype(np.float32) for k, v in model_params(model).items()}, cfg)
  save_safetensors(sd, out / "model.safetensors", metadata={"format": "pt"})
  files.write_text(out / "config.json", json.dumps(config_to_hf(cfg), indent=2))
  return out


# ------------------------------------------------------------------------------------------------------------
# The text tower alone: transformers' CLIPTextModel key map (Stable Diffusion's `text_encoder/`; the folder's
# loader and saver are `hps_jax.convert.diffusers.load_text_encoder` / `save_text_encoder`)
# ------------------------------------------------------------------------------------------------------------
def text_key_map(cfg: CLIPConfig):
  """The text half of the HF key map, without the projection (CLIPTextModel has none)."""
  return [e for e in hf_key_map(cfg) if e[0].startswith("text/") and e[0] != "text/proj"]


def text_config_from_hf(tc: dict, source="config.json") -> CLIPConfig:
  """A CLIPTextConfig dict (`text_encoder/config.json`) -> our config (vision fields unused), checked as
  `config_from_hf` checks (errors name the keys as the file spells them)."""
  if not isinstance(tc, dict):
    raise CheckpointError(f"{source}: expected a JSON object, got {type(tc).__name__}")
  act, eps = tc.get("hidden_act", "quick_gelu"), tc.get("layer_norm_eps", 1e-5)
  return config_from_hf(
    {
      "text_config": tc,
      "vision_config": {"hidden_act": act, "layer_norm_eps": eps},
      "projection_dim": tc.get("projection_dim", 512),
    },
    source,
    _text_only=True,
  )


def check_text_weights(cfg: CLIPConfig, sd, config_source, weights) -> None:
  """Refuses a CLIPTextModel config whose text tower differs from the weights' shapes (`sd`: arrays or
  `TensorInfo`s, keys with or without the `text_model.` prefix), naming the config key and the tensor."""
  if not any(k.startswith("text_model.") for k in sd):
    sd = {f"text_model.{k}": v for k, v in sd.items()}
  ev = _infer_hf_fields(sd, str(weights), text_only=True)
  check_float_weights(sd, weights, skip=_IGNORED.search)
  check_config_matches(cfg, ev, config_source, weights, names=lambda f: _json_name(f, True))


def text_params_from_hf(sd, cfg: CLIPConfig, source="state dict") -> dict[str, np.ndarray]:
  """A CLIPTextModel state dict -> our text tower's flat params (strict). Keys may lack the `text_model.` prefix
  (transformers >= 5 saves CLIPTextModel without it)."""
  if not any(k.startswith("text_model.") for k in sd):
    sd = {f"text_model.{k}": v for k, v in sd.items()}
  flat, used = _apply_map(sd, text_key_map(cfg), source)
  _check_unused(sd, used, source)
  return flat


def text_params_to_hf(flat, cfg: CLIPConfig) -> dict[str, np.ndarray]:
  """Our text tower's flat params -> a CLIPTextModel state dict with the `text_model.` prefix."""
  return {theirs: to_theirs(flat[ours]) for ours, theirs, _, to_theirs in text_key_map(cfg)}
