"""The Stable Diffusion adaptation commands: `hps-jax label` (HPS labelling with the alpha/n rule),
`hps-jax train-lora` (LoRA on the labelled manifest) and `hps-jax eval-generator` (Table 4, base vs adapted)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from hps_jax import parallel
from hps_jax.adapt import label as lab
from hps_jax.adapt import train_lora
from hps_jax.adapt.evaluate import GENERATOR_METRICS, markdown_table
from hps_jax.cli.common import (
  COUNT,
  LIMIT,
  Skips,
  UsageError,
  add_checkpoint_args,
  add_parser,
  add_paths_arg,
  add_training_args,
  check_outdir,
  check_output,
  check_report_output,
  progress,
  read_prompts,
  real,
  report_skips,
  run_training,
  say_wrote,
  text,
  write_report,
)
from hps_jax.cli.metrics import add_inception_args, load_inception_arg
from hps_jax.cli.sample import add_sampling_args, load_sd, sample_config
from hps_jax.cli.score import scorer_from_args
from hps_jax.data.diffusiondb import iter_record_units as read_units
from hps_jax.data.webdataset import expand_shards
from hps_jax.diffusion.render import render, save_image
from hps_jax.errors import check_stop
from hps_jax.files import JsonlAppender, write_text
from hps_jax.metrics import compute


# ------------------------------------------------------------------------------------------------------------
# label
# ------------------------------------------------------------------------------------------------------------
def add_label(sub):
  p = add_parser(
    sub,
    "label",
    help="HPS-label generated images (DiffusionDB) for the LoRA adaptation",
    description="Scores every (image, prompt) with an HPS model; per prompt keeps the best image when "
    "softmax(HPS)[best] > alpha/n and the worst symmetrically (caption prefixed 'Weird "
    "image. '); adds regularization images; writes a JSONL manifest of {image, caption, "
    "kind}. Images from zip archives are written under <manifest dir>/images/. The input is streamed; "
    "per-image scores go to MANIFEST.scores.*.partial chunk by chunk, so --resume continues a killed run. "
    "Run N processes (HPS_COORDINATOR / HPS_NUM_PROCESSES / HPS_PROCESS_ID, Slurm, TPU VM) with the "
    "manifest's folder shared: each labels its share, process 0 writes the manifest (the same bytes as one "
    "process).",
  )
  add_checkpoint_args(p, aliases=("--scorer",))
  p.add_argument("--preprocess", default="pad", choices=["pad", "clip"], help="image preprocessing (pad: the paper)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
  p.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument(
    "--images",
    help='DiffusionDB folder (part-*.zip + metadata*.parquet) or a JSONL of {"image", "prompt"} rows',
  )
  src.add_argument(
    "--shards",
    metavar="SPEC",
    help="webdataset shards (a .tar, a folder of .tar files or a brace pattern like gen/{00000..00099}.tar); the "
    "prompt of a sample is its .txt caption (the images of one prompt share it)",
  )
  p.add_argument(
    "--regularization", required=True, help="folder with metadata.jsonl, or a JSONL, of {file_name, caption} rows"
  )
  p.add_argument("--out", required=True, metavar="MANIFEST.jsonl", help="the manifest to write")
  p.add_argument(
    "--preset",
    default="paper",
    choices=sorted(lab.PRESETS),
    help="paper: the rule only; release: also drop near-constant images and prompts with < 4 images",
  )
  p.add_argument("--alpha", type=real(), help="selection factor (default: the preset's, 2.0)")
  p.add_argument(
    "--blur-threshold",
    type=LIMIT,
    help="drop images whose max horizontal neighbour difference is below this (0 = off; release: 10)",
  )
  p.add_argument("--min-images", type=LIMIT, help="drop prompts left with fewer images (0 = off; release: 4)")
  p.add_argument("--scores", metavar="SCORES.jsonl", help="also write every scored image: {image, prompt, hps, kind}")
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue an interrupted run from its score logs (MANIFEST.scores.*.partial, same settings required); "
    "without it a run starts over",
  )
  add_paths_arg(p)
  p.set_defaults(run=run_label)


def _label_config(args) -> lab.LabelConfig:
  over = {
    k: v
    for k, v in (("alpha", args.alpha), ("blur_threshold", args.blur_threshold), ("min_images", args.min_images))
    if v is not None
  }
  try:
    return dataclasses.replace(lab.PRESETS[args.preset], **over).validate()
  except ValueError as e:
    raise UsageError(str(e)) from e


def _label_batch(args) -> int:
  """--batch-size rounded up to a multiple of this process's device count (scoring is local to the process)."""
  div = parallel.batch_divisor(parallel.local_mesh())
  return -(-args.batch_size // div) * div


def _label_scorer(args, size: int):
  """The scorer with ONE compiled batch shape, `size` (every chunk padded to it), so an image's HPS is the same
  bits whatever chunk it falls in: a resumed or a multi-process run scores exactly as an uninterrupted one."""
  return scorer_from_args(args, batch_size=size, buckets=(size,))


def _identity(path) -> str | None:
  """A path as an absolute path (what a resume compares), a published model's name as given."""
  if path is None:
    return None
  return str(Path(path).resolve()) if Path(path).exists() else str(path)


class _LogFiles:
  """The files of process j's score log next to the manifest: MANIFEST.scores.J-of-N.partial (the rows, appended
  per chunk), .partial.json (the settings a resume must match), .done (its share is complete), .failed (it
  stopped on an error: the line)."""

  def __init__(self, out: Path, j: int, n: int):
    self.base = out.with_name(f"{out.name}.scores.{j}-of-{n}")
    self.partial = self.base.with_name(self.base.name + ".partial")
    self.meta = self.base.with_name(self.base.name + ".partial.json")
    self.done = self.base.with_name(self.base.name + ".done")
    self.failed = self.base.with_name(self.base.name + ".failed")

  def fail(self, e: BaseException) -> None:
    """Leaves the failed marker (the error's first line) for the processes waiting on this one."""
    with contextlib.suppress(OSError):
      write_text(self.failed, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:400] + "\n")

  def remove(self, *, markers_only: bool = False) -> None:
    for f in (self.done, self.failed) if markers_only else (self.partial, self.meta, self.done, self.failed):
      f.unlink(missing_ok=True)


