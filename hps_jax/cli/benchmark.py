"""`hps-jax benchmark`: a generator leaderboard on a published prompt set (HPSv2's 4 styles x 800 prompts,
ImageReward's 100 prompts x 10 images) or any JSONL of images, with one or more scorers run from ONE decoding pass
per image (`hps_jax.metrics.multiscore`). The output states the protocol, each scorer's checkpoint,
preprocessing and scale, so a number can be compared with a published one for what it is.

Also home of the scorer options other commands share: `add_scorer_args(parser)` (--checkpoint NAME=CKPT,
--aesthetic NAME=MLP, --clip-checkpoint, --preprocess NAME=MODE, --batch-size, --dtype) and
`scorers_from_args(args)` / `specs_from_args(args)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hps_jax import files
from hps_jax.cli.common import (
  COUNT,
  SEED,
  UsageError,
  add_parser,
  add_paths_arg,
  check_outdir,
  named_specs,
  progress,
  real,
  require_finite,
  say_wrote,
  write_json,
)
from hps_jax.data.images import describe
from hps_jax.metrics import benchmark as bm
from hps_jax.metrics.multiscore import MultiScorer, ScorerSpec, build_scorers, describe_scorer
from hps_jax.plotting import require_matplotlib

DTYPES = ["float32", "bfloat16", "float16"]


# ------------------------------------------------------------------------------------------------------------
# scorer options (shared with other commands)
# ------------------------------------------------------------------------------------------------------------
def add_scorer_args(p, *, batch_size: int = 32) -> None:
  """--checkpoint NAME=CKPT (repeatable), --aesthetic NAME=MLP (repeatable) with --clip-checkpoint [and
  --clip-format], --preprocess NAME=MODE (repeatable), --batch-size and --dtype."""
  g = p.add_argument_group("scorers (each NAME becomes a column / a key of the results)")
  g.add_argument(
    "--checkpoint",
    action="append",
    metavar="NAME=CKPT",
    help="a clip scorer: 100 * cos(image, prompt) of an HPS / CLIP checkpoint (path, or a published model's name: "
    "hps-v2.1, hps-v2, hps-v1, pickscore, clip-vit-l-14; `hps-jax weights list`); repeatable",
  )
  g.add_argument(
    "--aesthetic",
    action="append",
    metavar="NAME=MLP",
    help="an aesthetic scorer: a LAION aesthetic MLP head (path or laion-aesthetic-linear / -relu) on the CLIP "
    "image tower of --clip-checkpoint; repeatable",
  )
  g.add_argument("--clip-checkpoint", metavar="CKPT", help="the CLIP ViT-L/14 the --aesthetic heads read")
  g.add_argument(
    "--format", default="auto", choices=["auto", "hf", "openai", "open_clip"], help="layout of local checkpoints"
  )
  g.add_argument(
    "--preprocess",
    action="append",
    metavar="NAME=MODE",
    help="a scorer's preprocessing, pad (longest edge to the input size + black padding: the HPS paper's) or clip "
    "(short side + center crop); default pad for --checkpoint scorers, clip for --aesthetic ones; repeatable",
  )
  g.add_argument("--batch-size", type=COUNT, default=batch_size, help="images per forward pass")
  g.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")


def specs_from_args(args) -> list[ScorerSpec]:
  """The ScorerSpecs of add_scorer_args' options, in the order given (clip scorers first); UsageError (exit 2) for
  a malformed or repeated NAME, an --aesthetic without --clip-checkpoint, no scorer at all, or a --preprocess of an
  unknown scorer or mode."""
  clip = named_specs(args.checkpoint, "--checkpoint", "CKPT")
  names = {n for n, _ in clip}

  def unique(name):
    if name in names:
      raise UsageError(f"--aesthetic {name}: the name is already a --checkpoint scorer's")

  aes = named_specs(args.aesthetic, "--aesthetic", "MLP", check=unique)
  if not clip and not aes:
    raise UsageError("give at least one scorer: --checkpoint NAME=CKPT or --aesthetic NAME=MLP")
  if aes and not args.clip_checkpoint:
    raise UsageError("--aesthetic needs --clip-checkpoint CKPT (the CLIP model whose image embedding the MLP reads)")
  known = {n for n, _ in clip + aes}

  def known_name(name):
    if name not in known:
      raise UsageError(f"--preprocess {name}: no scorer of that name (scorers: {', '.join(sorted(known))})")

  modes = dict(named_specs(getattr(args, "preprocess", None), "--preprocess", "MODE", check=known_name))
  bad = {n: m for n, m in modes.items() if m not in ("pad", "clip")}
  if bad:
    name, mode = next(iter(bad.items()))
    raise UsageError(f"--preprocess {name}={mode}: expected pad or clip")
  fmt = getattr(args, "format", "auto")
  specs = [ScorerSpec(n, "clip", c, format=fmt, preprocess=modes.get(n)) for n, c in clip]
  specs += [
    ScorerSpec(n, "aesthetic", m, clip_checkpoint=args.clip_checkpoint, format=fmt, preprocess=modes.get(n))
    for n, m in aes
  ]
  return specs


def scorers_from_args(args, specs: list[ScorerSpec] | None = None) -> dict:
  """{name: Scorer | AestheticScorer} of the options (`specs_from_args`), loaded with --batch-size / --dtype; a
  checkpoint that cannot be loaded is a UsageError naming it."""
  specs = specs if specs is not None else specs_from_args(args)
  try:
    return build_scorers(specs, batch_size=args.batch_size, dtype=args.dtype)
  except ValueError as e:  # WeightsError, CheckpointError, a head that does not fit its CLIP: one line, exit 2
    raise UsageError(str(e)) from e


# ------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------
def add_benchmark(sub):
  p = add_parser(
    sub,
    "benchmark",
    help="generator leaderboard on a prompt set (HPSv2 / ImageReward protocols) with one or more scorers",
    description="Scores every generator's images of a benchmark with one or more scorers (each image decoded "
    "once) and aggregates them as the protocol's authors do. hpsv2: --prompts holds <style>.json files (JSON "
    "lists of prompts), GEN/<style>/{i:05d}.jpg is a generator's image of prompt i; per style the mean and std "
    "(ddof=0) of 10 chunk means of 80 consecutive prompts, Average over all images. imagereward: --prompts is "
    "benchmark-prompts.json ([{id, prompt}]), GEN/<id>_<k>.png, k < --images-per-prompt; the mean over prompts of "
    "the per-prompt mean. mean: --prompts is a JSONL of {image, prompt, generator} rows (or --generator "
    "NAME=FILE.jsonl of {image, prompt} rows); mean, std and bootstrap CI over images. Writes OUT/leaderboard.json "
    "(every number and setting), OUT/leaderboard.md (printed), OUT/leaderboard.png and OUT/scores.jsonl (per "
    "image). Missing images are named and counted, the generator marked incomplete, and the exit code is 1.",
  )
  p.add_argument("--protocol", required=True, choices=list(bm.PROTOCOLS), help="how scores are laid out and averaged")
  p.add_argument(
    "--prompts",
    help="hpsv2: folder of <style>.json files (or one file); imagereward: benchmark-prompts.json (or its folder); "
    "mean: a JSONL of {image, prompt, generator} rows",
  )
  p.add_argument("--images", metavar="GEN_ROOT", help="a folder with one sub-folder of images per generator")
  p.add_argument(
    "--generator",
    action="append",
    metavar="NAME=DIR",
    help="one generator's image folder (mean protocol: its JSONL of {image, prompt} rows, or an `hps-jax sample` "
    "output folder); repeatable, instead of or besides --images",
  )
  add_scorer_args(p)
  p.add_argument("--out", required=True, metavar="DIR", help="where leaderboard.{json,md,png} and scores.jsonl go")
  g = p.add_argument_group("protocol options")
  g.add_argument(
    "--styles",
    metavar="A,B,...",
    help="hpsv2: the styles (prompt files) to benchmark; default anime, concept-art, paintings, photo when --prompts "
    "holds all four, else every .json in it",
  )
  chunking = g.add_mutually_exclusive_group()
  chunking.add_argument(
    "--chunks", type=COUNT, help="hpsv2: consecutive chunks per style (default 10: HPSv2's 10 x 80 of 800 prompts)"
  )
  chunking.add_argument("--chunk-size", type=COUNT, help="hpsv2: prompts per chunk, instead of --chunks")
  g.add_argument(
    "--allow-uneven-chunks",
    action="store_true",
    help="hpsv2: accept a style whose prompt count does not split evenly (refused by default)",
  )
  g.add_argument(
    "--images-per-prompt", type=COUNT, default=bm.IMAGEREWARD_PER_PROMPT, help="imagereward: images per prompt"
  )
  g.add_argument("--bootstrap", type=COUNT, default=1000, help="mean: bootstrap resamples of the CI")
  g.add_argument("--confidence", type=real(0.5, 0.999), default=0.95, help="mean: the CI's level")
  g.add_argument("--seed", type=SEED, default=0, help="mean: seeds the bootstrap")
  p.add_argument("--no-plot", action="store_true", help="do not draw leaderboard.png (it needs matplotlib)")
  add_paths_arg(p)
  p.set_defaults(run=run_benchmark)


def _generators(args) -> dict[str, str]:
  gens = dict(bm.generators_from_root(args.images)) if args.images else {}
  for name, d in named_specs(args.generator, "--generator", "DIR"):
    if name in gens:
      raise UsageError(f"--generator {name}: already a generator of --images {args.images}")
    gens[name] = d
  return gens


def _layout(args) -> bm.Layout:
  gens = _generators(args)
  if args.protocol == "mean":
    if args.images:
      raise UsageError("--protocol mean reads JSONL files: --prompts ROWS.jsonl and/or --generator NAME=FILE.jsonl")
    return bm.jsonl_layout(args.prompts, gens, allow_outside=args.allow_outside_paths)
  if not args.prompts:
    raise UsageError(f"--protocol {args.protocol} needs --prompts")
  if not gens:
    raise UsageError(f"--protocol {args.protocol} needs --images GEN_ROOT or --generator NAME=DIR")
  if args.protocol == "hpsv2":
    styles = [x.strip() for x in args.styles.split(",") if x.strip()] if args.styles else None
    return bm.hpsv2_layout(args.prompts, gens, styles)
  return bm.imagereward_layout(args.prompts, gens, args.images_per_prompt)


def _check_out(out: Path, layout: bm.Layout, args) -> None:
  """The output folder must not be (inside) a generator's folder (its files would become unexpected images) nor
  hold an input."""
  o = out.resolve()
  if args.images and (o == Path(args.images).resolve() or Path(args.images).resolve() in o.parents):
    raise UsageError(f"--out {out} is inside --images {args.images} (it would read as a generator): choose another")
  for name, src in layout.generators.items():
    root = Path(src).resolve()
    if root.is_dir() and (o == root or root in o.parents):
      raise UsageError(f"--out {out} is inside generator {name}'s folder {root}: choose a folder outside it")
  inputs = {Path(p).resolve() for p in [args.prompts, *layout.generators.values()] if p}
  for fname in ("leaderboard.json", "leaderboard.md", "leaderboard.png", "scores.jsonl"):
    if (o / fname) in inputs:
      raise UsageError(f"--out {out}: its {fname} would replace an input")


def _protocol_options(args, layout: bm.Layout) -> tuple[dict, dict]:
  """(aggregation kwargs, settings recorded in the leaderboard)."""
  if layout.protocol == "hpsv2":
    kw = dict(chunks=args.chunks, chunk_size=args.chunk_size, allow_uneven=args.allow_uneven_chunks)
    if args.chunks is None and args.chunk_size is None:
      kw["chunks"] = bm.HPSV2_CHUNKS
    sizes = layout.group_sizes(next(iter(layout.generators)))
    for style, n in sizes.items():  # refuse before scoring, not after
      try:
        bm.chunk_bounds(n, kw["chunks"], kw["chunk_size"], allow_uneven=kw["allow_uneven"])
      except ValueError as e:
        raise UsageError(
          f"style {style} ({n} prompts): {e}; choose --chunks / --chunk-size, or pass --allow-uneven-chunks"
        ) from e
    what = f"{kw['chunks']}" if kw["chunks"] else f"{kw['chunk_size']}-prompt"
    desc = bm.DESCRIPTIONS["hpsv2"].format(chunks=what)
    settings = {"chunks": kw["chunks"], "chunk_size": kw["chunk_size"], "allow_uneven_chunks": kw["allow_uneven"]}
    settings["prompts_per_style"] = sizes
    return kw, {"description": desc, **settings}
  if layout.protocol == "imagereward":
    desc = bm.DESCRIPTIONS["imagereward"].format(per_prompt=args.images_per_prompt)
    return {}, {"description": desc, "images_per_prompt": args.images_per_prompt, "prompts": len(layout.groups)}
  kw = dict(resamples=args.bootstrap, seed=args.seed, confidence=args.confidence)
  return kw, {"description": bm.DESCRIPTIONS["mean"].format(**kw), **kw}


def run_benchmark(args) -> int:
  specs = specs_from_args(args)
  layout = _layout(args)
  if not layout.entries:
    raise UsageError("the benchmark expects no image: check --prompts and the generators")
  _check_out(Path(args.out), layout, args)  # every check before the folder is created
  agg_kw, settings = _protocol_options(args, layout)
  if not args.no_plot:
    require_matplotlib("leaderboard.png", " (or pass --no-plot)")
  out = check_outdir(args.out, "--out")

  scorers = scorers_from_args(args, specs)
  multi = MultiScorer(scorers, batch_size=args.batch_size)
  present = layout.present
  scores: dict[bm.Entry, dict[str, float]] = {}
  failed: list[tuple[bm.Entry, str]] = []
  with progress(len(present), "benchmark") as bar:
    for _, _, entry, values, err in multi.iter_scores((e.image, e.prompt, e) for e in present):
      bar.update(1)
      if err is None:
        scores[entry] = values
      else:
        failed.append((entry, str(err)))

  names = list(scorers)
  aggregates = bm.aggregate(layout, scores, names, **agg_kw)
  info = {}
  for spec in specs:
    d = describe_scorer(scorers[spec.name])
    info[spec.name] = {
      **d,
      "checkpoint": spec.checkpoint,
      "clip_checkpoint": spec.clip_checkpoint,
      "dtype": args.dtype,
    }
  bad_by_gen: dict[str, int] = {}
  for e, _ in failed:
    bad_by_gen[e.generator] = bad_by_gen.get(e.generator, 0) + 1
  settings.update(
    prompts=args.prompts,
    generators=layout.generators,
    images_expected=len(layout.entries),
    images_scored=len(scores),
    images_missing=len(layout.missing),
    images_failed=len(failed),
    decodes=multi.decodes,
  )
  board = bm.leaderboard(layout, aggregates, info, failed=bad_by_gen, settings=settings)
  require_finite(board, "the leaderboard")
  table = bm.markdown(board)

  write_json(out / "leaderboard.json", board)
  files.write_text(out / "leaderboard.md", table + "\n")
  with files.atomic_write(out / "scores.jsonl") as f:
    for e in layout.entries:
      if e in scores:
        row = {"generator": e.generator, "group": e.group, "index": e.index, "prompt": e.prompt, "image": e.image}
        f.write(json.dumps({**row, **scores[e]}, ensure_ascii=False) + "\n")
  wrote = ["leaderboard.json", "leaderboard.md", "scores.jsonl"]
  if not args.no_plot:
    bm.plot(board, out / "leaderboard.png")
    wrote.append("leaderboard.png")
  say_wrote(f"{out}/{{{','.join(wrote)}}}", f"the {layout.protocol} leaderboard of {len(layout.generators)} generators")
  print(table)
  sys.stdout.flush()
  return _report(layout, scores, failed)


def _report(layout: bm.Layout, scores: dict, failed: list) -> int:
  """The end-of-run summary on stderr: unexpected files (warnings), then every missing or failed image (a
  missing folder as one line with its count); exit 1 when any image is missing or failed."""
  err = sys.stderr
  if layout.extra:
    print(f"warning: {len(layout.extra)} unexpected files / folders (not scored):", file=err)
    for path in layout.extra:
      print(f"  extra {path}", file=err)
  n_missing, n_bad = len(layout.missing), len(failed)
  incomplete = sorted({e.generator for e in layout.missing} | {e.generator for e, _ in failed})
  print(
    f"done: {len(scores)} images scored, {n_missing} missing, {n_bad} failed"
    + (f" (incomplete: {', '.join(incomplete)})" if incomplete else ""),
    file=err,
  )
  dirs = dict(layout.missing_dirs)
  for folder, count in layout.missing_dirs:
    print(f"  missing folder {folder} ({count} images)", file=err)
  for e in layout.missing:
    if str(Path(e.image).parent) not in dirs:
      print(f"  missing {e.image}", file=err)
  for e, why in failed:
    print(f"  failed {describe(e.image)}: {why}", file=err)
  return 1 if n_missing or n_bad else 0
