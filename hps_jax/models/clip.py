"""CLIP (vision ViT or ModifiedResNet + causal text transformer + projections + logit scale) as Flax NNX modules.

Pure architecture: no checkpoint formats here (see `hps_jax.convert.clip`). Images are NHWC float arrays already
normalized; token ids are int32 (batch, context_length) from `hps_jax.data.tokenizer`. The text embedding is read
at the end-of-text token. `CLIPConfig.eos_token_id` says how that token is found, as the checkpoint defines it:
None (OpenAI CLIP, open_clip, and transformers configs with the legacy `eos_token_id == 2`) takes the position of
the largest id (CLIP's end token 49407 is the largest id of its vocabulary); an id takes the first position holding
it (transformers' CLIPTextTransformer for any other `eos_token_id`, which vocabularies whose end token is not the
largest id need).

Parameter paths (used by the freezing regexes and the converters):
  vision/patch_embed/kernel, vision/class_embedding, vision/pos_embedding, vision/ln_pre/{scale,bias},
  vision/blocks/{i}/{ln1,attn/{query,key,value,out},ln2,mlp/{fc1,fc2}}/..., vision/ln_post, vision/proj,
  text/token_embedding/embedding, text/pos_embedding, text/blocks/{i}/..., text/ln_final, text/proj, logit_scale.
ResNet image towers (`CLIPConfig.resnet_layers` set: OpenAI's RN50 ... RN50x64):
  vision/{conv1,conv2,conv3}/kernel, vision/{bn1,bn2,bn3}/{scale,bias,mean,var},
  vision/layers/{l}/{j}/{conv1,bn1,conv2,bn2,conv3,bn3}/..., vision/layers/{l}/0/downsample/{conv,bn}/...,
  vision/attnpool/{pos_embedding,query,key,value,out/...}. BatchNorm running statistics are `nnx.BatchStat`s
  (inference form: never updated, no gradients).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hps_jax.models.attention import dot_product_attention

ACTIVATIONS = ("quick_gelu", "gelu")

# Bounds of the integer fields, far beyond any released CLIP (ViT-bigG: 48 layers, 1664 wide): `CLIPConfig.validate`
# refuses a config outside them before a model is built (a config.json asking for 10^7 layers would otherwise hang).
FIELD_LIMITS: dict[str, tuple[int, int]] = {
  "embed_dim": (1, 1 << 16),
  "image_size": (1, 1 << 14),
  "patch_size": (1, 1 << 14),
  "vision_width": (1, 1 << 16),
  "vision_layers": (1, 256),
  "vision_heads": (1, 1 << 16),
  "vision_mlp_dim": (1, 1 << 18),
  "vocab_size": (1, 1 << 22),
  "context_length": (1, 1 << 16),
  "text_width": (1, 1 << 16),
  "text_layers": (1, 256),
  "text_heads": (1, 1 << 16),
  "text_mlp_dim": (1, 1 << 18),
}


def int_field_problem(name: str, value, limits: dict[str, tuple[int, int]] = FIELD_LIMITS) -> str | None:
  """What is wrong with `value` for the integer field `name` ('is not an integer', 'is out of range [lo, hi]'), or
  None."""
  if isinstance(value, bool) or not isinstance(value, int):
    return f"is not an integer (got {type(value).__name__} {value!r:.40})"
  lo, hi = limits[name]
  if not lo <= value <= hi:
    return f"= {value} is out of range [{lo}, {hi}]"
  return None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of a CLIP model. `activation` is quick_gelu for OpenAI weights (HPS v1), gelu for LAION/open_clip
  ViT-H/14 (HPS v2, PickScore)."""

  embed_dim: int = 768
  # vision tower
  image_size: int = 224
  patch_size: int = 14
  vision_width: int = 1024
  vision_layers: int = 24
  vision_heads: int = 16
  vision_mlp_dim: int = 4096
  # text tower
  vocab_size: int = 49408
  context_length: int = 77
  eos_token_id: int | None = None  # None: pool at argmax(ids); an id: pool at its first position
  text_width: int = 768
  text_layers: int = 12
  text_heads: int = 12
  text_mlp_dim: int = 3072
  activation: str = "quick_gelu"
  # A ModifiedResNet image tower (OpenAI's RN50 ... RN50x64) instead of a ViT: Bottleneck blocks per stage. Then
  # vision_width is the stem width (64 for RN50), vision_heads the heads of the attention pool over the 32 *
  # vision_width features, patch_size the tower's total stride (32), vision_layers the number of blocks and
  # vision_mlp_dim is unused (kept equal to the pool's width).
  resnet_layers: tuple[int, ...] | None = None
  layer_norm_eps: float = 1e-5
  logit_scale_init: float = math.log(1 / 0.07)
  attention_backend: str = "auto"
  remat: bool = False

  def __post_init__(self):
    if isinstance(self.resnet_layers, list):  # from JSON
      object.__setattr__(self, "resnet_layers", tuple(self.resnet_layers))
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    for w, h, name in (
      (self.vision_attn_width, self.vision_heads, "vision"),
      (self.text_width, self.text_heads, "text"),
    ):
      if w % h:
        raise ValueError(f"{name} width {w} is not divisible by {h} heads")
    eos = self.eos_token_id
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size):
      raise ValueError(f"eos_token_id must be None or an id in [0, {self.vocab_size}), got {eos!r}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def is_resnet(self) -> bool:
    return self.resnet_layers is not None

  @property
  def vision_attn_width(self) -> int:
    """Width of the image tower's attention: the ViT width, or the ResNet's 32 * stem width feature maps."""
    return 32 * self.vision_width if self.is_resnet else self.vision_width

  @property
  def vision_arch(self) -> str:
    """A one-line description of the image tower."""
    if self.is_resnet:
      return f"ModifiedResNet {'-'.join(map(str, self.resnet_layers))} width {self.vision_width}"
    return f"ViT {self.vision_layers}x{self.vision_width} patch {self.patch_size}"

  def validate(self) -> "CLIPConfig":
    """Checks types and sane bounds of every field (`FIELD_LIMITS`; heads at most the width, patch at most the
    image, a positive finite layer_norm_eps); raises ValueError naming the first bad field, else returns self."""
    for name in FIELD_LIMITS:
      problem = int_field_problem(name, getattr(self, name))
      if problem:
        raise ValueError(f"{name} {problem}")
    for w, h, name in (
      (self.vision_attn_width, self.vision_heads, "vision"),
      (self.text_width, self.text_heads, "text"),
    ):
      if h > w or w % h:
        raise ValueError(f"{name} width {w} is not divisible by {h} heads")
    if self.resnet_layers is not None:
      r = self.resnet_layers
      if not isinstance(r, tuple) or len(r) != 4 or any(isinstance(n, bool) or not isinstance(n, int) for n in r):
        raise ValueError(f"resnet_layers must be 4 integers (blocks per stage), got {r!r:.60}")
      if not all(1 <= n <= 256 for n in r):
        raise ValueError(f"resnet_layers {r} out of range: each stage needs 1..256 blocks")
      if self.patch_size != 32 or self.vision_layers != sum(r) or self.vision_width % 2:
        raise ValueError(
          f"a ResNet image tower needs patch_size 32 (its stride), vision_layers = {sum(r)} (its blocks) and an even "
          f"vision_width; got {self.patch_size}, {self.vision_layers}, {self.vision_width}"
        )
    if self.patch_size > self.image_size or self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    for name in ("layer_norm_eps", "logit_scale_init"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r:.40}")
    if not 0 < self.layer_norm_eps < 1:
      raise ValueError(f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r:.40}")
    if not isinstance(self.attention_backend, str) or not isinstance(self.remat, bool):
      raise ValueError("attention_backend must be a string and remat a bool")
    eos = self.eos_token_id
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size):
      raise ValueError(f"eos_token_id must be None or an id in [0, {self.vocab_size}), got {eos!r:.40}")
    return self

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}")
    return cls(**d)

  # Presets ---------------------------------------------------------------------------------------------------
  @classmethod
  def vit_b32(cls, **kw) -> "CLIPConfig":
    return cls(
      **{
        **dict(
          embed_dim=512,
          patch_size=32,
          vision_width=768,
          vision_layers=12,
          vision_heads=12,
          vision_mlp_dim=3072,
          text_width=512,
          text_layers=12,
          text_heads=8,
          text_mlp_dim=2048,
          activation="quick_gelu",
        ),
        **kw,
      }
    )

  @classmethod
  def vit_l14(cls, **kw) -> "CLIPConfig":
    """OpenAI CLIP ViT-L/14, the HPS v1 backbone (QuickGELU)."""
    return cls(
      **{
        **dict(
          embed_dim=768,
          patch_size=14,
          vision_width=1024,
          vision_layers=24,
          vision_heads=16,
          vision_mlp_dim=4096,
          text_width=768,
          text_layers=12,
          text_heads=12,
          text_mlp_dim=3072,
          activation="quick_gelu",
        ),
        **kw,
      }
    )

  @classmethod
  def vit_h14(cls, **kw) -> "CLIPConfig":
    """LAION ViT-H/14 as in open_clip (HPS v2 / v2.1, PickScore): GELU."""
    return cls(
      **{
        **dict(
          embed_dim=1024,
          patch_size=14,
          vision_width=1280,
          vision_layers=32,
          vision_heads=16,
          vision_mlp_dim=5120,
          text_width=1024,
          text_layers=24,
          text_heads=16,
          text_mlp_dim=4096,
          activation="gelu",
        ),
        **kw,
      }
    )

  @classmethod
  def tiny(cls, **kw) -> "CLIPConfig":
    """A few-layer model for tests and the offline demo (full CLIP vocabulary so the real tokenizer works)."""
    # 64-wide heads as in every released CLIP, so the architecture can be inferred back from a state dict.
    return cls(
      **{
        **dict(
          embed_dim=32,
          image_size=32,
          patch_size=8,
          vision_width=128,
          vision_layers=4,
          vision_heads=2,
          vision_mlp_dim=512,
          text_width=128,
          text_layers=3,
          text_heads=2,
          text_mlp_dim=512,
          activation="quick_gelu",
        ),
        **kw,
      }
    )

  @classmethod
  def small(cls, **kw) -> "CLIPConfig":
    """A mid-size model (ViT-B-like widths, few layers) used by parity tests."""
    return cls(
      **{
        **dict(
          embed_dim=256,
          image_size=64,
          patch_size=16,
          vision_width=384,
          vision_layers=3,
          vision_heads=6,
          vision_mlp_dim=1536,
          text_width=256,
          text_layers=3,
          text_heads=4,
          text_mlp_dim=1024,
          activation="gelu",
        ),
        **kw,
      }
    )

  @classmethod
  def resnet(
    cls, layers: tuple[int, int, int, int], width: int, image_size: int, embed_dim: int, text_width: int, **kw
  ) -> "CLIPConfig":
    """A ModifiedResNet CLIP as OpenAI released them: 64-wide heads in the attention pool and the text tower, 12
    text layers, QuickGELU text."""
    layers = tuple(layers)
    return cls(
      **{
        **dict(
          embed_dim=embed_dim,
          image_size=image_size,
          patch_size=32,
          resnet_layers=layers,
          vision_width=width,
          vision_layers=sum(layers),
          vision_heads=width * 32 // 64,
          vision_mlp_dim=width * 32,
          text_width=text_width,
          text_layers=12,
          text_heads=text_width // 64,
          text_mlp_dim=4 * text_width,
          activation="quick_gelu",
        ),
        **kw,
      }
    )

  @classmethod
  def rn50(cls, **kw) -> "CLIPConfig":
    return cls.resnet((3, 4, 6, 3), 64, 224, 1024, 512, **kw)

  @classmethod
  def rn101(cls, **kw) -> "CLIPConfig":
    return cls.resnet((3, 4, 23, 3), 64, 224, 512, 512, **kw)

  @classmethod
  def rn50x4(cls, **kw) -> "CLIPConfig":
    return cls.resnet((4, 6, 10, 6), 80, 288, 640, 640, **kw)

  @classmethod
  def rn50x16(cls, **kw) -> "CLIPConfig":
    return cls.resnet((6, 8, 18, 8), 96, 384, 768, 768, **kw)

  @classmethod
  def rn50x64(cls, **kw) -> "CLIPConfig":
    """OpenAI CLIP RN50x64, the paper's second CLIP baseline in Table 2: 448 px images."""
    return cls.resnet((3, 15, 36, 10), 128, 448, 1024, 1024, **kw)

  @classmethod
  def tiny_resnet(cls, **kw) -> "CLIPConfig":
    """A ModifiedResNet CLIP small enough for tests (64 px images, one block per stage)."""
    layers = tuple(kw.pop("resnet_layers", (1, 1, 1, 1)))
    kw.pop("vision_layers", None)
    return cls.resnet(layers, 16, kw.pop("image_size", 64), 32, 128, **{**dict(text_layers=3), **kw})

  @classmethod
  def preset(cls, name: str, **kw) -> "CLIPConfig":
    table = {
      "vit_b32": cls.vit_b32,
      "vit_l14": cls.vit_l14,
      "vit_h14": cls.vit_h14,
      "rn50": cls.rn50,
      "rn101": cls.rn101,
      "rn50x4": cls.rn50x4,
      "rn50x16": cls.rn50x16,
      "rn50x64": cls.rn50x64,
      "tiny": cls.tiny,
      "tiny_resnet": cls.tiny_resnet,
      "small": cls.small,
    }
    if name not in table:
      raise ValueError(f"unknown CLIP preset {name!r}; choose from {sorted(table)}")
    return table[name](**kw)


