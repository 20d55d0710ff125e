"""`hps-jax score` (HPS of images against prompts) and `hps-jax aesthetic` (the LAION aesthetic rating).

Inputs: image files and folders, a --pairs JSONL (`score`), and webdataset tar shards (`--shards`, repeatable: a
`.tar`, a folder of them or a brace pattern; `hps_jax.data.webdataset`). A shard sample's row names its image
`SHARD.tar/KEY.EXT` (e.g. `laion/00000.tar/000000012.jpg`); `score` takes its prompt from the sample's `.txt`
caption unless --prompt is given. The input order is deterministic: command-line images (folders sorted), then the
shards in the order given, each in member order.

Inputs are streamed (images are read and decoded a chunk at a time, never all held). With --output, each chunk of
rows (one forward pass, --batch-size images) is appended to OUTPUT.partial and fsynced as soon as it is scored,
with the run's settings in OUTPUT.partial.json. A SIGKILLed run leaves them; a run stopped (SIGTERM / SIGINT) or
failed leaves them when it was started with --resume (with nothing to continue, --resume starts afresh), and
removes them otherwise. --resume continues such a run: the settings must be the same (else exit 2, one line),
the recorded rows must match the first inputs one for one (their image, prompt and caption: else exit 2), and
those inputs are not scored again, so at most one chunk is redone and no row is written twice. At the end the
complete partial file is read back, unreadable images go to the skip report (exit 1), `rank` (within a prompt) is
computed over every row, and OUTPUT is written atomically (.jsonl / .csv / .parquet). Without --output the rows
go to stdout at the end, as before (nothing to resume).

`aesthetic --min-score T --out DIR` builds the paper's regularization set (LAION images with aesthetic >= 6.5): the
images rated >= T are copied, original bytes, to DIR/images/NNNNNNNN-NAME (NNNNNNNN: the input's position) and
listed in DIR/metadata.jsonl as {"file_name", "caption", "aesthetic", "source"} rows, the imagefolder layout
`hps-jax label --regularization DIR` reads (it needs image files, so shard images are always extracted). Captions
come from the shard's .txt or, for image files, --captions (a {"image", "prompt"} JSONL); a kept image without a
caption is skipped (named). The scores of every image go to DIR/aesthetic.jsonl (or --output).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from hps_jax import files
from hps_jax.cli.common import (
  COUNT,
  ScoreInput,
  Skips,
  UsageError,
  add_checkpoint_args,
  add_parser,
  add_paths_arg,
  add_resume_arg,
  check_outdir,
  check_output,
  check_resumable,
  expand_images,
  read_pairs,
  real,
  say_wrote,
  stream_rows,
  text,
)
from hps_jax.data.paths import safe_basename
from hps_jax.data.webdataset import expand_shards, iter_samples
from hps_jax.preference.scorer import AestheticScorer, Scorer


def add_output_args(p) -> None:
  p.add_argument(
    "--output",
    help="results file by extension: .jsonl, .csv or .parquet (default: JSONL on stdout); one row per image",
  )
  p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def add_preprocess_arg(p, default: str) -> None:
  p.add_argument(
    "--preprocess",
    default=default,
    choices=["pad", "clip"],
    help="pad: longest edge to the input size + zero pad (the paper); clip: resize short side + center crop",
  )


def add_shards_arg(p) -> None:
  p.add_argument(
    "--shards",
    action="append",
    metavar="SPEC",
    type=text,
    help="webdataset (img2dataset) tar shards to read images from, repeatable: a .tar, a folder of .tar files or a "
    "brace pattern ('laion/{00000..00099}.tar'); a sample's row names its image SHARD.tar/KEY.EXT (needs the "
    "[wds] extra)",
  )


def add_score(sub):
  p = add_parser(
    sub,
    "score",
    help="HPS of images against prompts (JSONL out)",
    description="Scores images with a preference model: hps = 100 * cos(image, prompt). Scores only "
    "compare images of the same prompt; `rank` is each image's place among the images of its prompt (1 = best). "
    "Images come from files and folders (with --prompt), a --pairs file, or webdataset --shards (the prompt is "
    "each sample's .txt caption, or --prompt). With --output, rows are written as they come to OUTPUT.partial and "
    "a killed run continues with --resume (start with --resume to keep the partial result on SIGTERM as well).",
  )
  add_checkpoint_args(p)
  add_preprocess_arg(p, "pad")
  p.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
  add_output_args(p)
  add_resume_arg(p)
  add_paths_arg(p)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--prompt", type=text, help="one prompt for all IMAGES (and for the --shards samples)")
  g.add_argument("--pairs", help='JSONL with {"image": PATH, "prompt": TEXT} per line')
  add_shards_arg(p)
  p.add_argument("images", nargs="*", help="image files or folders (searched recursively), with --prompt")
  p.set_defaults(run=run_score)


def _shards(specs) -> list:
  """The shard paths of --shards (a bad spec, or no webdataset package: one line, exit 2)."""
  return expand_shards(specs) if specs else []


_PATH_KEYS = {"checkpoint", "tokenizer", "pairs", "images", "mlp", "clip_checkpoint", "out", "captions"}


def _settings(args, command: str, keys) -> dict:
  """What decides a run's rows (recorded with OUTPUT.partial; --resume requires the same): the options `keys`, with
  the paths among them that exist made absolute (so a resume from another folder is the same run)."""

  def norm(v):
    if isinstance(v, list):
      return [norm(x) for x in v]
    if isinstance(v, str) and v and os.path.exists(v):
      return os.path.abspath(v)
    return v

  return {"command": command, **{k: norm(getattr(args, k)) if k in _PATH_KEYS else getattr(args, k) for k in keys}}


def _check_resume(args, output) -> None:
  if args.resume and (output is None or output == "-"):
    raise UsageError("--resume continues a run written to a file: give --output")


def run_score(args) -> int:
  if args.pairs is not None and (args.images or args.shards):
    raise UsageError("give images either in --pairs or on the command line / in --shards, not both")
  if args.pairs is None and args.prompt is None and not args.shards:
    raise UsageError("one of the arguments --prompt --pairs is required (or --shards: their captions are the prompts)")
  if args.prompt is not None and not args.images and not args.shards:
    raise UsageError("--prompt needs at least one IMAGE (or --shards)")
  if args.images and args.prompt is None:
    raise UsageError("IMAGES on the command line need --prompt")
  _check_resume(args, args.output)
  shards = _shards(args.shards)
  check_output(args.output, overwrite=args.overwrite, inputs=[args.pairs, *args.images, *shards])
  skips = Skips()
  total = None
  if args.pairs is not None:
    pairs = list(read_pairs(args.pairs, skips, allow_outside=args.allow_outside_paths))
    inputs, total = [ScoreInput(img, img, prompt) for img, prompt in pairs], len(pairs)
  else:
    images = expand_images(args.images)
    total = None if shards else len(images)
    inputs = _score_inputs(images, shards, args.prompt, skips)
  keys = ["checkpoint", "format", "activation", "tokenizer", "preprocess", "dtype", "batch_size", "prompt", "pairs"]
  keys += ["images", "shards", "allow_outside_paths"]
  settings = _settings(args, "score", keys)
  check_resumable(args.output, settings, args.resume)  # a refused --resume costs no model load
  scorer = scorer_from_args(args)
  return stream_rows(
    inputs,
    lambda items: scorer.iter_scores((i.source, i.prompt) for i in items),
    output=args.output,
    desc="scoring",
    skips=skips,
    total=total,
    rank_by="hps",
    resume=args.resume,
    settings=settings,
    chunk=scorer.batch_size,
  )


def _score_inputs(images, shards, prompt, skips) -> Iterator[ScoreInput]:
  for img in images:
    yield ScoreInput(img, img, prompt)
  for s in iter_samples(shards, skips):
    p = prompt if prompt is not None else s.caption
    if p is None:
      skips.add(f"{s.shard}:{s.key}", "no caption (.txt) to score against, and no --prompt")
      continue
    yield ScoreInput(s.where, s.image, p)


def scorer_from_args(args, *, batch_size: int | None = None, buckets=None) -> Scorer:
  """The Scorer of --checkpoint (a path, or a published model's name: hps-v2.1, hps-v1, clip-vit-l-14, ...) with
  --format / --preprocess / --dtype / --tokenizer / --activation / --batch-size (or `batch_size`, and fixed
  `buckets`)."""
  kw = dict(
    preprocess=args.preprocess,
    dtype=args.dtype,
    activation=args.activation,
    batch_size=args.batch_size if batch_size is None else batch_size,
    buckets=buckets,
  )
  if args.format != "auto":
    kw["format"] = args.format
  if args.tokenizer:
    kw["tokenizer"] = args.tokenizer
  try:
    return Scorer.from_pretrained(args.checkpoint, **kw)
  except ValueError as e:  # WeightsError, CheckpointError, a config / tokenizer mismatch: one line, exit 2
    raise UsageError(str(e)) from e


def add_aesthetic(sub):
  p = add_parser(
    sub,
    "aesthetic",
    help="LAION aesthetic score of images (JSONL out)",
    description="Rates images with the LAION aesthetic predictor: an MLP head on the CLIP ViT-L/14 image "
    "embedding (the prompt plays no part). Images come from files, folders and webdataset --shards. With "
    "--min-score and --out it builds the paper's regularization set: the images rated >= the threshold, copied "
    'into OUT/images/ and listed with their captions in OUT/metadata.jsonl ({"file_name", "caption"} rows, what '
    "`hps-jax label --regularization OUT` reads). Resumable (--resume) like `score`.",
  )
  p.add_argument(
    "--aesthetic-mlp",
    "--mlp",
    dest="mlp",
    required=True,
    help="sac+logos+ava1-l14-linearMSE.pth or ava+logos-l14-reluMSE.pth",
  )
  p.add_argument("--clip-checkpoint", required=True, help="CLIP ViT-L/14 (OpenAI) checkpoint in any supported format")
  p.add_argument(
    "--clip-format", default="auto", choices=["auto", "hf", "openai", "open_clip"], help="the CLIP checkpoint's layout"
  )
  add_preprocess_arg(p, "clip")
  p.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass")
  add_output_args(p)
  add_resume_arg(p)
  add_shards_arg(p)
  p.add_argument(
    "--min-score",
    type=real(),
    help="build a regularization set in --out: keep the images whose aesthetic score is >= this (the paper: 6.5)",
  )
  p.add_argument(
    "--out",
    metavar="DIR",
    help="with --min-score: the regularization set's folder (metadata.jsonl + images/; the scores go to "
    "DIR/aesthetic.jsonl unless --output names another file)",
  )
  p.add_argument(
    "--captions",
    help='with --min-score: JSONL of {"image": PATH, "prompt": CAPTION} rows giving the captions of IMAGES (shard '
    "samples have their .txt); a kept image without a caption is skipped",
  )
  add_paths_arg(p)
  p.add_argument("images", nargs="*", help="image files or folders (searched recursively)")
  p.set_defaults(run=run_aesthetic)


def run_aesthetic(args) -> int:
  if not args.images and not args.shards:
    raise UsageError("give IMAGES (files or folders) or --shards")
  if (args.min_score is None) != (args.out is None):
    raise UsageError("--min-score and --out go together (the regularization set's threshold and folder)")
  if args.captions is not None and args.min_score is None:
    raise UsageError("--captions gives the captions of a regularization set: use it with --min-score and --out")
  output = args.output
  if args.out is not None:
    out_dir = check_outdir(args.out, "--out")
    output = output or str(out_dir / "aesthetic.jsonl")
    check_output(str(out_dir / METADATA), overwrite=args.overwrite, inputs=[args.captions, *args.images])
  _check_resume(args, output)
  shards = _shards(args.shards)
  check_output(output, overwrite=args.overwrite, inputs=[args.captions, *args.images, *shards])
  skips = Skips()
  captions = _read_captions(args.captions, skips, args.allow_outside_paths) if args.captions else {}
  images = expand_images(args.images) if args.images else []
  keys = ["mlp", "clip_checkpoint", "clip_format", "preprocess", "batch_size", "images", "shards", "min_score", "out"]
  keys += ["captions", "allow_outside_paths"]
  settings = _settings(args, "aesthetic", keys)
  check_resumable(output, settings, args.resume)
  try:
    scorer = AestheticScorer.from_checkpoint(
      args.mlp, args.clip_checkpoint, args.clip_format, preprocess=args.preprocess, batch_size=args.batch_size
    )
  except ValueError as e:  # e.g. a head whose input is not the CLIP model's embedding size
    raise UsageError(str(e)) from e
  reg = None if args.out is None else _RegularizationSet(Path(args.out), args.min_score, skips)
  return stream_rows(
    _aesthetic_inputs(images, shards, captions if reg is not None else None, skips),
    lambda items: scorer.iter_scores(i.source for i in items),
    output=output,
    desc="aesthetic",
    skips=skips,
    total=None if shards else len(images),
    resume=args.resume,
    settings=settings,
    chunk=scorer.batch_size,
    on_chunk=None if reg is None else reg.extract,
    on_finish=None if reg is None else reg.finish,
  )


METADATA = "metadata.jsonl"


def _read_captions(path, skips, allow_outside: bool) -> dict[str, str]:
  """absolute image path -> caption, from a {"image", "prompt"} JSONL (bad lines are skips)."""
  return {os.path.abspath(img): caption for img, caption in read_pairs(path, skips, allow_outside=allow_outside)}


def _aesthetic_inputs(images, shards, captions: dict | None, skips) -> Iterator[ScoreInput]:
  """The inputs; with `captions` (a regularization set is built) each carries its caption (None when it has
  none)."""
  for img in images:
    yield ScoreInput(img, img, caption=None if captions is None else captions.get(os.path.abspath(img)))
  for s in iter_samples(shards, skips):
    yield ScoreInput(s.where, s.image, caption=None if captions is None else s.caption)


class _RegularizationSet:
  """The images rated >= `min_score`, copied (original bytes) to OUT/images/NNNNNNNN-NAME (NNNNNNNN: the input's
  position, which makes names unique and stable across --resume), listed in OUT/metadata.jsonl at the end. Kept
  images are written before their rows are recorded in the partial scores file, so a resumed run finds them."""

  def __init__(self, out: Path, min_score: float, skips: Skips):
    self.out, self.min_score, self.skips = out, min_score, skips

  def extract(self, chunk) -> None:
    for position, item, row in chunk:
      row["caption"] = item.caption
      if "error" in row or row["aesthetic"] < self.min_score or item.caption is None:
        continue
      name = f"images/{position:08d}-{safe_basename(Path(item.image).name)}"
      data = item.source if isinstance(item.source, bytes) else Path(item.source).read_bytes()
      with files.atomic_write(self.out / name, "wb") as f:
        f.write(data)
      row["file_name"] = name

  def finish(self, rows) -> None:
    kept = []
    for row in rows:
      if row["aesthetic"] < self.min_score:
        continue
      if row.get("file_name") is None:
        self.skips.add(row["image"], f"aesthetic {row['aesthetic']:.3f} >= {self.min_score:g} but no caption: not kept")
        continue
      if not (self.out / row["file_name"]).is_file():
        raise files.ResumeError(
          f"{self.out / row['file_name']}: the kept image is missing (removed after it was written?): rerun without "
          "--resume"
        )
      kept.append(
        {
          "file_name": row["file_name"],
          "caption": row["caption"],
          "aesthetic": row["aesthetic"],
          "source": row["image"],
        }
      )
    with files.atomic_write(self.out / METADATA) as f:
      for r in kept:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    say_wrote(self.out / METADATA, f"the regularization set ({len(kept)} images >= {self.min_score:g})")