def _other_process_counts(out: Path, n: int) -> list[int]:
  pattern = re.compile(re.escape(out.name) + r"\.scores\.\d+-of-(\d+)\.partial")
  files = out.parent.glob(f"{glob.escape(out.name)}.scores.*-of-*.partial")
  found = {int(m.group(1)) for f in files if (m := pattern.fullmatch(f.name))}
  return sorted(found - {n})


def _wait_for_shares(out: Path, n: int) -> None:
  """Process 0, its own share done: waits until every other process has marked its share complete (the score logs
  live in the manifest's folder, which all processes must share); one that failed ends this one with its line."""
  told = False
  while True:
    missing = []
    for j in range(1, n):
      files = _LogFiles(out, j, n)
      if files.failed.exists():
        why = files.failed.read_text(encoding="utf-8", errors="replace").strip()
        raise UsageError(f"process {j} of {n} failed, no manifest written: {why}")
      if not files.done.exists():
        missing.append(j)
    if not missing:
      return
    if not told:
      print(f"label: waiting for process(es) {missing} to finish their share", file=sys.stderr, flush=True)
      told = True
    check_stop()
    time.sleep(0.2)


def _wait_for_merge(out: Path, mine: _LogFiles, n: int) -> None:
  """Process j > 0, its share done: stays until process 0 has written the manifest (it removes every log and
  marker, this one's `.done` included), so all processes end together; a failure of process 0 ends this one too."""
  zero = _LogFiles(out, 0, n)
  while mine.done.exists():
    if zero.failed.exists():
      why = zero.failed.read_text(encoding="utf-8", errors="replace").strip()
      raise UsageError(f"process 0 of {n} failed, no manifest written: {why}")
    check_stop()
    time.sleep(0.2)


def _label_units(args):
  """-> (units(skip): a fresh stream of the input's record units, whether records are shared by index, the shards
  or None)."""
  if args.shards:
    shards = expand_shards(args.shards)
    return lambda skip: lab.shard_units(shards, skip), False, shards
  images = args.images
  units = lambda skip: read_units(images, skip, allow_outside=args.allow_outside_paths)  # noqa: E731
  return units, not Path(images).is_dir(), None


