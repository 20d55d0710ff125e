"""Preference-classifier training step: hps_jax vs the same partial fine-tune in PyTorch (transformers CLIPModel),
same machine, same run.

The paper's setup: CLIP ViT-L/14 (random weights: speed does not depend on values), trainable = the last 10 vision
and last 6 text blocks + final LayerNorms + projections (configs/hps_classifier.py PAPER_TRAINABLE), AdamW, n-way
choice loss over K images per prompt at 224 px. The timed region is one optimizer step on a device-resident batch
(data loading excluded on both sides). Prints one JSON line (--out also writes it). On a GPU, MFU is reported from
XLA's FLOP count of the compiled step and the device's dense bf16/fp32 peak.

  python -m bench.train_preference --batch 1 --iters 2                      # CPU: tiny batch
  python -m bench.train_preference --batch 8 --dtype bfloat16 --out bench/results/train_h100_bf16.json
  python -m bench.train_preference --model tiny --batch 1 --images 2 --iters 1   # smoke run (toy widths)

--attention picks the JAX attention backend (auto: cuDNN flash attention on a GPU in bf16, hps_jax.models.attention),
--remat recomputes each transformer block in the backward pass (CLIPConfig.remat).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from bench.common import aot_compile, attention_impls, device_name, emit, flops_per_s, mfu, peak_flops, timed


def torch_trainable(name: str) -> bool:
  """PAPER_TRAINABLE in transformers' parameter names."""
  import re

  return (
    re.match(
      r"(vision_model\.encoder\.layers\.(1[4-9]|2[0-3])\.|text_model\.encoder\.layers\.([6-9]|1[01])\."
      r"|vision_model\.post_layernorm\.|visual_projection\.|text_model\.final_layer_norm\.|"
      r"text_projection\.)",
      name,
    )
    is not None
  )


def jax_side(cfg, batch, args):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from hps_jax.configs.hps_classifier import PAPER_TRAINABLE
  from hps_jax.models.clip import CLIP
  from hps_jax.models.dtypes import as_dtype
  from hps_jax.preference.loss import preference_loss
  from hps_jax.train_loop import count_params, regex_filter

  model = CLIP(cfg, dtype=as_dtype(args.dtype), rngs=nnx.Rngs(0))
  graphdef, trainable, frozen = nnx.split(model, regex_filter(PAPER_TRAINABLE), ...)
  tx = optax.adamw(1.7e-5, weight_decay=3.1e-3)
  opt = tx.init(trainable)

  def step(trainable, frozen, opt, batch):
    def loss_of(t):
      return preference_loss(nnx.merge(graphdef, t, frozen), batch)[0]

    loss, grads = jax.value_and_grad(loss_of)(trainable)
    updates, opt = tx.update(grads, opt, trainable)
    return optax.apply_updates(trainable, updates), opt, loss

  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()})
  compiled, _, _, flops = aot_compile(jax.jit(step, donate_argnums=(0, 2)), trainable, frozen, opt, batch)
  state = {"t": trainable, "o": opt}

  def run():
    state["t"], state["o"], loss = compiled(state["t"], frozen, state["o"], batch)
    loss.block_until_ready()

  for _ in range(args.warmup):
    run()
  return timed(run, args.iters), flops, count_params(trainable)


def torch_side(cfg, batch, args):
  import torch
  import transformers

  from hps_jax.convert.clip import config_to_hf

  torch.manual_seed(0)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config_to_hf(cfg))).to(dev).train()
  params = []
  for name, p in model.named_parameters():
    p.requires_grad_(torch_trainable(name))
    if p.requires_grad:
      params.append(p)
  opt = torch.optim.AdamW(params, lr=1.7e-5, weight_decay=3.1e-3)
  b, k = batch["mask"].shape
  pixels = torch.from_numpy(batch["pixels"].reshape((b * k,) + batch["pixels"].shape[2:]).transpose(0, 3, 1, 2))
  pixels, ids = pixels.to(dev), torch.from_numpy(batch["ids"]).long().to(dev)
  mask, chosen = torch.from_numpy(batch["mask"]).to(dev), torch.from_numpy(batch["chosen"]).long().to(dev)
  autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def run():
    opt.zero_grad(set_to_none=True)
    with autocast:
      img = model.get_image_features(pixel_values=pixels)
      txt = model.get_text_features(input_ids=ids)
      img = getattr(img, "pooler_output", img).float()
      txt = getattr(txt, "pooler_output", txt).float()
    img = torch.nn.functional.normalize(img, dim=-1).reshape(b, k, -1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * torch.einsum("bkd,bd->bk", img, txt)
    loss = torch.nn.functional.cross_entropy(logits.masked_fill(~mask, -1e9), chosen)
    loss.backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    run()
  return timed(run, args.iters), dev, torch.__version__, torch.get_num_threads(), len(params)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="vit_l14", choices=["vit_b32", "vit_l14", "vit_h14", "tiny", "small"])
  ap.add_argument("--batch", type=int, default=1, help="prompts per step")
  ap.add_argument("--images", type=int, default=4, help="image slots per prompt")
  ap.add_argument("--iters", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"], help="JAX attention backend")
  ap.add_argument("--remat", action="store_true", help="recompute each CLIP block in the backward pass (JAX)")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--out")
  args = ap.parse_args()

  import jax

  from hps_jax.models.clip import CLIPConfig

  cfg = CLIPConfig.preset(args.model, attention_backend=args.attention, remat=args.remat)
  rng = np.random.default_rng(0)
  b, k, s = args.batch, args.images, cfg.image_size
  batch = {
    "pixels": rng.standard_normal((b, k, s, s, 3)).astype(np.float32),
    "ids": rng.integers(1, 49000, (b, cfg.context_length)).astype(np.int32),
    "mask": np.ones((b, k), bool),
    "chosen": rng.integers(0, k, (b,)).astype(np.int32),
  }
  batch["ids"][:, -1] = 49407
  jt, flops, n_train = jax_side(cfg, batch, args)
  jstep = statistics.median(jt)
  dev = jax.devices()[0]
  result = {
    "bench": "train_preference",
    "model": args.model,
    "device": device_name(),
    "backend": dev.platform,
    "batch_prompts": b,
    "images_per_prompt": k,
    "dtype": args.dtype,
    "attention": args.attention,
    "attention_impls": attention_impls(),
    "remat": args.remat,
    "iters": args.iters,
    "trainable_params": n_train,
    "jax_version": jax.__version__,
    "jax_step_s": jstep,
    "jax_samples_per_s": b / jstep,
    "jax_images_per_s": b * k / jstep,
    "step_flops": flops,
    "jax_flops_per_s": flops_per_s(flops, jstep),
    "mfu": mfu(flops, jstep, peak_flops(dev, args.dtype)),
  }
  if not args.no_torch:
    tt, tdev, tver, threads, n_torch = torch_side(cfg, batch, args)
    tstep = statistics.median(tt)
    result.update(
      {
        "torch_device": tdev,
        "torch_version": tver,
        "torch_threads": threads,
        "torch_step_s": tstep,
        "torch_samples_per_s": b / tstep,
        "speedup_jax_over_torch": tstep / jstep,
      }
    )
  emit(result, args.out)


if __name__ == "__main__":
  main()
