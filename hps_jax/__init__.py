"""hps_jax: Human Preference Score (Wu et al., ICCV 2023) in JAX / Flax NNX.

`from hps_jax import Scorer` is the entry point for scoring; submodules are imported lazily so that the command
line starts quickly and torch is never imported by the core. One-liners:

    hps_jax.score(images, "a prompt", model="hps-v2.1")   # np.ndarray of HPS; a registry name or a checkpoint path
    hps_jax.fid("generated/", "reference/")               # float; a directory, JSONL or stats .npz
    hps_jax.Scorer.from_pretrained("hps-v2.1")            # published weights, cached and sha256-checked
"""

__version__ = "0.1.0"

_LAZY = {
  "Scorer": "hps_jax.preference.scorer",
  "AestheticScorer": "hps_jax.preference.scorer",
  "CLIP": "hps_jax.models.clip",
  "CLIPConfig": "hps_jax.models.clip",
  "CLIPTokenizer": "hps_jax.data.tokenizer",
  "load_clip": "hps_jax.convert.clip",
  "score": "hps_jax.metrics.api",
  "fid": "hps_jax.metrics.api",
  "WeightsError": "hps_jax.weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'hps_jax' has no attribute {name!r}")
