"""HPS scoring throughput: hps_jax Scorer vs the PyTorch CLIP people use, same weights, same machine, same run.

The reference is transformers' CLIPModel for the ViTs and open_clip's ModifiedResNet CLIP for the ResNets
(RN50 ... RN50x64, which transformers does not have). Full-size architecture (ViT-L/14 by default) with random
weights: throughput does not depend on weight values.
Both sides get the same preprocessed pixels and token ids and compute 100 * cos(image, text); the timed region is
the model forward (host preprocessing excluded on both sides). Prints one JSON line per dtype; --out also writes it
(several dtypes, e.g. --dtype bfloat16,float32, share one model build: --out then needs a {dtype} placeholder).
The FLOP count is XLA's `cost_analysis` of the lowered scoring function; MFU = FLOPs / time / the device's dense
peak (bench/common.py), on a known GPU only. --attention picks the JAX attention backend (hps_jax.models.attention;
`attention_impls` in the output counts which implementation the traced calls got).

  python -m bench.score --batch 4 --iters 3                    # CPU: small batch
  python -m bench.score --batch 64 --dtype bfloat16 --out bench/results/score_h100_bf16.json   # on a GPU
  python -m bench.score --model rn50x64 --batch 2 --iters 3     # Table 2's CLIP RN50x64 (448 px) vs open_clip
  python -m bench.score --model vit_h14 --batch 64 --dtype bfloat16,float32 --out bench/results/score_{dtype}.json
"""

from __future__ import annotations

import argparse
import copy
import statistics

import numpy as np

from bench.common import attention_impls, device_name, emit, mfu, peak_flops, timed, xla_flops

DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def cosine_fn(model):
  """The scoring function Scorer jits (cos of the normalized embeddings), for XLA's FLOP count."""
  import jax.numpy as jnp
  from flax import nnx

  graphdef = nnx.split(model)[0]

  def fn(state, pixels, ids):
    m = nnx.merge(graphdef, state)
    img, txt = m.encode_image(pixels), m.encode_text(ids)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.sum(img * txt, axis=-1)

  return fn


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument(
    "--model",
    default="vit_l14",
    choices=[
      "vit_b32",
      "vit_l14",
      "vit_h14",
      "rn50",
      "rn101",
      "rn50x4",
      "rn50x16",
      "rn50x64",
      "tiny",
      "tiny_resnet",
      "small",
    ],
  )
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--dtype", default="float32", help="compute dtype(s), comma-separated: float32, bfloat16")
  ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"], help="JAX attention backend")
  ap.add_argument("--no-torch", action="store_true", help="time only the JAX side")
  ap.add_argument(
    "--out", help="also write the JSON result here ({dtype} in the path: bf16 / fp32, needed with several dtypes)"
  )
  args = ap.parse_args(argv)
  dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
  if not dtypes or any(d not in DTYPES for d in dtypes) or len(set(dtypes)) != len(dtypes):
    ap.error(f"--dtype takes distinct values from {DTYPES}, comma-separated; got {args.dtype!r}")
  if args.out and len(dtypes) > 1 and "{dtype}" not in args.out:
    ap.error("--out needs a {dtype} placeholder with several dtypes")

  import jax
  import torch
  from flax import nnx

  from hps_jax.convert.clip import build_model, params_from_hf, params_from_openai
  from hps_jax.data.tokenizer import CLIPTokenizer
  from hps_jax.models.attention import reset_attention_stats
  from hps_jax.models.clip import CLIPConfig
  from hps_jax.models.dtypes import as_dtype
  from hps_jax.preference.scorer import Scorer
  from tests.refs import hf_clip, open_clip_resnet

  cfg = CLIPConfig.preset(args.model, attention_backend=args.attention)
  if cfg.is_resnet:
    reference = "open_clip ModifiedResNet CLIP"
    ref = open_clip_resnet(cfg, seed=0)  # random weights, shared by both sides
    flat = params_from_openai({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  else:
    reference = "transformers CLIPModel"
    ref = hf_clip(cfg, seed=0)
    flat = params_from_hf({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  tok = CLIPTokenizer.default()
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((args.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  prompts = [f"a photo of a {w} in the style of an oil painting" for w in ("cat", "dog", "car", "tree")]
  ids = None
  dev = jax.devices()[0]

  for dtype in dtypes:
    reset_attention_stats()
    model = build_model(cfg, flat, dtype=as_dtype(dtype))
    scorer = Scorer(model, tok, "pad", batch_size=args.batch, buckets=[args.batch])
    if ids is None:
      ids = scorer.tokenize([prompts[i % len(prompts)] for i in range(args.batch)])

    def run_jax(scorer=scorer, ids=ids):
      return scorer.cosine_arrays(pixels, ids)  # returns host numpy: includes the device sync

    for _ in range(max(args.warmup, 1)):  # the first call compiles
      jax_cos = run_jax()
    jax_times = timed(run_jax, args.iters)
    jstep = statistics.median(jax_times)
    flops = xla_flops(jax.jit(cosine_fn(model)), nnx.split(model)[1], pixels, ids)
    peak = peak_flops(dev, dtype)

    result = {
      "bench": "score",
      "model": args.model,
      "image_size": cfg.image_size,
      "reference": None if args.no_torch else reference,
      "device": device_name(),
      "backend": jax.default_backend(),
      "batch": args.batch,
      "dtype": dtype,
      "attention": args.attention,
      "attention_impls": attention_impls(),
      "iters": args.iters,
      "jax_version": jax.__version__,
      "jax_s_per_batch": jstep,
      "jax_images_per_s": args.batch / jstep,
      "step_flops": flops,
      "peak_flops": peak,
      "mfu": mfu(flops, jstep, peak),
    }
    del scorer, model
    if not args.no_torch:
      tdev = "cuda" if torch.cuda.is_available() else "cpu"
      tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
      tref = (copy.deepcopy(ref) if len(dtypes) > 1 else ref).to(tdev, dtype=tdtype).eval()
      tp = torch.from_numpy(pixels.transpose(0, 3, 1, 2)).to(tdev, tdtype)
      ti = torch.from_numpy(ids).long().to(tdev)

      def run_torch(tref=tref, tp=tp, ti=ti):
        with torch.inference_mode():
          if cfg.is_resnet:
            img, txt = tref.encode_image(tp), tref.encode_text(ti)
          else:
            out = tref(input_ids=ti, pixel_values=tp)
            img, txt = out.image_embeds, out.text_embeds
          cos = torch.nn.functional.cosine_similarity(img.float(), txt.float())
          return cos.cpu().numpy()

      for _ in range(args.warmup):
        torch_cos = run_torch()
      torch_times = timed(run_torch, args.iters)
      torch_cos = run_torch() if not args.warmup else torch_cos
      result.update(
        {
          "torch_device": tdev,
          "torch_version": torch.__version__,
          "torch_threads": torch.get_num_threads(),
          "torch_images_per_s": args.batch / statistics.median(torch_times),
          "max_abs_diff_hps": float(np.abs(100 * jax_cos - 100 * torch_cos).max()),
        }
      )
      result["ratio_jax_over_torch"] = result["jax_images_per_s"] / result["torch_images_per_s"]
      del tref, tp, ti
      if tdev == "cuda":
        torch.cuda.empty_cache()
    emit(result, args.out.replace("{dtype}", SHORT[dtype]) if args.out else None)


if __name__ == "__main__":
  main()
