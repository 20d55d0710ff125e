"""End-to-end scoring throughput from JPEG files on disk: `Scorer.iter_scores` (decode workers + prefetch overlapped
with the model) against its two bounds, measured in the same run on the same machine:

- decode-only: the same stream with the same workers and a model that does nothing (decode + preprocess + the
  pipeline's own costs);
- compute-only: the model on ready arrays (`cosine_arrays`, the device synchronized);
- bound: 1 / (1/decode + 1/compute), the rate if decoding and the model took turns on the same cores, with no
  other waste. On an accelerator the pipeline can exceed it (decode and model run on different hardware, up to
  min(decode, compute)); on a CPU, where both share the cores, it is the ceiling.

Also the sequential loop the pipeline replaced (decode a chunk on threads, then compute it, in turn), for reference.
N JPEGs of --size px (smooth random content with noise, quality 90: a few tens of KB, like generated images) are
written to a temporary folder. Full-size architecture with random weights (throughput does not depend on weight
values). Every e2e / decode figure includes the start of its worker pool, as a user's run does. Median of --iters
runs. Prints one JSON line; --out also writes it.

  python -m bench.score_e2e --model micro --n 512 --workers 1,2 --worker-type thread \
      --out bench/results/score_e2e_cpu_micro.json
  python -m bench.score_e2e --model tiny --n 512 --workers 1,2 --worker-type thread,process \
      --out bench/results/score_e2e_cpu_tiny.json
  python -m bench.score_e2e --model vit_b32 --n 128 --workers 2 --worker-type thread,process \
      --out bench/results/score_e2e_cpu_vit_b32.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import device_name, emit, timed

PROMPTS = [f"a photo of a {w} in the style of an oil painting" for w in ("cat", "dog", "car", "tree")]


def write_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
  """`n` JPEGs of size x size: a bicubic-upscaled 12 x 12 random image (smooth colour regions) plus noise."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    low = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    arr = np.asarray(low, np.int16) + rng.normal(0, 10, (size, size, 3)).astype(np.int16)
    path = folder / f"{i:05d}.jpg"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    paths.append(str(path))
  return paths


