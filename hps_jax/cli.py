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

  def report(self, done: int, noun: str = "images", stream=sys.stderr) -> int:
    print(f"done: {done} {noun} processed, {len(self.items)} skipped", file=stream)
    for what, why in self.items:
      print(f"  skipped {what}: {why}", file=stream)
    return EXIT_SKIPPED if self.items else 0


def read_pairs(path: str, skips: Skips) -> Iterator[tuple[str, str]]:
  """Reads a JSONL of {"image": PATH, "prompt": TEXT} rows; relative image paths are relative to the file."""
  p = Path(path)
  try:
    lines = p.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"cannot read pairs file {p}: {e}") from e
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{p}:{n}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      skips.add(where, f"not valid JSON ({e.msg})")
      continue
    if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
      skips.add(where, 'expected an object with string fields "image" and "prompt"')
      continue
    img = Path(row["image"])
    yield str(img if img.is_absolute() else p.parent / img), row["prompt"]


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
  p = sub.add_parser("score", help="HPS of images against prompts (JSONL out)",
                     description="Scores images with a preference model: hps = 100 * cos(image, prompt). Scores only "
                                 "compare images of the same prompt.")
  p.add_argument("--checkpoint", required=True, help="HF CLIPModel dir, hpc.pt (HPS v1), HPS_v2*.pt, or safetensors")
  p.add_argument("--format", default="auto", choices=["auto", "hf", "openai", "open_clip"])
  p.add_argument("--activation", choices=["quick_gelu", "gelu"], help="override the inferred MLP activation")
  p.add_argument("--tokenizer", help="CLIP BPE file (bpe_simple_vocab_16e6.txt.gz) or HF tokenizer dir")
  p.add_argument("--preprocess", default="pad", choices=["pad", "clip"],
                 help="pad: longest edge to the input size + zero pad (the paper); clip: resize + center crop")
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
  scorer = Scorer.from_checkpoint(args.checkpoint, args.format, args.preprocess, args.dtype, tokenizer=args.tokenizer,
                                  activation=args.activation, batch_size=args.batch_size)
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
  scorer = AestheticScorer.from_checkpoint(args.mlp, args.clip_checkpoint, args.clip_format,
                                           preprocess=args.preprocess, batch_size=args.batch_size)
  return write_rows(scorer.iter_scores(args.images), len(args.images), args.output, "aesthetic", Skips())


# ------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------
COMMANDS = [add_score, add_aesthetic]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="hps-jax", description="Human Preference Score in JAX")
  sub = parser.add_subparsers(dest="command", required=True)
  for add in COMMANDS:
    add(sub)
  return parser


def main(argv=None) -> int:
  from hps_jax.convert.io import CheckpointError
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except (UsageError, CheckpointError, FileNotFoundError) as e:
    print(f"hps-jax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