def run_label(args) -> int:
  """Streams this process's share of the input through the scorer into its score log (resumable), then process 0
  merges every log into the manifest (lab: the streaming section)."""
  config = _label_config(args)
  check_output(
    args.out,
    overwrite=True,
    inputs=[args.images or args.shards, args.regularization, args.scores],
    flag="--out",
    formats=(".jsonl",),
  )
  check_output(
    args.scores,
    overwrite=True,
    inputs=[args.images or args.shards, args.regularization, args.out],
    flag="--scores",
    formats=(".jsonl",),
  )
  # one process unless this one joined a multi-process run (main did that); a lone run touches no device yet
  pid, nproc = (jax.process_index(), jax.process_count()) if jax.distributed.is_initialized() else (0, 1)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  mine = _LogFiles(out, pid, nproc)
  mine.remove(markers_only=True)  # a marker of an earlier run must not be taken for this one's
  if nproc > 1:
    multihost_utils.sync_global_devices("hps-jax label: start")  # every stale marker is gone
  try:  # a process that stops tells process 0 (which waits for every share) why
    if args.resume and (other := _other_process_counts(out, nproc)):
      raise UsageError(
        f"{out}: cannot resume, its partial score logs were written by {other[0]} process(es) and this run has {nproc}: "
        f"resume with {other[0]}, or rerun without --resume to start over"
      )
    skips = Skips()
    try:
      units, by_index, shards = _label_units(args)
      survey = lab.survey(units(skips.add), by_index=by_index)
      regularization = (
        lab.read_regularization(args.regularization, skips.add, allow_outside=args.allow_outside_paths)
        if pid == 0
        else []
      )
    except ValueError as e:
      raise UsageError(str(e)) from e
    if not survey.images:
      raise UsageError(f"{args.images or args.shards}: no (image, prompt) records to label")
    batch = _label_batch(args)
    settings = {
      "images": _identity(args.images) if args.images else [_identity(s) for s in shards],
      "listing": survey.digest,
      "checkpoint": _identity(args.checkpoint),
      "format": args.format,
      "tokenizer": _identity(args.tokenizer),
      "activation": args.activation,
      "preprocess": args.preprocess,
      "dtype": args.dtype,
      "batch_size": batch,
      "label": dataclasses.asdict(config),
      "process": f"{pid}-of-{nproc}",
    }
    share = survey.share_size(config, pid, nproc)
    with JsonlAppender(mine.base, settings, resume=args.resume) as log:
      done = {row.get("i") for row in log.rows}
      log.rows.clear()
      if len(done) > share:
        raise UsageError(f"{mine.partial}: cannot resume, it holds {len(done)} rows for a share of {share} images")
      scorer = _label_scorer(args, batch)  # after the settings check: a refused resume loads no weights
      if args.resume:
        print(f"resumed: {len(done)} scored, {share - len(done)} to go", file=sys.stderr, flush=True)
      todo = lab.share(units(lambda *_: None), survey, config, pid, nproc, done)
      with progress(share - len(done), "labelling") as bar:
        for rows in lab.label_chunks(todo, scorer, config, args.batch_size):
          log.write(rows)
          bar.update(len(rows))
      labelled = log.rows_written
    write_text(mine.done, json.dumps({"rows": len(done) + labelled}) + "\n")
  except BaseException as e:
    if nproc > 1:
      mine.fail(e)
    raise
  if pid != 0:
    print(f"label: process {pid} of {nproc} scored its share; process 0 writes the manifest", file=sys.stderr)
    _wait_for_merge(out, mine, nproc)
    print(json.dumps({"process": pid, "processes": nproc, "share": share, "resumed": len(done), "labelled": labelled}))
    return 0
  try:
    _wait_for_shares(out, nproc)
    logs = [_LogFiles(out, j, nproc) for j in range(nproc)]
    merged = lab.merge_logs([f.partial for f in logs])
    candidates = survey.share_size(config)
    if sum(merged.rows) != candidates:
      raise UsageError(
        f"{out}: the score logs hold {sum(merged.rows)} rows, expected {candidates}: rerun without --resume"
      )
    for where, why in merged.skipped:
      skips.add(where, why)
    selections, stats = lab.select_by_prompt(merged.scored, config)
    read = lab.ShardReader() if shards else None
    selections, paths = lab.extract_selected(merged.records, selections, out.parent, skips, read=read)
    rows = lab.manifest_rows(selections, paths.__getitem__, config.negative_prefix)
    rows += lab.check_regularization(regularization, skips, scorer.workers, progress)
    lab.write_manifest(rows, out)
    if args.scores:
      lab.write_scores(args.scores, merged.scored, merged.records, selections)
    for f in logs:
      f.remove()
  except BaseException as e:
    if nproc > 1:
      mine.fail(e)
    raise
  kinds = Counter(row["kind"] for row in rows)
  summary = {
    "manifest": str(out),
    "counts": {k: kinds[k] for k in lab.KINDS},
    "config": {"preset": args.preset, **dataclasses.asdict(config)},
    "images": survey.images,
    "scored": len(merged.scored),
    "blurry": merged.blurry,
    "skipped": len(skips.items),
    "prompts": len(survey.counts),
    "prompts_selected": len(selections),
    "prompts_not_scored": sum(1 for n in survey.counts if not lab.selectable(n, config)),
    "prompts_too_few_after_drops": stats["prompts_below_min_images"] + stats["prompts_n_le_alpha"],
    "processes": nproc,
    "shares": merged.rows,
    "resumed": len(done),
    "labelled": labelled,
  }
  print(json.dumps(summary))
  say_wrote(out, f"{len(rows)} manifest rows")
  return report_skips(skips, len(merged.scored))


