"""`hps-jax` command line: one entry point, one subcommand per job.

Exit codes: 0 success; 1 the run finished but some inputs were skipped (each named in the summary);
2 bad usage or an unreadable checkpoint/config (a one-line error, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

EXIT_SKIPPED = 1
EXIT_USAGE = 2


class UsageError(Exception):
  """An error in what the user asked for; printed as one line."""


# ------------------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------------------
class Skips:
  """Counts and names every input that was skipped, for the end-of-run summary."""

  def __init__(self):
    self.items: list[tuple[str, str]] = []

  def add(self, what: str, why: str):
    self.items.append((what, why))

  def report(self, done: int, noun: str = "images", stream=None) -> int:
    stream = stream or sys.stderr  # looked up at call time (redirections after import are honoured)
    print(f"done: {done} {noun} processed, {len(self.items)} skipped", file=stream)
    for what, why in self.items:
      print(f"  skipped {what}: {why}", file=stream)
    return EXIT_SKIPPED if self.items else 0


def read_pairs(path: str, skips: Skips) -> Iterator[tuple[str, str]]:
  """Reads a JSONL of {"image": PATH, "prompt": TEXT} rows; relative image paths are relative to the file."""
  from hps_jax.data.pairs import read_image_rows

  try:
    yield from read_image_rows(path, skips.add, require_prompt=True)
  except ValueError as e:
    raise UsageError(f"cannot read pairs file {path}: {e.__cause__ or e}") from e


def open_output(path: str | None):
  if path is None or path == "-":
    return sys.stdout
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  return open(path, "w", encoding="utf-8")


def progress(total: int | None, desc: str, unit: str = "img"):
  from tqdm import tqdm

  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


# ------------------------------------------------------------------------------------------------------------
# score
# ------------------------------------------------------------------------------------------------------------
def add_score(sub):
  p = sub.add_parser(
    "score",
    help="HPS of images against prompts (JSONL out)",
    description="Scores images with a preference model: hps = 100 * cos(image, prompt). Scores only "
    "compare images of the same prompt.",
  )
  p.add_argument("--checkpoint", required=True, help="HF CLIPModel dir, hpc.pt (HPS v1), HPS_v2*.pt, or safetensors")
  p.add_argument("--format", default="auto", choices=["auto", "hf", "openai", "open_clip"])
  p.add_argument("--activation", choices=["quick_gelu", "gelu"], help="override the inferred MLP activation")
  p.add_argument("--tokenizer", help="CLIP BPE file (bpe_simple_vocab_16e6.txt.gz) or HF tokenizer dir")
  p.add_argument(
    "--preprocess",
    default="pad",
    choices=["pad", "clip"],
    help="pad: longest edge to the input size + zero pad (the paper); clip: resize + center crop",
  )
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--output", help="JSONL file (default: stdout)")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompt", help="one prompt for all IMAGES")
  g.add_argument("--pairs", help='JSONL with {"image": PATH, "prompt": TEXT} per line')
  p.add_argument("images", nargs="*", help="image files (with --prompt)")
  p.set_defaults(run=run_score)


def run_score(args) -> int:
  if args.prompt is not None and not args.images:
    raise UsageError("--prompt needs at least one IMAGE")
  if args.pairs is not None and args.images:
    raise UsageError("give images either on the command line (with --prompt) or in --pairs, not both")
  if args.batch_size < 1:
    raise UsageError("--batch-size must be >= 1")
  from hps_jax.preference.scorer import Scorer

  skips = Skips()
  if args.pairs is not None:
    items = list(read_pairs(args.pairs, skips))
  else:
    items = [(img, args.prompt) for img in args.images]
  scorer = Scorer.from_checkpoint(
    args.checkpoint,
    args.format,
    args.preprocess,
    args.dtype,
    tokenizer=args.tokenizer,
    activation=args.activation,
    batch_size=args.batch_size,
  )
  return write_rows(scorer.iter_scores(items), len(items), args.output, "scoring", skips)


def write_rows(rows, total: int, output: str | None, desc: str, skips: Skips) -> int:
  """Writes result rows as JSONL with a progress bar; rows with an 'error' go to the skip summary instead."""
  done = 0
  out = open_output(output)
  try:
    with progress(total, desc) as bar:
      for row in rows:
        bar.update(1)
        if "error" in row:
          skips.add(row["image"], row["error"])
          continue
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        done += 1
  finally:
    if out is not sys.stdout:
      out.close()
  return skips.report(done)


# ------------------------------------------------------------------------------------------------------------
# aesthetic
# ------------------------------------------------------------------------------------------------------------
def add_aesthetic(sub):
  p = sub.add_parser("aesthetic", help="LAION aesthetic score of images (JSONL out)")
  p.add_argument("--mlp", required=True, help="sac+logos+ava1-l14-linearMSE.pth or ava+logos-l14-reluMSE.pth")
  p.add_argument("--clip-checkpoint", required=True, help="CLIP ViT-L/14 (OpenAI) checkpoint in any supported format")
  p.add_argument("--clip-format", default="auto", choices=["auto", "hf", "openai", "open_clip"])
  p.add_argument("--preprocess", default="clip", choices=["pad", "clip"])
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--output")
  p.add_argument("images", nargs="+")
  p.set_defaults(run=run_aesthetic)


def run_aesthetic(args) -> int:
  from hps_jax.preference.scorer import AestheticScorer

  scorer = AestheticScorer.from_checkpoint(
    args.mlp, args.clip_checkpoint, args.clip_format, preprocess=args.preprocess, batch_size=args.batch_size
  )
  return write_rows(scorer.iter_scores(args.images), len(args.images), args.output, "aesthetic", Skips())


# ------------------------------------------------------------------------------------------------------------
# train-preference
# ------------------------------------------------------------------------------------------------------------
def add_train_preference(sub):
  p = sub.add_parser(
    "train-preference",
    help="train the preference classifier (HPS) from a config",
    description="Trains CLIP on human choices (n-way choice loss). Every hyperparameter is in the "
    "config; override any with --config.KEY=VALUE (e.g. --config.optim.lr=3e-5). "
    "Re-running with the same --workdir resumes from its last checkpoint.",
  )
  p.add_argument("--config", required=True, help="configs/hps_classifier.py:tiny or :paper")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/, export/ go here")
  p.add_argument(
    "--dry-run", action="store_true", help="print the trainable / frozen parameter counts and the config, then exit"
  )
  p.set_defaults(run=run_train_preference, accepts_config_overrides=True)


def load_config(spec: str, overrides: list[str]):
  """An ml_collections config from 'path.py[:arg]' with --config.key=value overrides (absl flag syntax)."""
  from absl import flags
  from ml_collections import config_flags

  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise UsageError(f"unrecognized arguments: {' '.join(bad)}")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True)
  argv = ["hps-jax", f"--config={spec}", *overrides]
  # ml_collections registers the --config.KEY override flags by scanning sys.argv: make it the argv parsed here
  # (a call from Python, the demo or a notebook, has other arguments in sys.argv or none)
  saved, sys.argv = sys.argv, argv
  try:
    fv(argv)
  except (flags.Error, KeyError, ValueError, AttributeError, OSError, TypeError) as e:
    raise UsageError(f"config {spec}: {e}") from e
  finally:
    sys.argv = saved
  return fv.config


def run_train_preference(args) -> int:
  import json as _json

  from hps_jax.preference.train import describe_counts, parameter_counts, run

  config = load_config(args.config, args.overrides)
  if args.dry_run:
    print(describe_counts(parameter_counts(config)))
    print(config)
    return 0
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    result = run(config, workdir)
  except ValueError as e:
    raise UsageError(str(e)) from e
  import jax

  if jax.process_index() == 0:  # one writer in a multi-process run
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  summary = {
    "status": result.status,
    "step": result.step,
    "trainable_params": result.trainable_params,
    "frozen_params": result.frozen_params,
    "eval": result.eval,
    "export": result.export_path,
  }
  print(_json.dumps(summary))
  return 0 if result.status == "done" else 3


# ------------------------------------------------------------------------------------------------------------
# eval-preference
# ------------------------------------------------------------------------------------------------------------
def add_eval_preference(sub):
  p = sub.add_parser(
    "eval-preference",
    help="preference accuracy of a scorer on a dataset (the paper's Table 2)",
    description="For every prompt, scores its images and checks whether the human-chosen one scores "
    "highest (n-way accuracy); also the random-guess expectation, pairwise accuracy and a "
    "per-n breakdown. Writes JSON and a markdown table.",
  )
  who = p.add_mutually_exclusive_group(required=True)
  who.add_argument("--checkpoint", help="an HPS / CLIP checkpoint (any supported format): HPS = cos(image, prompt)")
  who.add_argument("--aesthetic", metavar="MLP", help="the LAION aesthetic head (needs --clip-checkpoint)")
  who.add_argument("--random", action="store_true", help="uniform random scores (the chance baseline)")
  p.add_argument("--clip-checkpoint", help="CLIP ViT-L/14 for --aesthetic")
  p.add_argument("--format", default="auto", choices=["auto", "hf", "openai", "open_clip"])
  p.add_argument("--tokenizer")
  p.add_argument("--dataset", required=True, help="synthetic, hpd_v1, hpd_v2, pickapic or preference_jsonl")
  p.add_argument("--split", default="test")
  p.add_argument("--manual-dir", default="", help="the dataset's local download (not for synthetic)")
  p.add_argument("--data-dir", default="", help="where the prepared TFDS files go (default MANUAL_DIR/tfds_prepared)")
  p.add_argument("--builder-config", default="")
  p.add_argument("--preprocess", choices=["pad", "clip"], help="default: pad for HPS, clip for aesthetic")
  p.add_argument("--max-images", type=int, default=4, help="image slots per prompt (more are truncated, chosen kept)")
  p.add_argument("--max-prompts", type=int, default=0, help="evaluate only the first N prompts (0 = all)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0, help="seeds --random and the synthetic set")
  p.add_argument("--synthetic-size", type=int, default=200)
  p.add_argument("--synthetic-image-size", type=int, default=48)
  p.add_argument("--output", help="JSON report (a .md table is written next to it)")
  p.set_defaults(run=run_eval_preference)


def run_eval_preference(args) -> int:
  from hps_jax.preference import train as tr
  from hps_jax.preference.evaluate import markdown_table, preference_report

  if args.aesthetic and not args.clip_checkpoint:
    raise UsageError("--aesthetic needs --clip-checkpoint (the CLIP ViT-L/14 whose embedding it reads)")
  if args.batch_size < 1 or args.max_images < 2:
    raise UsageError("--batch-size must be >= 1 and --max-images >= 2")
  try:
    source = tr.limit(
      tr.open_source(
        args.dataset,
        args.split,
        manual_dir=args.manual_dir,
        data_dir=args.data_dir,
        builder_config=args.builder_config,
        seed=args.seed,
        synthetic_size=args.synthetic_size,
        synthetic_image_size=args.synthetic_image_size,
      ),
      args.max_prompts,
    )
  except ValueError as e:
    raise UsageError(str(e)) from e
  score_fn, image_size, name = _eval_scorer(args)
  from hps_jax.data.pipeline import RecordTransform
  from hps_jax.data.preprocess import PreprocessConfig
  from hps_jax.preference.scorer import resolve_tokenizer

  mode = args.preprocess or ("clip" if args.aesthetic else "pad")
  tokenizer = resolve_tokenizer(args.tokenizer, args.checkpoint or args.clip_checkpoint)
  transform = RecordTransform(tokenizer, PreprocessConfig(mode=mode, size=image_size), max_images=args.max_images)
  scores, ranks = tr.slot_scores(score_fn, source, transform, args.batch_size, progress=True)
  report = preference_report(scores, ranks)
  report.update({"scorer": name, "dataset": args.dataset, "split": args.split, "preprocess": mode})
  title = f"{name} on {args.dataset}/{args.split}"
  table = markdown_table(report, title)
  print(table)
  if args.output:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
  return 0


def _eval_scorer(args):
  """-> (batch -> (B, K) scores, model input size, a name for the report)."""
  import numpy as np

  if args.random:
    rng = np.random.default_rng(args.seed)
    return (lambda batch: rng.random(batch["mask"].shape)), 32, "random"  # images are still decoded (and checked)
  from hps_jax.convert.clip import load_clip
  from hps_jax.preference import train as tr

  if args.checkpoint:
    model = load_clip(args.checkpoint, args.format)
    return tr.clip_score_fn(model, batch_size=_eval_batch(args)), model.config.image_size, f"HPS ({args.checkpoint})"
  from hps_jax.convert.aesthetic import load_aesthetic

  clip_model = load_clip(args.clip_checkpoint, args.format)
  return (
    tr.aesthetic_score_fn(clip_model, load_aesthetic(args.aesthetic), batch_size=_eval_batch(args)),
    clip_model.config.image_size,
    f"aesthetic ({Path(args.aesthetic).name})",
  )


def _eval_batch(args) -> int:
  from hps_jax import parallel

  div = parallel.batch_divisor(parallel.local_mesh())
  if args.batch_size % div:
    args.batch_size = -(-args.batch_size // div) * div  # round up to a multiple of the local devices
  return args.batch_size


# ------------------------------------------------------------------------------------------------------------
# fid / metrics
# ------------------------------------------------------------------------------------------------------------
def _add_inception_args(p):
  p.add_argument(
    "--inception-weights",
    help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity); "
    "default $HPS_JAX_INCEPTION_WEIGHTS or the torch hub cache",
  )
  p.add_argument(
    "--resize",
    default="tf1",
    choices=["tf1", "torch"],
    help="tf1: the original TF FID / torch-fidelity resize; torch: pytorch-fid's F.interpolate",
  )
  p.add_argument("--batch-size", type=int, default=50)


def add_fid(sub):
  p = sub.add_parser(
    "fid",
    help="Frechet Inception Distance between two image sets (or a set and saved stats)",
    description="FID between PATH_A and PATH_B, each a directory of images, a JSONL of "
    '{"image": PATH} rows, or (PATH_B only) a .npz of statistics (mu, sigma).',
  )
  p.add_argument("path_a")
  p.add_argument("path_b", nargs="?", help="second set or STATS.npz (omit with --save-stats to only save PATH_A's)")
  _add_inception_args(p)
  p.add_argument("--save-stats", metavar="OUT.npz", help="also save PATH_A's statistics (pytorch-fid layout)")
  p.set_defaults(run=run_fid)


def _inception(args):
  from hps_jax.convert.inception import load_inception
  from hps_jax.metrics.compute import default_inception_weights

  if args.batch_size < 1:
    raise UsageError("--batch-size must be >= 1")
  return load_inception(args.inception_weights or default_inception_weights())


def _report_skipped(skipped, done: int) -> int:
  s = Skips()
  for what, why in skipped.items:
    s.add(what, why)
  return s.report(done)


def run_fid(args) -> int:
  from hps_jax.metrics import compute

  if args.path_b is None and not args.save_stats:
    raise UsageError("give PATH_B (a second image set or a stats .npz), or --save-stats OUT.npz")
  model = _inception(args)
  skipped = compute.Skipped()
  try:
    a = compute.inception_pass(
      model,
      compute.list_images(args.path_a, skipped),
      skipped,
      resize=args.resize,
      batch_size=args.batch_size,
      desc="set A",
    )
    if a.count < 2:
      raise UsageError(f"{args.path_a}: fewer than two readable images")
    if args.save_stats:
      a.stats.save(args.save_stats)
      print(f"saved statistics of {a.count} images to {args.save_stats}", file=sys.stderr)
    result = {"path_a": args.path_a, "num_a": a.count, "resize": args.resize}
    if args.path_b is not None:
      from hps_jax.metrics.fid import frechet_distance

      mu_b, sigma_b, b = compute.reference_stats(
        args.path_b, model, skipped, resize=args.resize, batch_size=args.batch_size
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
  return _report_skipped(skipped, result["num_a"] + (result.get("num_b") or 0))


METRICS = ("fid", "is", "kid", "clip", "aesthetic", "hps")


def add_metrics(sub):
  p = sub.add_parser(
    "metrics",
    help="generator metrics of an image set: fid, is, kid, clip, aesthetic, hps",
    description="Computes the chosen metrics of one image set. fid/kid need --reference; clip and "
    'hps need prompts (a JSONL of {"image", "prompt"} rows).',
  )
  p.add_argument("--images", required=True, help="a directory of images or a JSONL of {image, prompt} rows")
  p.add_argument("--metrics", default="fid,is", help=f"comma-separated subset of {','.join(METRICS)}")
  p.add_argument("--reference", help="fid/kid reference: image directory / JSONL (or, for fid only, a stats .npz)")
  _add_inception_args(p)
  p.add_argument("--is-splits", type=int, default=10)
  p.add_argument("--kid-subsets", type=int, default=100)
  p.add_argument("--kid-subset-size", type=int, default=1000)
  p.add_argument("--clip-checkpoint", help="CLIP for the clip and aesthetic metrics (ViT-L/14 for aesthetic)")
  p.add_argument("--aesthetic-mlp", help="LAION aesthetic head (.pth)")
  p.add_argument("--checkpoint", help="HPS checkpoint for the hps metric")
  p.add_argument("--output", help="JSON file (default: stdout)")
  p.set_defaults(run=run_metrics)


def run_metrics(args) -> int:
  from hps_jax.metrics import compute

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
  skipped = compute.Skipped()
  try:
    items = compute.list_images(args.images, skipped)
    result = compute.generator_metrics(
      items,
      wanted,
      skipped,
      reference=args.reference,
      inception=_inception(args) if {"fid", "is", "kid"} & set(wanted) else None,
      resize=args.resize,
      batch_size=args.batch_size,
      is_splits=args.is_splits,
      kid_subsets=args.kid_subsets,
      kid_subset_size=args.kid_subset_size,
      clip_checkpoint=args.clip_checkpoint,
      aesthetic_mlp=args.aesthetic_mlp,
      hps_checkpoint=args.checkpoint,
    )
  except ValueError as e:
    raise UsageError(str(e)) from e
  result = {"images": args.images, **result}
  result["skipped"] = len(skipped.items)
  out = open_output(args.output)
  try:
    out.write(json.dumps(result, indent=2) + "\n")
  finally:
    if out is not sys.stdout:
      out.close()
  return _report_skipped(skipped, result.get("num_images", len(items) - len(skipped.items)))


# ------------------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------------------
def add_sample(sub):
  p = sub.add_parser(
    "sample",
    help="Stable Diffusion v1.x text-to-image (CFG with a negative prompt)",
    description="Samples a diffusers-layout Stable Diffusion dir (unet/ vae/ text_encoder/ tokenizer/ "
    "scheduler/), optionally LoRA-adapted. Writes PNGs and samples.jsonl (file, prompt, "
    "seed, settings). --ab renders base and adapted from the same seeds side by side; "
    "--best-of N keeps the highest-HPS of N candidates per image.",
  )
  p.add_argument("--model", required=True, help="diffusers-layout model dir")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompt")
  g.add_argument("--prompts", help="text file, one prompt per line")
  p.add_argument("--negative-prompt", default="", help='e.g. "Weird image." for the HPS-adapted model')
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim"])
  p.add_argument("--seed", type=int, default=0, help="image k of prompt j gets seed + j * num_images + k")
  p.add_argument("--num-images", type=int, default=1, help="images per prompt")
  p.add_argument("--height", type=int, default=512)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--lora", help="LoRA file or dir: PEFT/diffusers safetensors, kohya/A1111, or the HPS v1 release .bin")
  p.add_argument("--lora-scale", type=float, default=1.0, help="adapter strength (0 = base model)")
  p.add_argument(
    "--ab",
    action="store_true",
    help="with --lora: render base and adapted with the same seeds into "
    "OUTDIR/base and OUTDIR/adapted, and ab_grid.png (base | adapted)",
  )
  p.add_argument("--base-negative-prompt", default="", help="negative prompt of the base side in --ab (default empty)")
  p.add_argument(
    "--best-of",
    type=int,
    default=1,
    metavar="N",
    help="render N candidates per image and keep the one with the highest HPS (needs --scorer)",
  )
  p.add_argument("--scorer", help="HPS checkpoint for --best-of")
  p.add_argument("--grid", action="store_true", help="also write grid.png, a contact sheet")
  p.add_argument("--outdir", required=True)
  p.set_defaults(run=run_sample)


def _read_prompts(args) -> list[str]:
  if not args.prompts:
    return [args.prompt]
  try:
    return [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"cannot read {args.prompts}: {e}") from e


def contact_sheet(images, cols: int):
  """uint8 images (all the same size) tiled row-major into one image with `cols` columns."""
  import numpy as np

  rows = -(-len(images) // cols)
  h, w = images[0].shape[:2]
  sheet = np.zeros((rows * h, cols * w, 3), np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
  return sheet


def render(sd, jobs, cfg, negative: str, batch_size: int, bar) -> list:
  """uint8 images of (prompt, seed) jobs, in one compiled batch shape (the last chunk is padded)."""
  images = []
  for start in range(0, len(jobs), batch_size):
    chunk = jobs[start : start + batch_size]
    pad = chunk + [chunk[-1]] * (batch_size - len(chunk))
    images.extend(sd.sample([p for p, _ in pad], [s for _, s in pad], cfg, negative_prompt=negative)[: len(chunk)])
    bar.update(len(chunk))
  return images


def run_sample(args) -> int:
  from PIL import Image

  from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion
  from hps_jax.preference.scorer import as_dtype

  prompts = _read_prompts(args)
  if not prompts or min(args.num_images, args.batch_size, args.steps, args.best_of) < 1:
    raise UsageError("need at least one prompt, and --num-images, --batch-size, --steps, --best-of >= 1")
  if args.ab and not args.lora:
    raise UsageError("--ab compares the base model with its LoRA: give --lora")
  if args.best_of > 1 and not args.scorer:
    raise UsageError("--best-of ranks candidates by HPS: give --scorer CKPT")
  slots = [(p, args.seed + j * args.num_images + k, j) for j, p in enumerate(prompts) for k in range(args.num_images)]
  try:
    sd = StableDiffusion.from_pretrained(args.model, dtype=as_dtype(args.dtype))
    lora_info = sd.load_lora(args.lora, args.lora_scale) if args.lora else None
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from e
  scorer = None
  if args.best_of > 1:
    from hps_jax.preference.scorer import Scorer

    scorer = Scorer.from_checkpoint(args.scorer)
  cfg = SampleConfig(
    steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=args.height, width=args.width
  )
  out = Path(args.outdir)
  settings = {
    "model": str(args.model),
    "steps": args.steps,
    "guidance": args.guidance,
    "scheduler": args.scheduler,
    "height": args.height,
    "width": args.width,
  }
  if args.lora:
    settings.update(lora=str(args.lora), lora_format=lora_info.get("format"))
  variants = (
    [
      ("adapted", args.lora_scale, args.negative_prompt, out / "adapted"),
      ("base", 0.0, args.base_negative_prompt, out / "base"),
    ]
    if args.ab
    else [(None, args.lora_scale, args.negative_prompt, out)]
  )
  n = args.best_of
  rendered = {}
  with progress(len(slots) * n * len(variants), "sampling") as bar:
    for name, scale, negative, vdir in variants:
      if args.lora:
        sd.set_lora_scale(scale)
      vdir.mkdir(parents=True, exist_ok=True)
      # best-of: candidate c of slot i has seed  slot_seed * n + c  (n = 1: the slot's own seed)
      jobs = [(p, seed * n + c) for p, seed, _ in slots for c in range(n)]
      images = render(sd, jobs, cfg, negative, args.batch_size, bar)
      hps = None
      if scorer is not None:
        hps = scorer.score(list(images), [p for p, _ in jobs])
      kept = []
      with open(vdir / "samples.jsonl", "w", encoding="utf-8") as log:
        for i, (prompt, seed, j) in enumerate(slots):
          cand = list(range(i * n, (i + 1) * n))
          best = cand[0] if hps is None else max(cand, key=lambda c: hps[c])
          file = f"{j:04d}_{seed}.png"
          Image.fromarray(images[best]).save(vdir / file)
          row = {
            "file": file,
            "prompt": prompt,
            "seed": jobs[best][1],
            "negative_prompt": negative,
            "lora_scale": scale if args.lora else None,
            **settings,
          }
          if hps is not None:
            row["hps"] = float(hps[best])
            row["candidates"] = [{"seed": jobs[c][1], "hps": float(hps[c])} for c in cand]
          log.write(json.dumps(row) + "\n")
          kept.append(images[best])
      rendered[name] = kept
      if args.grid:
        cols = args.num_images if len(prompts) > 1 else min(len(kept), 8)
        Image.fromarray(contact_sheet(kept, cols)).save(vdir / "grid.png")
  if args.ab:
    pairs = [img for b, a in zip(rendered["base"], rendered["adapted"]) for img in (b, a)]
    Image.fromarray(contact_sheet(pairs, 2)).save(out / "ab_grid.png")
    print(f"wrote {out / 'ab_grid.png'} (left: base, right: adapted; one row per image)", file=sys.stderr)
  print(f"wrote {len(slots) * len(variants)} images and samples.jsonl to {out}", file=sys.stderr)
  return 0


# ------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------
from hps_jax.adapt.commands import add_eval_generator, add_train_lora  # noqa: E402
from hps_jax.adapt.label import add_label  # noqa: E402

COMMANDS = [
  add_score,
  add_aesthetic,
  add_train_preference,
  add_eval_preference,
  add_fid,
  add_metrics,
  add_sample,
  add_label,
  add_train_lora,
  add_eval_generator,
]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="hps-jax", description="Human Preference Score in JAX")
  sub = parser.add_subparsers(dest="command", required=True)
  for add in COMMANDS:
    add(sub)
  return parser


def _join_distributed_run():
  """`hps_jax.parallel.initialize()` when the environment may describe a multi-process run (HPS_COORDINATOR /
  HPS_NUM_PROCESSES / HPS_PROCESS_ID / HPS_DISTRIBUTED, a Slurm job, libtpu installed); otherwise JAX is not even
  imported here, so a single-process command starts as fast as before."""
  import importlib.util
  import os

  if not (
    any(
      k in os.environ
      for k in ("HPS_COORDINATOR", "HPS_NUM_PROCESSES", "HPS_PROCESS_ID", "HPS_DISTRIBUTED", "SLURM_JOB_ID")
    )
    or importlib.util.find_spec("libtpu") is not None
  ):
    return
  from hps_jax import parallel

  try:
    parallel.initialize()
  except ValueError as e:
    raise UsageError(f"cannot join the multi-process run: {e}") from e


def main(argv=None) -> int:
  from hps_jax.convert.io import CheckpointError

  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, "accepts_config_overrides", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.overrides = extra
  try:
    _join_distributed_run()
    return args.run(args)
  except (UsageError, CheckpointError, FileNotFoundError) as e:
    print(f"hps-jax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  # `python -m hps_jax.cli`: run the imported module's main, so that the subcommands living in other modules
  # (hps_jax.adapt) raise the same UsageError class that main() catches, not a copy from __main__
  from hps_jax.cli import main as _main

  sys.exit(_main())
