"""Helpers shared by the bench scripts: timing, ahead-of-time compilation with XLA's FLOP count, the GPU peak-FLOP/s
table and MFU, the device description, the one-JSON-line output, and the diffusers configs of the Stable Diffusion
presets (bench.sample, bench.train_lora, bench.unet_step).

jax is imported inside the functions that need it, so that `python -m bench.<script> --help` stays fast.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
def timed(fn, iters: int) -> list[float]:
  """Wall-clock seconds of `iters` calls of `fn` (fn must block until its result is ready)."""
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def median_time(fn, iters: int) -> float:
  """The median of `timed(fn, iters)`."""
  return statistics.median(timed(fn, iters))


def xla_flops(jitted, *args) -> float:
  """XLA's FLOP count of one call of `jitted` on `args`, from the lowered (not yet optimized) HLO's `cost_analysis`:
  no compilation needed, so it is cheap next to a function a library jits internally. 0.0 when none is reported."""
  try:
    cost = jitted.lower(*args).cost_analysis()
  except Exception:  # noqa: BLE001  (a backend without a cost model: no FLOP count, not a failed bench)
    return 0.0
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def aot_compile(jitted, *args):
  """Ahead-of-time lower + compile of a jitted step: (compiled, lower seconds, compile seconds, XLA's FLOP count of
  one call from `cost_analysis`, 0.0 when the backend reports none)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return compiled, lower_s, compile_s, float(cost.get("flops", 0.0)) if cost else 0.0


# ------------------------------------------------------------------------------------------------------------
# peak FLOP/s and MFU
# ------------------------------------------------------------------------------------------------------------
# Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's datasheets, (bf16 tensor core, fp32 without TF32), for MFU:
# H100 SXM 989 / 67 TFLOP/s, H100 PCIe 756 / 51, H200 (SXM) 989 / 67, A100 (SXM or PCIe) 312 / 19.5.
# Matched against jax's device_kind in this order (the first substring found wins).
PEAK_FLOPS = [
  ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
  ("H100", {"bfloat16": 989e12, "float32": 67e12}),
  ("H200", {"bfloat16": 989e12, "float32": 67e12}),
  ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
]


def peak_flops(device, dtype: str) -> float | None:
  """The dense peak FLOP/s of a known GPU for `dtype` ("bfloat16" / "float32"); None elsewhere (CPU included)."""
  if device.platform != "gpu":
    return None
  kind = getattr(device, "device_kind", "")
  return next((v[dtype] for name, v in PEAK_FLOPS if name in kind), None)


def flops_per_s(flops: float, step_s: float) -> float | None:
  """Achieved FLOP/s of a step; None when XLA reported no FLOP count."""
  return flops / step_s if flops else None


def mfu(flops: float, step_s: float, peak: float | None) -> float | None:
  """Model FLOP utilization: FLOPs / step time / peak; None without a known peak or a FLOP count."""
  return flops / step_s / peak if (peak and flops) else None


# ------------------------------------------------------------------------------------------------------------
# device description and output
# ------------------------------------------------------------------------------------------------------------
def device_name() -> str:
  """jax's default device: its device_kind on an accelerator, the processor and core count on CPU."""
  import jax

  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return getattr(d, "device_kind", d.platform)


def device_tag() -> str:
  """A short lower-case name of jax's default device for result file names: 'h200', 'h100', 'a100', ... on a GPU
  (the model number in device_kind, e.g. 'NVIDIA H200'), else the platform ('cpu', 'tpu')."""
  import re

  import jax

  d = jax.devices()[0]
  if d.platform == "cpu":
    return "cpu"
  kind = str(getattr(d, "device_kind", "") or d.platform)
  m = re.search(r"\b([A-Za-z]{1,3}\d{2,4}[A-Za-z]?)\b", kind.replace("NVIDIA", ""))
  return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or d.platform).lower()


def attention_impls() -> dict[str, int]:
  """How many attention calls were traced with each implementation ('xla' / 'cudnn') in this process: shows
  whether cuDNN flash attention really ran (hps_jax.models.attention)."""
  from hps_jax.models.attention import attention_stats

  return attention_stats()


def emit(result: dict, out: str | None):
  """Prints the result as one JSON line and, with --out, writes it there too."""
  line = json.dumps(result)
  print(line)
  if out:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(line + "\n")


# ------------------------------------------------------------------------------------------------------------
# Stable Diffusion presets: the diffusers / transformers constructor arguments of each component
# ------------------------------------------------------------------------------------------------------------
# CompVis/stable-diffusion-v1-4 unet/, vae/ and text_encoder/ config.json (architecture keys only)
SD14 = {
  "unet": dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32,
    cross_attention_dim=768,
    attention_head_dim=8,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
  ),
  "vae": dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
  ),
  "text": dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
  ),
}
# every SD 1.x block type at toy widths (VAE factor 4): checks that a script runs, in seconds
TINY = {
  "unet": dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,
  ),
  "vae": dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.18215,
  ),
  "text": dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=32,
  ),
}
SD_PRESETS = {"sd14": SD14, "tiny": TINY}
