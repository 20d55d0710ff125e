"""FID pieces: Inception feature throughput (hps_jax vs pytorch-fid, same random weights, same run) and the Fréchet
distance of 2048-d Gaussians (hps_jax's eigh form on the default JAX device vs scipy `sqrtm` on the host, as
pytorch-fid computes it).

  python -m bench.fid --batch 8 --iters 2                          # CPU
  python -m bench.fid --batch 200 --out bench/results/fid_h100.json  # on a GPU
  python -m bench.fid --batch 2 --size 64 --iters 1 --frechet-dim 64  # smoke run (keys say frechet_64_...)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench.common import device_name, emit, median_time, mfu, peak_flops, xla_flops


def random_fid_state_dict(seed: int = 0) -> dict:
  """Random weights in the pt_inception-2015-12-05 state-dict layout (the real file cannot be downloaded here);
  BatchNorm statistics are randomized too so that they are exercised."""
  import torch
  from pytorch_fid import inception as pfi

  torch.manual_seed(seed)
  net = pfi._inception_v3(num_classes=1008, aux_logits=False, init_weights=True)
  with torch.no_grad():
    for name, buf in net.named_buffers():
      if name.endswith("running_var"):
        buf.uniform_(0.5, 2.0)
      elif name.endswith("running_mean"):
        buf.normal_(0, 0.1)
  return net.state_dict()


def pytorch_fid_model(sd: dict):
  """pytorch-fid's InceptionV3 (FID blocks, resize + normalize inside) loaded with `sd` instead of the download."""
  from pytorch_fid import inception as pfi

  orig = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = lambda *a, **k: sd
  try:
    return pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
  finally:
    pfi.load_state_dict_from_url = orig


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=256, help="input image side (resized to 299 inside)")
  ap.add_argument("--iters", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--resize", default="torch", choices=["torch", "tf1"])
  ap.add_argument("--frechet-dim", type=int, default=2048, help="feature dims of the Frechet distance timing")
  ap.add_argument("--frechet-iters", type=int, help="timed Frechet distances per side (default: max(iters, 2))")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--out")
  args = ap.parse_args()

  import jax
  import torch

  from hps_jax.convert.inception import load_inception
  from hps_jax.metrics.fid import frechet_distance
  from hps_jax.metrics.inception_features import extract

  tmp = Path(tempfile.mkdtemp())
  sd = random_fid_state_dict()
  torch.save(sd, tmp / "pt_inception.pth")
  model = load_inception(tmp / "pt_inception.pth")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)

  def run_jax():
    jax.block_until_ready(extract(model, images, args.resize)["pool3"])

  for _ in range(args.warmup):
    run_jax()
  jt = median_time(run_jax, args.iters)
  result = {
    "bench": "fid",
    "device": device_name(),
    "backend": jax.devices()[0].platform,
    "batch": args.batch,
    "input_size": args.size,
    "resize": args.resize,
    "iters": args.iters,
    "jax_version": jax.__version__,
    "jax_s_per_batch": jt,
    "jax_images_per_s": args.batch / jt,
  }
  # XLA's FLOP count of the feature extraction (preprocess + network, float32) and MFU against the fp32 peak
  from flax import nnx

  graphdef, state = nnx.split(model)
  flops = xla_flops(
    jax.jit(lambda st, x: extract(nnx.merge(graphdef, st), x, args.resize)["pool3"]), state, jax.numpy.asarray(images)
  )
  peak = peak_flops(jax.devices()[0], "float32")
  result.update({"step_flops": flops, "peak_flops": peak, "mfu": mfu(flops, jt, peak)})

  if not args.no_torch:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = pytorch_fid_model(sd).to(dev)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).float().div(255).to(dev)

    def run_torch():
      with torch.no_grad():
        ref(x)
      if dev == "cuda":
        torch.cuda.synchronize()

    for _ in range(args.warmup):
      run_torch()
    tt = median_time(run_torch, args.iters)
    result.update(
      {
        "torch_device": dev,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "pytorch_fid_images_per_s": args.batch / tt,
        "ratio_jax_over_torch": tt / jt,
      }
    )

  # Fréchet distance of two d-dimensional Gaussians (d = 2048: the pool3 features)
  d = args.frechet_dim
  fiters = args.frechet_iters or max(args.iters, 2)
  a = rng.standard_normal((3 * d, d)) / np.sqrt(d)
  b = a + 0.1 * rng.standard_normal((3 * d, d)) / np.sqrt(d)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  mu1, mu2 = a.mean(0), b.mean(0)
  frechet_distance(mu1, s1, mu2, s2)  # compile
  jf = median_time(lambda: frechet_distance(mu1, s1, mu2, s2), fiters)
  result["frechet_dim"] = d
  result[f"frechet_{d}_jax_s"] = jf
  result[f"frechet_{d}_value_jax"] = frechet_distance(mu1, s1, mu2, s2)
  try:
    from pytorch_fid.fid_score import calculate_frechet_distance

    sf = median_time(lambda: calculate_frechet_distance(mu1, s1, mu2, s2), fiters)
    result[f"frechet_{d}_scipy_sqrtm_s"] = sf
    result[f"frechet_{d}_value_scipy"] = float(calculate_frechet_distance(mu1, s1, mu2, s2))
  except ImportError:
    pass
  emit(result, args.out)


if __name__ == "__main__":
  main()
