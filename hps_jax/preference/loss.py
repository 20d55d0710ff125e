"""The preference objective: for a prompt with n images, logits_i = logit_scale * cos(img_i, txt) over its images
(padded slots masked out), cross-entropy against the human-chosen image."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hps_jax.models.clip import normalize

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) at 100
NEG = -1e9


def prompt_image_cosines(model, pixels, ids):
  """pixels (B, K, S, S, 3), ids (B, T) -> cos (B, K) of every image slot with its prompt."""
  b, k = pixels.shape[:2]
  img = normalize(model.encode_image(pixels.reshape((b * k,) + pixels.shape[2:]))).reshape(b, k, -1)
  txt = normalize(model.encode_text(ids))
  return jnp.einsum("bkd,bd->bk", img, txt)


def choice_loss(cos, logit_scale, mask, chosen, weights=None):
  """Mean cross-entropy of the chosen image among the prompt's valid images, and the batch accuracy.
  `weights` (B,) can zero out padded rows."""
  scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
  logits = jnp.where(mask, scale * cos, NEG)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, chosen[:, None].astype(jnp.int32), axis=-1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == chosen).astype(jnp.float32)
  w = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  return (nll * w).sum() / denom, {"accuracy": (correct * w).sum() / denom, "logit_scale": scale}


def preference_loss(model, batch):
  """The train-loop loss: batch has pixels, ids, mask, chosen."""
  cos = prompt_image_cosines(model, batch["pixels"], batch["ids"])
  return choice_loss(cos, model.logit_scale[...], batch["mask"], batch["chosen"])
