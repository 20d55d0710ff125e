"""The one attention function every model in hps_jax calls.

Inputs use the (batch, length, heads, head_dim) layout of `jax.nn.dot_product_attention`. The backend is a
switch so a model can be moved between XLA, cuDNN flash attention (GPU, fp16/bf16 only) and future TPU kernels
without touching model code.

Backends (a model config's `attention_backend`), decided per call at trace time from the platform, dtype and shapes:

- "xla": XLA's attention (every platform, every dtype).
- "cudnn": cuDNN's fused flash attention. Where it cannot run these inputs (no CUDA GPU, float32, a head dim cuDNN
  does not take, ...) the call falls back to XLA and warns ONCE per reason (`AttentionFallbackWarning`), so a
  config that asks for cuDNN runs on a CPU too and the numbers are the same.
- "auto" (default): cuDNN when it can run the inputs, XLA otherwise, silently. Note that
  `jax.nn.dot_product_attention(implementation=None)` itself always picks XLA (jax <= 0.11), so "auto" chooses
  explicitly.

cuDNN's conditions (from jax's `check_is_flash_attention`): a CUDA GPU with cuDNN, query/key/value in float16 or
bfloat16, a head dim that is a multiple of 8 and at most 128 (256 from Hopper, compute capability 9.0), and with a
mask (it becomes a bias) even sequence lengths. `attention_stats()` counts which implementation each traced call
got, so a benchmark can report that cuDNN really ran.
"""

from __future__ import annotations

import collections
import functools
import warnings

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class AttentionFallbackWarning(UserWarning):
  """attention_backend='cudnn' was asked for where cuDNN cannot run the inputs: XLA's attention ran instead."""


_warned: set[str] = set()
_stats: collections.Counter = collections.Counter()


def attention_stats() -> dict[str, int]:
  """How many attention calls were traced with each implementation ("xla" / "cudnn") since the last reset."""
  return dict(_stats)


def reset_attention_stats():
  _stats.clear()


@functools.lru_cache(maxsize=None)
def _device_info() -> tuple[str, bool, tuple[int, ...] | None]:
  """(jax's default platform, whether it is CUDA with cuDNN found, the first device's compute capability)."""
  platform = jax.default_backend()
  if platform != "gpu":
    return platform, False, None
  dev = jax.devices()[0]
  cuda = "cuda" in str(getattr(dev.client, "platform_version", "")).lower()
  try:
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

    check_cudnn_version()
  except (ImportError, RuntimeError):
    cuda = False
  cc = getattr(dev, "compute_capability", None)
  try:
    capability = tuple(int(x) for x in str(cc).split(".")) if cc else None
  except ValueError:
    capability = None
  return platform, cuda, capability


def cudnn_problem(
  dtype,
  head_dim: int | None = None,
  *,
  q_len: int | None = None,
  kv_len: int | None = None,
  has_mask: bool = False,
  platform: str | None = None,
  cudnn: bool | None = None,
  capability: tuple[int, ...] | None = None,
) -> str | None:
  """Why cuDNN's fused attention cannot run these inputs here, or None when it can. `platform`, `cudnn` (CUDA with
  cuDNN found) and `capability` default to jax's default device (given explicitly in tests)."""
  if platform is None:
    platform, found, cap = _device_info()
    cudnn = found if cudnn is None else cudnn
    capability = cap if capability is None else capability
  if platform != "gpu":
    return f"no cuDNN on the {platform} backend"
  if not cudnn:
    return "the GPU backend is not CUDA with cuDNN"
  if jnp.dtype(dtype) not in _HALF:
    return f"cuDNN flash attention takes float16/bfloat16, not {jnp.dtype(dtype).name}"
  if head_dim is not None:
    h_max = 256 if capability is not None and tuple(capability) >= (9, 0) else 128
    if head_dim % 8 or head_dim > h_max:
      return f"head dim {head_dim}: cuDNN needs a multiple of 8, at most {h_max}"
  if has_mask and any(n is not None and n % 2 for n in (q_len, kv_len)):
    return f"a mask with odd sequence lengths ({q_len}, {kv_len})"
  return None


def resolve_backend(
  backend: str,
  dtype,
  *,
  head_dim: int | None = None,
  q_len: int | None = None,
  kv_len: int | None = None,
  has_mask: bool = False,
) -> str:
  """Maps a config value to the `implementation` argument of `jax.nn.dot_product_attention`: "cudnn" or "xla"
  (see the module docstring). 'cudnn' that cannot run here warns once per reason and gives "xla"."""
  if backend not in BACKENDS:
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "xla":
    return "xla"
  problem = cudnn_problem(dtype, head_dim, q_len=q_len, kv_len=kv_len, has_mask=has_mask)
  if problem is None:
    return "cudnn"
  if backend == "cudnn" and problem not in _warned:
    _warned.add(problem)
    warnings.warn(
      f"attention_backend='cudnn' cannot run here ({problem}); using XLA's attention (same numbers)",
      AttentionFallbackWarning,
      stacklevel=3,
    )
  return "xla"


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False, backend: str = "auto"):
  """Scaled dot-product attention, softmax scale 1/sqrt(head_dim)."""
  impl = resolve_backend(
    backend, q.dtype, head_dim=q.shape[-1], q_len=q.shape[-3], kv_len=k.shape[-3], has_mask=mask is not None
  )
  _stats[impl] += 1
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)