def load_avg() -> float | None:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def _micro():
  from hps_jax.models.clip import CLIPConfig

  return CLIPConfig.tiny(
    vision_layers=1, text_layers=1, vision_width=64, text_width=64, vision_heads=1, text_heads=1,
    vision_mlp_dim=256, text_mlp_dim=256,
  )  # fmt: skip


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument(
    "--model",
    default="tiny",
    choices=["micro", "tiny", "vit_b32", "vit_l14"],
    help="micro: one 64-wide layer per tower (decode-bound: the model's share of the cores is negligible); tiny: "
    "CLIPConfig.tiny (its 77-token text tower still takes about a quarter of a 2-core CPU)",
  )
  ap.add_argument("--workers", default="2", help="decode worker counts to measure, comma-separated (e.g. 1,2)")
  ap.add_argument("--worker-type", default="thread", help="thread, process or auto, comma-separated (each measured)")
  ap.add_argument("--n", type=int, default=512, help="images per run (a multiple of --batch)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--size", type=int, default=512, help="JPEG width and height")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--no-sequential", action="store_true", help="skip the sequential (pre-pipeline) reference loop")
  ap.add_argument("--out", help="also write the JSON result here")
  args = ap.parse_args(argv)
  workers = [int(w) for w in args.workers.split(",")]
  types = args.worker_type.split(",")
  if args.n % args.batch:
    ap.error("--n must be a multiple of --batch (one compiled bucket)")

  import jax
  from flax import nnx

  from hps_jax.data.tokenizer import CLIPTokenizer
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.models.dtypes import as_dtype
  from hps_jax.preference import scorer as scorer_mod
  from hps_jax.preference.scorer import Scorer

  MICRO = _micro()
  load_start = load_avg()
  cfg = MICRO if args.model == "micro" else CLIPConfig.preset(args.model)
  dtype = as_dtype(args.dtype)
  model = CLIP(cfg, dtype=dtype, param_dtype=jax.numpy.float32, rngs=nnx.Rngs(0))
  scorer = Scorer(model, CLIPTokenizer.default(), "pad", batch_size=args.batch, buckets=[args.batch])
  del model

  with tempfile.TemporaryDirectory(prefix="hps_e2e_") as tmp:
    paths = write_jpegs(Path(tmp), args.n, args.size)
    jpeg_kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
    items = [(p, PROMPTS[i % len(PROMPTS)]) for i, p in enumerate(paths)]

    # compute-only: the model on ready arrays (the same pixels the stream produces)
    pixels = scorer.prepare_images(paths[: args.batch])
    ids = scorer.tokenize([p for _, p in items[: args.batch]])
    reference = scorer.cosine_arrays(pixels, ids)  # compiles
    compute = args.batch / statistics.median(timed(lambda: scorer.cosine_arrays(pixels, ids), max(3, args.iters)))

    def e2e():
      rows = list(scorer.iter_scores(items))
      assert len(rows) == args.n and all("hps" in r for r in rows), "every image should score"
      return rows

    def decode_only(w, t):
      zeros = lambda pixels, extras: np.zeros(len(pixels), np.float32)  # noqa: E731
      for _ in scorer_mod._stream(items, args.batch, scorer.preprocess, w, zeros, worker_type=t):
        pass

    runs = []
    for t in types:
      for w in workers:
        scorer.workers, scorer.worker_type = w, t
        rows = e2e()  # warm-up (the first run also loads modules in the workers' parent)
        cos = np.array([r["cosine"] for r in rows[: args.batch]])
        e2e_s = timed(e2e, args.iters)
        dec_s = timed(lambda w=w, t=t: decode_only(w, t), args.iters)
        e2e_rate, dec_rate = args.n / statistics.median(e2e_s), args.n / statistics.median(dec_s)
        bound = 1 / (1 / dec_rate + 1 / compute)
        runs.append(
          {
            "worker_type": t,
            "workers": w,
            "e2e_images_per_s": e2e_rate,
            "decode_images_per_s": dec_rate,
            "bound_images_per_s": bound,
            "e2e_over_bound": e2e_rate / bound,
            "e2e_over_decode": e2e_rate / dec_rate,
            "e2e_runs_s": e2e_s,
            "decode_runs_s": dec_s,
            "max_abs_diff_cosine_vs_arrays": float(np.abs(cos - reference).max()),
          }
        )

    sequential = None
    if not args.no_sequential:  # the loop before the pipeline: decode a chunk on threads, then compute it

      def seq():
        for start in range(0, args.n, args.batch):
          chunk = items[start : start + args.batch]
          px = scorer.prepare_images([p for p, _ in chunk])
          scorer.cosine_arrays(px, scorer.tokenize([q for _, q in chunk]))

      scorer.workers = max(workers)
      seq()
      sequential = args.n / statistics.median(timed(seq, args.iters))

  speedup = {}
  for t in types:
    rates = {r["workers"]: r["e2e_images_per_s"] for r in runs if r["worker_type"] == t}
    if 1 in rates and len(rates) > 1:
      speedup[t] = {f"{w}_over_1": rates[w] / rates[1] for w in rates if w != 1}
  result = {
    "bench": "score_e2e",
    "model": args.model,
    "image_size": cfg.image_size,
    "device": device_name(),
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "dtype": args.dtype,
    "batch": args.batch,
    "n_images": args.n,
    "jpeg": f"{args.size}x{args.size} quality 90, {jpeg_kb:.0f} KB mean",
    "iters": args.iters,
    "jax_version": jax.__version__,
    "compute_images_per_s": compute,
    "sequential_images_per_s": sequential,
    "sequential_workers": max(workers) if sequential else None,
    "runs": runs,
    "e2e_speedup": speedup,
    "load_avg_1m_start": load_start,
    "load_avg_1m_end": load_avg(),
    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  emit(result, args.out)


if __name__ == "__main__":
  main()