# ------------------------------------------------------------------------------------------------------------
# train-lora
# ------------------------------------------------------------------------------------------------------------
def add_train_lora(sub):
  p = add_parser(
    sub,
    "train-lora",
    help="LoRA-adapt Stable Diffusion on an HPS-labelled manifest",
    description="Trains LoRA adapters on the UNet's attention projections with the DDPM loss; VAE, "
    "text encoder and base weights stay frozen. Every hyperparameter is in the config; "
    "override any with --config.KEY=VALUE. Re-running with the same --workdir resumes. "
    "The adapter is exported to WORKDIR/export/pytorch_lora_weights.safetensors.",
  )
  add_training_args(
    p,
    config_example="lora_sd14:tiny or lora_sd14:paper",
    dry_run_help="print the adapter parameter count and the config, then exit",
  )
  p.set_defaults(run=run_train_lora)


def run_train_lora(args) -> int:
  return run_training(
    args, train_lora.run, lambda config, workdir: json.dumps(train_lora.adapter_counts(config, workdir))
  )


# ------------------------------------------------------------------------------------------------------------
# eval-generator: the paper's Table 4 (FID, aesthetic, CLIP score, HPS) for the base and the adapted model
# ------------------------------------------------------------------------------------------------------------
def add_eval_generator(sub):
  p = add_parser(
    sub,
    "eval-generator",
    help="Table 4: FID, aesthetic, CLIP score, HPS of base vs LoRA-adapted SD",
    description="Renders every prompt with the base model and, with --lora, the adapted one (same "
    "seeds; the adapted side uses --negative-prompt, 'Weird image.' by default), then "
    "computes the metrics of each image set. Writes the JSON (--output) and a markdown "
    "table next to it (.md); the images stay in --outdir.",
  )
  add_sampling_args(p, batch_flag="--sample-batch-size")
  p.add_argument("--prompts", required=True, help="text file, one prompt per line")
  p.add_argument(
    "--reference",
    "--reference-stats",
    dest="reference",
    help="FID reference: statistics .npz (`hps-jax fid --save-stats`) or an image directory / JSONL",
  )
  p.add_argument(
    "--metrics",
    default=",".join(GENERATOR_METRICS),
    help=f"comma-separated subset of {','.join(GENERATOR_METRICS)}",
  )
  p.add_argument("--clip-checkpoint", help="CLIP for the CLIP score and the aesthetic head (ViT-L/14)")
  p.add_argument("--aesthetic-mlp", help="LAION aesthetic head (.pth / .safetensors)")
  p.add_argument(
    "--checkpoint", "--hps-checkpoint", dest="checkpoint", metavar="CKPT", help="HPS checkpoint (hpc.pt, HF dir, ...)"
  )
  p.add_argument("--negative-prompt", type=text, default="Weird image.", help="negative prompt of the adapted model")
  p.add_argument("--base-negative-prompt", type=text, default="", help="negative prompt of the base model")
  add_inception_args(p)
  p.add_argument("--outdir", help="where the rendered images go (default: OUTPUT's name without suffix + _images)")
  p.add_argument("--output", required=True, metavar="FILE.json", help="the JSON results (a .md table goes next to it)")
  p.set_defaults(run=run_eval_generator)