def _act(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  return lambda x: jax.nn.gelu(x, approximate=False)


def _dense(din, dout, axes, *, dtype, param_dtype, rngs, use_bias=True):
  return nnx.Linear(
    din,
    dout,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
    kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
  )


def _layer_norm(dim, eps, *, dtype, param_dtype, rngs):
  return nnx.LayerNorm(
    dim,
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
    scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
  )


class Attention(nnx.Module):
  def __init__(self, width, heads, *, backend, dtype, param_dtype, rngs):
    self.heads = heads
    self.backend = backend
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = _dense(width, width, ("embed", "heads"), **kw)
    self.key = _dense(width, width, ("embed", "heads"), **kw)
    self.value = _dense(width, width, ("embed", "heads"), **kw)
    self.out = _dense(width, width, ("heads", "embed"), **kw)

  def __call__(self, x, *, is_causal=False):
    b, t, w = x.shape
    split = lambda y: y.reshape(b, t, self.heads, w // self.heads)
    o = dot_product_attention(
      split(self.query(x)), split(self.key(x)), split(self.value(x)), is_causal=is_causal, backend=self.backend
    )
    return self.out(o.reshape(b, t, w))


class MLP(nnx.Module):
  def __init__(self, width, hidden, activation, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = _dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = _dense(hidden, width, ("mlp", "embed"), **kw)
    self.activation = activation

  def __call__(self, x):
    return self.fc2(_act(self.activation)(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, width, heads, mlp_dim, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = _layer_norm(width, cfg.layer_norm_eps, **kw)
    self.attn = Attention(width, heads, backend=cfg.attention_backend, **kw)
    self.ln2 = _layer_norm(width, cfg.layer_norm_eps, **kw)
    self.mlp = MLP(width, mlp_dim, cfg.activation, **kw)

  def __call__(self, x, *, is_causal=False):
    x = x + self.attn(self.ln1(x), is_causal=is_causal)
    return x + self.mlp(self.ln2(x))


def _run_blocks(blocks, x, *, is_causal, remat):
  for block in blocks:
    if remat:
      x = nnx.remat(lambda blk, y: blk(y, is_causal=is_causal))(block, x)
    else:
      x = block(x, is_causal=is_causal)
  return x


class VisionTransformer(nnx.Module):
  def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
    w, p = cfg.vision_width, cfg.patch_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.patch_embed = nnx.Conv(
      3,
      w,
      kernel_size=(p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, None, None, "embed")),
      **kw,
    )
    scale = w**-0.5
    self.class_embedding = nnx.Param(
      nnx.with_partitioning(nnx.initializers.normal(scale), ("embed",))(rngs.params(), (w,), param_dtype)
    )
    self.pos_embedding = nnx.Param(
      nnx.with_partitioning(nnx.initializers.normal(scale), (None, "embed"))(
        rngs.params(), (cfg.num_patches + 1, w), param_dtype
      )
    )
    self.ln_pre = _layer_norm(w, cfg.layer_norm_eps, **kw)
    self.blocks = nnx.List(
      [Block(w, cfg.vision_heads, cfg.vision_mlp_dim, cfg, **kw) for _ in range(cfg.vision_layers)]
    )
    self.ln_post = _layer_norm(w, cfg.layer_norm_eps, **kw)
    self.proj = nnx.Param(
      nnx.with_partitioning(nnx.initializers.normal(scale), ("embed", "proj"))(
        rngs.params(), (w, cfg.embed_dim), param_dtype
      )
    )

  def __call__(self, images):
    """images: (B, H, W, 3) normalized; returns (B, embed_dim) unnormalized image embeddings."""
    cfg = self.cfg
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"expected images of shape (B, {cfg.image_size}, {cfg.image_size}, 3), got {images.shape}")
    x = self.patch_embed(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.vision_width)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, cfg.vision_width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(self.dtype)
    x = self.ln_pre(x)
    x = _run_blocks(self.blocks, x, is_causal=False, remat=cfg.remat)
    pooled = self.ln_post(x[:, 0])
    return pooled.astype(jnp.float32) @ self.proj[...].astype(jnp.float32)


class BatchNorm(nnx.Module):
  """BatchNorm2d in inference form: (x - mean) / sqrt(var + eps) * scale + bias over the channel axis (NHWC).
  The running statistics are `nnx.BatchStat`s, loaded from the checkpoint and never updated."""

  def __init__(self, channels: int, *, eps: float = 1e-5, dtype, param_dtype, rngs=None):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((channels,), param_dtype))
    self.var = nnx.BatchStat(jnp.ones((channels,), param_dtype))

  def __call__(self, x):
    f32 = jnp.float32
    inv = jax.lax.rsqrt(self.var[...].astype(f32) + self.eps) * self.scale[...].astype(f32)
    shift = self.bias[...].astype(f32) - self.mean[...].astype(f32) * inv
    return (x * inv.astype(x.dtype) + shift.astype(x.dtype)).astype(self.dtype)


def _conv(cin, cout, k, *, dtype, param_dtype, rngs, stride=1):
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(k, k),
    strides=(stride, stride),
    padding=((k // 2, k // 2), (k // 2, k // 2)),
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
    kernel_init=nnx.with_partitioning(nnx.initializers.he_normal(), (None, None, None, "embed")),
  )


def avg_pool(x, s: int):
  """AvgPool2d(kernel s, stride s) on NHWC: a trailing row / column that does not fill a window is dropped, as
  torch does."""
  if s == 1:
    return x
  b, h, w, c = x.shape
  x = x[:, : h - h % s, : w - w % s]
  return x.reshape(b, h // s, s, w // s, s, c).mean(axis=(2, 4))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 -> (avgpool when strided) -> 1x1 (4x planes), BatchNorm + ReLU; the shortcut is avgpool -> 1x1 conv
  -> BatchNorm when the shape changes (anti-aliased strides: every conv has stride 1)."""

  def __init__(self, inplanes: int, planes: int, stride: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stride = stride
    self.conv1 = _conv(inplanes, planes, 1, **kw)
    self.bn1 = BatchNorm(planes, **kw)
    self.conv2 = _conv(planes, planes, 3, **kw)
    self.bn2 = BatchNorm(planes, **kw)
    self.conv3 = _conv(planes, 4 * planes, 1, **kw)
    self.bn3 = BatchNorm(4 * planes, **kw)
    needs = stride > 1 or inplanes != 4 * planes
    self.downsample = nnx.data(Downsample(inplanes, 4 * planes, stride, **kw) if needs else None)

  def __call__(self, x):
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = jax.nn.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(avg_pool(out, self.stride)))
    identity = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(out + identity)


class Downsample(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, *, dtype, param_dtype, rngs):
    self.stride = stride
    self.conv = _conv(cin, cout, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.bn = BatchNorm(cout, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.bn(self.conv(avg_pool(x, self.stride)))


class AttentionPool2d(nnx.Module):
  """The ResNet's head: the mean of the final feature map is prepended to its positions, position embeddings are
  added, and that first token attends over all of them (multi-head); its output, projected, is the embedding."""

  def __init__(self, grid: int, width: int, heads: int, out_dim: int, *, backend, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.backend = backend
    self.dtype = dtype
    self.pos_embedding = nnx.Param(
      nnx.with_partitioning(nnx.initializers.normal(width**-0.5), (None, "embed"))(
        rngs.params(), (grid * grid + 1, width), param_dtype
      )
    )
    self.query = _dense(width, width, ("embed", "heads"), **kw)
    self.key = _dense(width, width, ("embed", "heads"), **kw)
    self.value = _dense(width, width, ("embed", "heads"), **kw)
    self.out = _dense(width, out_dim, ("heads", "proj"), **kw)

  def __call__(self, x):
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + self.pos_embedding[...].astype(x.dtype)
    split = lambda y: y.reshape(b, y.shape[1], self.heads, c // self.heads)
    o = dot_product_attention(
      split(self.query(x[:, :1])), split(self.key(x)), split(self.value(x)), is_causal=False, backend=self.backend
    )
    return self.out(o.reshape(b, c))


class ModifiedResNet(nnx.Module):
  """CLIP's ResNet image tower: a three-conv stem (stride 2, then avgpool 2), four stages of Bottleneck blocks
  (stride 2 from the second stage on) and the attention pool; total stride 32."""

  def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    w = cfg.vision_width
    self.cfg = cfg
    self.dtype = dtype
    self.conv1 = _conv(3, w // 2, 3, stride=2, **kw)
    self.bn1 = BatchNorm(w // 2, **kw)
    self.conv2 = _conv(w // 2, w // 2, 3, **kw)
    self.bn2 = BatchNorm(w // 2, **kw)
    self.conv3 = _conv(w // 2, w, 3, **kw)
    self.bn3 = BatchNorm(w, **kw)
    stages, inplanes = [], w
    for i, blocks in enumerate(cfg.resnet_layers):
      planes = w * 2**i
      stage = [Bottleneck(inplanes, planes, 1 if i == 0 else 2, **kw)]
      inplanes = 4 * planes
      stage += [Bottleneck(inplanes, planes, 1, **kw) for _ in range(1, blocks)]
      stages.append(nnx.List(stage))
    self.layers = nnx.List(stages)
    self.attnpool = AttentionPool2d(
      cfg.image_size // 32, 32 * w, cfg.vision_heads, cfg.embed_dim, backend=cfg.attention_backend, **kw
    )

  def __call__(self, images):
    """images: (B, H, W, 3) normalized; returns (B, embed_dim) unnormalized image embeddings."""
    cfg = self.cfg
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"expected images of shape (B, {cfg.image_size}, {cfg.image_size}, 3), got {images.shape}")
    x = images.astype(self.dtype)
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
      x = jax.nn.relu(bn(conv(x)))
    x = avg_pool(x, 2)
    for stage in self.layers:
      for block in stage:
        x = nnx.remat(lambda blk, y: blk(y))(block, x) if cfg.remat else block(x)
    return self.attnpool(x).astype(jnp.float32)


class TextTransformer(nnx.Module):
  """CLIP's text tower. `with_projection=False` gives transformers' `CLIPTextModel` (Stable Diffusion's text encoder),
  which has no projection and is read through `hidden_states`."""

  def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs, with_projection: bool = True):
    w = cfg.text_width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.token_embedding = nnx.Embed(
      cfg.vocab_size,
      w,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
    )
    self.pos_embedding = nnx.Param(
      nnx.with_partitioning(nnx.initializers.normal(0.01), (None, "embed"))(
        rngs.params(), (cfg.context_length, w), param_dtype
      )
    )
    self.blocks = nnx.List([Block(w, cfg.text_heads, cfg.text_mlp_dim, cfg, **kw) for _ in range(cfg.text_layers)])
    self.ln_final = _layer_norm(w, cfg.layer_norm_eps, **kw)
    self.proj = (
      nnx.Param(
        nnx.with_partitioning(nnx.initializers.normal(w**-0.5), ("embed", "proj"))(
          rngs.params(), (w, cfg.embed_dim), param_dtype
        )
      )
      if with_projection
      else None
    )

  def hidden_states(self, token_ids):
    """(B, T) token ids -> (B, T, width) after the final LayerNorm (transformers' `last_hidden_state`; what Stable
    Diffusion's UNet attends to)."""
    t = token_ids.shape[1]
    if t > self.cfg.context_length:
      raise ValueError(f"token sequences of length {t} exceed the context length {self.cfg.context_length}")
    x = self.token_embedding(token_ids) + self.pos_embedding[:t].astype(self.dtype)
    x = _run_blocks(self.blocks, x, is_causal=True, remat=self.cfg.remat)
    return self.ln_final(x)

  def __call__(self, token_ids):
    """token_ids: (B, T) int with T <= context_length; returns (B, embed_dim) unnormalized text embeddings."""
    if self.proj is None:
      raise ValueError("this text tower has no projection (a CLIPTextModel): use hidden_states()")
    x = self.hidden_states(token_ids)
    if self.cfg.eos_token_id is None:
      eot = jnp.argmax(token_ids, axis=-1)
    else:
      eot = jnp.argmax(token_ids == self.cfg.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return pooled.astype(jnp.float32) @ self.proj[...].astype(jnp.float32)


class CLIP(nnx.Module):
  """CLIP with `encode_image`, `encode_text` and `__call__` -> (image_emb, text_emb, logit_scale)."""

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = cfg
    with nnx.use_eager_sharding(False):
      tower = ModifiedResNet if cfg.is_resnet else VisionTransformer
      self.vision = tower(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.text = TextTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, dtype=jnp.float32))

  def encode_image(self, images):
    return self.vision(images)

  def encode_text(self, token_ids):
    return self.text(token_ids)

  def __call__(self, images, token_ids):
    return self.encode_image(images), self.encode_text(token_ids), self.logit_scale[...]


class CLIPTextEncoder(nnx.Module):
  """The text tower alone, without projection: transformers' `CLIPTextModel`, Stable Diffusion's text encoder.
  Parameter paths are those of `CLIP` (`text/...`), so the same key maps load it."""

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = cfg
    with nnx.use_eager_sharding(False):
      self.text = TextTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, with_projection=False)

  def __call__(self, token_ids):
    """(B, T) token ids -> (B, T, width) hidden states."""
    return self.text.hidden_states(token_ids)


def normalize(x, eps: float = 1e-12):
  """L2-normalizes the last axis (in float32)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
