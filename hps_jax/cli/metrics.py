"""`hps-jax fid` (Frechet Inception Distance, statistics files) and `hps-jax metrics` (FID / IS / KID / CLIP score /
aesthetic / HPS of one image set); the Inception options shared with `eval-generator`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hps_jax import weights
from hps_jax.cli.common import (
  COUNT,
  Skips,
  UsageError,
  add_parser,
  add_paths_arg,
  check_output,
  report_skips,
  require_finite,
  say_wrote,
  write_json,
)
from hps_jax.convert.inception import load_inception
from hps_jax.metrics import compute
from hps_jax.metrics.fid import frechet_distance

METRICS = ("fid", "is", "kid", "clip", "aesthetic", "hps")


def add_inception_args(p, *, batch_size: int = 50) -> None:
  p.add_argument(
    "--inception-weights",
    help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity) or inception-fid (by name, from the "
    "weights cache); default $HPS_JAX_INCEPTION_WEIGHTS, the torch hub cache or the weights cache",
  )
  p.add_argument(
    "--resize",
    default="tf1",
    choices=["tf1", "torch"],
    help="tf1: the original TF FID / torch-fidelity resize; torch: pytorch-fid's F.interpolate",
  )
  p.add_argument("--batch-size", type=COUNT, default=batch_size, help="images per Inception batch")


def load_inception_arg(args):
  """The FID Inception named by --inception-weights (or found in the default places); sets
  args.inception_sha256, which saved statistics record and are checked against."""
  try:
    if args.inception_weights in weights.REGISTRY:  # by name: from the weights cache (downloaded if missing)
      path = weights.resolve(args.inception_weights)
    else:
      path = args.inception_weights or compute.default_inception_weights()
  except ValueError as e:  # the registry's one-line "download X and put it at Y" (WeightsError)
    raise UsageError(str(e)) from e
  model = load_inception(path)
  args.inception_sha256 = compute.file_sha256(path)
  return model


def add_fid(sub):
  p = add_parser(
    sub,
    "fid",
    help="Frechet Inception Distance between two image sets (or a set and saved stats)",
    description="FID between PATH_A and PATH_B, each a directory of images, a JSONL of "
    '{"image": PATH} rows, or (PATH_B only) a .npz of statistics (mu, sigma).',
  )
  p.add_argument("path_a", help="an image directory or a JSONL of {image} rows")
  p.add_argument("path_b", nargs="?", help="second set or STATS.npz (omit with --save-stats to only save PATH_A's)")
  add_inception_args(p)
  add_paths_arg(p)
  p.add_argument("--save-stats", metavar="OUT.npz", help="also save PATH_A's statistics (pytorch-fid layout)")
  p.set_defaults(run=run_fid)


def run_fid(args) -> int:
  if args.path_b is None and not args.save_stats:
    raise UsageError("give PATH_B (a second image set or a stats .npz), or --save-stats OUT.npz")
  check_output(
    args.save_stats, overwrite=True, inputs=[args.path_a, args.path_b], flag="--save-stats", formats=(".npz",)
  )
  model = load_inception_arg(args)
  skips = Skips()
  try:
    a = compute.set_statistics(
      model, args.path_a, skips, resize=args.resize, batch_size=args.batch_size, allow_outside=args.allow_outside_paths
    )
    if args.save_stats:
      meta = compute.stats_meta(resize=args.resize, inception_sha256=args.inception_sha256, num_images=a.count)
      a.stats.save(args.save_stats, meta)
      say_wrote(args.save_stats, f"the statistics of {a.count} images")
    result = {"path_a": args.path_a, "num_a": a.count, "resize": args.resize}
    if args.path_b is not None:
      mu_b, sigma_b, b = compute.reference_stats(
        args.path_b,
        model,
        skips,
        resize=args.resize,
        batch_size=args.batch_size,
        inception_sha256=args.inception_sha256,
        allow_outside=args.allow_outside_paths,
      )
      mu_a, sigma_a = a.stats.mu_sigma()
      result.update(
        {
          "path_b": args.path_b,
          "num_b": b.count if b is not None else None,
          "fid": frechet_distance(mu_a, sigma_a, mu_b, sigma_b),
        }
      )
  except ValueError as e:
    raise UsageError(str(e)) from e
  print(json.dumps(result))
  return report_skips(skips, result["num_a"] + (result.get("num_b") or 0))


def add_metrics(sub):
  p = add_parser(
    sub,
    "metrics",
    help="generator metrics of an image set: fid, is, kid, clip, aesthetic, hps",
    description="Computes the chosen metrics of one image set. fid/kid need --reference; clip and "
    'hps need prompts (a JSONL of {"image", "prompt"} rows, or the captions of --shards). The images stream '
    "through in chunks; with --output (or --work-dir) each finished chunk is kept, so a killed run continues "
    "with --resume and gives the numbers an uninterrupted run gives.",
  )
  p.add_argument("--images", help="a directory of images or a JSONL of {image, prompt} rows")
  p.add_argument(
    "--shards",
    metavar="SPEC",
    help="instead of --images: webdataset (img2dataset) tar shards, a .tar, a folder of them or a brace range "
    "'data/{00000..00099}.tar'; each sample's .txt caption is its prompt for clip / hps (a sample without one is "
    "skipped for those)",
  )
  p.add_argument("--metrics", default="fid,is", help=f"comma-separated subset of {','.join(METRICS)}")
  p.add_argument("--reference", help="fid/kid reference: image directory / JSONL (or, for fid only, a stats .npz)")
  add_inception_args(p)
  add_paths_arg(p)
  p.add_argument("--is-splits", type=COUNT, default=10, help="Inception Score splits")
  p.add_argument("--kid-subsets", type=COUNT, default=100, help="KID subsets")
  p.add_argument("--kid-subset-size", type=COUNT, default=1000, help="images per KID subset")
  p.add_argument("--clip-checkpoint", help="CLIP for the clip and aesthetic metrics (ViT-L/14 for aesthetic)")
  p.add_argument("--aesthetic-mlp", help="LAION aesthetic head (.pth)")
  p.add_argument("--checkpoint", metavar="CKPT", help="HPS checkpoint for the hps metric")
  p.add_argument("--output", help="JSON file (default: stdout)")
  p.add_argument(
    "--work-dir",
    metavar="DIR",
    help="where finished chunks are kept (one .npz of features / scores per chunk plus a fsynced JSONL log), so "
    "that --resume can continue a killed run; default OUTPUT.work next to --output (none without --output: "
    "nothing is kept). Removed once the result is written",
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue the run left in the work folder: finished chunks are read back, not recomputed (the image list, "
    "--resize, --batch-size, --chunk-size, the Inception weights and the checkpoints must be the same; exit 2 "
    "otherwise); the numbers equal an uninterrupted run's",
  )
  p.add_argument(
    "--chunk-size",
    type=COUNT,
    help="images per chunk, the unit of saved progress (a killed run redoes at most one); default 8 x --batch-size",
  )
  p.set_defaults(run=run_metrics)


def run_metrics(args) -> int:
  if (args.images is None) == (args.shards is None):
    raise UsageError("give the image set as --images PATH or --shards SPEC (one of them)")
  wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
  bad = [m for m in wanted if m not in METRICS]
  if bad or not wanted:
    raise UsageError(f"unknown metrics {bad}; choose from {','.join(METRICS)}")
  if {"fid", "kid"} & set(wanted) and not args.reference:
    raise UsageError("fid and kid need --reference")
  if "kid" in wanted and str(args.reference).endswith(".npz"):
    raise UsageError("kid needs reference images (features), not saved statistics")
  if {"clip", "aesthetic"} & set(wanted) and not args.clip_checkpoint:
    raise UsageError("clip and aesthetic need --clip-checkpoint")
  if "aesthetic" in wanted and not args.aesthetic_mlp:
    raise UsageError("aesthetic needs --aesthetic-mlp")
  if "hps" in wanted and not args.checkpoint:
    raise UsageError("hps needs --checkpoint")
  check_output(args.output, overwrite=True, inputs=[args.images, args.shards, args.reference], formats=(".json",))
  work_path = args.work_dir or (f"{args.output}.work" if args.output not in (None, "-") else None)
  if args.resume and not work_path:
    raise UsageError("--resume needs --output (its work folder is OUTPUT.work) or --work-dir DIR")
  if work_path:
    for i in (args.images, args.shards, args.reference, args.output):
      if i is not None and Path(i).resolve() == Path(work_path).resolve():
        raise UsageError(f"--work-dir {work_path} is also an input or the output: choose another folder")
    if Path(work_path).exists() and not Path(work_path).is_dir():
      raise UsageError(f"--work-dir {work_path} is a file, expected a folder")
  skips = Skips()
  report: dict = {}
  work = None
  try:
    if args.shards is not None:  # a stream: its size is known at the end (KID checks its subset size then)
      items = compute.shard_set(args.shards, skips)
    else:
      items = compute.list_images(args.images, skips, allow_outside=args.allow_outside_paths)
    if (
      "kid" in wanted and args.shards is None
    ):  # before any feature extraction: a KID subset draws that many images from each set
      n_ref = len(compute.list_images(args.reference, Skips(), allow_outside=args.allow_outside_paths))
      if args.kid_subset_size > min(len(items), n_ref):
        raise UsageError(
          f"--kid-subset-size {args.kid_subset_size} is larger than the image sets (--images: {len(items)}, "
          f"--reference: {n_ref}): pass --kid-subset-size <= {min(len(items), n_ref)}"
        )
    work = compute.WorkDir(work_path, resume=args.resume) if work_path else None
    result = compute.generator_metrics(
      items,
      wanted,
      skips,
      reference=args.reference,
      inception=load_inception_arg(args) if {"fid", "is", "kid"} & set(wanted) else None,
      resize=args.resize,
      batch_size=args.batch_size,
      is_splits=args.is_splits,
      kid_subsets=args.kid_subsets,
      kid_subset_size=args.kid_subset_size,
      clip_checkpoint=args.clip_checkpoint,
      aesthetic_mlp=args.aesthetic_mlp,
      hps_checkpoint=args.checkpoint,
      inception_sha256=getattr(args, "inception_sha256", None),
      allow_outside=args.allow_outside_paths,
      chunk_size=args.chunk_size,
      work=work,
      report=report,
    )
    result = {"images": args.images, **result} if args.shards is None else {"shards": args.shards, **result}
    result["skipped"] = len(skips.items)
    require_finite(result, "the metrics")
    if args.output:
      write_json(args.output, result)
      say_wrote(args.output, "the metrics")
    else:
      print(json.dumps(result, indent=2))
    if work is not None:
      for name, n in report.get("sets", {}).items():
        print(
          f"{name}: {n['reused']} chunks reused from {work.path}, {n['computed']} computed "
          f"({n['computed_images']} images)",
          file=sys.stderr,
        )
      work.remove()  # the result is safely written: the chunks are no longer needed
  except BaseException as e:
    if work is not None and work.created and not any(s.computed for s in work.stores):
      work.remove()  # nothing worth resuming: leave no empty work folder behind
    if isinstance(e, ValueError) and not isinstance(e, UsageError):
      raise UsageError(str(e)) from e
    raise
  finally:
    if work is not None:
      work.close()
  return report_skips(skips, result.get("num_images", report.get("num_images", 0)))