def run_eval_generator(args) -> int:
  wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
  bad = [m for m in wanted if m not in GENERATOR_METRICS]
  if bad or not wanted:
    raise UsageError(f"unknown metrics {bad}; choose from {','.join(GENERATOR_METRICS)}")
  needs = {
    "fid": ("--reference", args.reference),
    "clip": ("--clip-checkpoint", args.clip_checkpoint),
    "aesthetic": ("--aesthetic-mlp and --clip-checkpoint", args.aesthetic_mlp and args.clip_checkpoint),
    "hps": ("--checkpoint", args.checkpoint),
  }
  for m in wanted:
    if not needs[m][1]:
      raise UsageError(f"the {m} metric needs {needs[m][0]} (or leave it out of --metrics)")
  prompts = read_prompts(None, args.prompts)
  if not prompts:
    raise UsageError(f"{args.prompts}: no prompts")
  check_report_output(args.output, inputs=[args.prompts, args.reference])
  output = Path(args.output)
  outdir = check_outdir(args.outdir or str(output.with_name(output.stem + "_images")))
  sd, _ = load_sd(args)
  cfg = sample_config(args, sd)
  jobs = [(p, args.seed + j * args.num_images + k) for j, p in enumerate(prompts) for k in range(args.num_images)]
  variants = [("base", 0.0, args.base_negative_prompt)]
  if args.lora:
    variants.append(("adapted", args.lora_scale, args.negative_prompt))
  inception = load_inception_arg(args) if "fid" in wanted else None
  results, all_skips = {}, Skips()
  sets = {}
  with progress(len(jobs) * len(variants), "sampling") as bar:
    for name, scale, negative in variants:
      if args.lora:
        sd.set_lora_scale(scale)
      images = render(sd, jobs, cfg, negative, args.sample_batch_size, bar.update)
      d = outdir / name
      d.mkdir(parents=True, exist_ok=True)
      with open(d / "images.jsonl", "w", encoding="utf-8") as f:
        for i, ((prompt, seed), img) in enumerate(zip(jobs, images)):
          save_image(img, d / f"{i:05d}_{seed}.png")
          row = {"image": f"{i:05d}_{seed}.png", "prompt": prompt, "seed": seed, "negative_prompt": negative}
          f.write(json.dumps(row) + "\n")
      sets[name] = d / "images.jsonl"
  for name, jsonl in sets.items():
    skips = Skips()
    try:
      items = compute.list_images(jsonl, skips)
      results[name] = compute.generator_metrics(
        items,
        wanted,
        skips,
        reference=args.reference,
        inception=inception,
        resize=args.resize,
        batch_size=args.batch_size,
        clip_checkpoint=args.clip_checkpoint,
        aesthetic_mlp=args.aesthetic_mlp,
        hps_checkpoint=args.checkpoint,
        inception_sha256=getattr(args, "inception_sha256", None),
      )
    except ValueError as e:
      raise UsageError(str(e)) from e
    results[name]["num_generated"] = len(items)
    results[name]["skipped"] = len(skips.items)
    all_skips.extend(skips, prefix=f"{name}: ")
  summary = {
    "results": results,
    "settings": {
      "model": str(args.model),
      "lora": args.lora,
      "lora_scale": args.lora_scale,
      "prompts": str(args.prompts),
      "num_prompts": len(prompts),
      "num_images": args.num_images,
      "steps": args.steps,
      "guidance": args.guidance,
      "scheduler": args.scheduler,
      "seed": args.seed,
      "height": args.height,
      "width": args.width,
      "negative_prompt": args.negative_prompt,
      "base_negative_prompt": args.base_negative_prompt,
      "reference_stats": args.reference,
      "clip_checkpoint": args.clip_checkpoint if {"clip", "aesthetic"} & set(wanted) else None,
      "aesthetic_mlp": args.aesthetic_mlp if "aesthetic" in wanted else None,
      "hps_checkpoint": args.checkpoint if "hps" in wanted else None,
      "inception_weights": args.inception_weights if "fid" in wanted else None,
      "resize": args.resize if "fid" in wanted else None,
      "metrics": wanted,
      "images": str(outdir),
    },
  }
  table = markdown_table(results, summary["settings"])
  write_report(output, summary, table, f"the results (images in {outdir})")
  print(table, end="")
  return report_skips(all_skips, len(jobs) * len(variants))
