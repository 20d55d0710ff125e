"""Builders for the PyTorch reference models the parity tests compare against (random weights, offline)."""

from __future__ import annotations

import numpy as np

from hps_jax.convert.clip import config_to_hf
from hps_jax.models.clip import CLIPConfig


def randomize_(module, seed: int = 0, std: float = 0.05):
  """Overwrites every parameter with seeded random values (norm scales around 1), so biases and norms are
  exercised by the comparison instead of sitting at their zero/one initial values."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if name.endswith("logit_scale"):
        p.copy_(torch.full_like(p, 4.2))
      elif ("norm" in name or "ln" in name) and name.endswith("weight") and p.ndim == 1:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(std * noise)
  return module


def hf_clip(cfg: CLIPConfig, seed: int = 0):
  import transformers

  hf_cfg = transformers.CLIPConfig.from_dict(config_to_hf(cfg))
  model = transformers.CLIPModel(hf_cfg).eval()
  return randomize_(model, seed)


def open_clip_model(cfg: CLIPConfig, seed: int = 0):
  import open_clip
  from open_clip.model import CLIPTextCfg, CLIPVisionCfg

  vision = CLIPVisionCfg(
    layers=cfg.vision_layers,
    width=cfg.vision_width,
    head_width=cfg.vision_width // cfg.vision_heads,
    mlp_ratio=cfg.vision_mlp_dim / cfg.vision_width,
    patch_size=cfg.patch_size,
    image_size=cfg.image_size,
  )
  text = CLIPTextCfg(
    context_length=cfg.context_length,
    vocab_size=cfg.vocab_size,
    width=cfg.text_width,
    heads=cfg.text_heads,
    layers=cfg.text_layers,
    mlp_ratio=cfg.text_mlp_dim / cfg.text_width,
  )
  model = open_clip.model.CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.activation == "quick_gelu").eval()
  return randomize_(model, seed)


def features(out):
  """transformers 5 returns model outputs from get_*_features; older versions return tensors."""
  out = getattr(out, "pooler_output", out)
  return out.detach().numpy()


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def randomize_fan_in_(module, seed=0):
  """Seeded values for every parameter, scaled for deep conv nets: weights ~ N(0, 1/fan_in), norm scales
  ~ 1 + N(0, 0.2^2), biases N(0, 0.1^2); returns the module in eval mode."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)
  return module.eval()


def open_clip_resnet(cfg: CLIPConfig, seed: int = 0):
  """open_clip's ModifiedResNet CLIP for a ResNet config (`cfg.resnet_layers`), random weights scaled per fan-in
  (a deep ResNet stays finite) and random BatchNorm running statistics, in eval mode."""
  import open_clip
  import torch
  from open_clip.model import CLIPTextCfg, CLIPVisionCfg

  vision = CLIPVisionCfg(
    layers=cfg.resnet_layers,
    width=cfg.vision_width,
    head_width=32 * cfg.vision_width // cfg.vision_heads,
    image_size=cfg.image_size,
  )
  text = CLIPTextCfg(
    context_length=cfg.context_length,
    vocab_size=cfg.vocab_size,
    width=cfg.text_width,
    heads=cfg.text_heads,
    layers=cfg.text_layers,
    mlp_ratio=cfg.text_mlp_dim / cfg.text_width,
  )
  model = open_clip.model.CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.activation == "quick_gelu")
  randomize_fan_in_(model, seed)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if (".bn" in name or "downsample.1" in name) and name.endswith("weight"):
        # BatchNorm scales near 1, except each block's last (bn3, zero at open_clip's init), kept small so the
        # residual stream of a deep tower (RN50x64: 64 blocks) stays O(1) and absolute errors stay meaningful
        scale = 0.2 if name.endswith("bn3.weight") and ".layer" in name else 1.0
        p.copy_(scale * (1.0 + 0.2 * torch.randn(p.shape, generator=g)))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.7 + 0.6 * torch.rand(b.shape, generator=g))
  return model.eval()
