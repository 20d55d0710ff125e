"""HPS scoring throughput: hps_jax Scorer vs transformers' PyTorch CLIPModel, same weights, same machine, same run.

Full-size architecture (ViT-L/14 by default) with random weights: throughput does not depend on weight values.
Both sides get the same preprocessed pixels and token ids and compute 100 * cos(image, text); the timed region is
the model forward (host preprocessing excluded on both sides). Prints one JSON line; --out also writes it.

  python bench/score.py --batch 4 --iters 3                    # CPU: small batch
  python bench/score.py --batch 64 --dtype bfloat16 --out bench/results/score_h100_bf16.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def device_name(jax) -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    import os

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return getattr(d, "device_kind", d.platform)


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
  if device.platform != "gpu":
    return None
  kind = getattr(device, "device_kind", "")
  return next((v[dtype] for name, v in PEAK_FLOPS if name in kind), None)


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


def emit(result: dict, out: str | None):
  """Prints the result as one JSON line and, with --out, writes it there too."""
  line = json.dumps(result)
  print(line)
  if out:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(line + "\n")


def timed(fn, iters: int) -> list[float]:
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="vit_l14", choices=["vit_b32", "vit_l14", "vit_h14", "tiny", "small"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--no-torch", action="store_true", help="time only the JAX side")
  ap.add_argument("--out", help="also write the JSON result here")
  args = ap.parse_args(argv)

  import jax
  import torch

  from hps_jax.convert.clip import build_model, params_from_hf
  from hps_jax.data.tokenizer import CLIPTokenizer
  from hps_jax.models.clip import CLIPConfig
  from hps_jax.preference.scorer import Scorer, as_dtype
  from tests.refs import hf_clip

  cfg = CLIPConfig.preset(args.model)
  ref = hf_clip(cfg, seed=0)  # random weights, shared by both sides
  flat = params_from_hf({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  model = build_model(cfg, flat, dtype=as_dtype(args.dtype))
  del flat
  tok = CLIPTokenizer.default()
  scorer = Scorer(model, tok, "pad", batch_size=args.batch, buckets=[args.batch])

  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((args.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  prompts = [f"a photo of a {w} in the style of an oil painting" for w in ("cat", "dog", "car", "tree")]
  ids = scorer.tokenize([prompts[i % len(prompts)] for i in range(args.batch)])

  def run_jax():
    return scorer.cosine_arrays(pixels, ids)  # returns host numpy: includes the device sync

  for _ in range(args.warmup):
    jax_cos = run_jax()
  jax_times = timed(run_jax, args.iters)

  result = {
    "bench": "score",
    "model": args.model,
    "device": device_name(jax),
    "backend": jax.default_backend(),
    "batch": args.batch,
    "dtype": args.dtype,
    "iters": args.iters,
    "jax_version": jax.__version__,
    "jax_images_per_s": args.batch / statistics.median(jax_times),
  }
  if not args.no_torch:
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    ref = ref.to(tdev, dtype=tdtype).eval()
    tp = torch.from_numpy(pixels.transpose(0, 3, 1, 2)).to(tdev, tdtype)
    ti = torch.from_numpy(ids).long().to(tdev)

    def run_torch():
      with torch.inference_mode():
        out = ref(input_ids=ti, pixel_values=tp)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float())
        return cos.cpu().numpy()

    for _ in range(args.warmup):
      torch_cos = run_torch()
    torch_times = timed(run_torch, args.iters)
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
  emit(result, args.out)


if __name__ == "__main__":
  main()
