"""`make demo`: the offline tour on a tiny model.

Part 1 scores with RANDOM weights: it shows the pipeline works end to end (checkpoint format -> loader -> tokenizer
-> preprocessing -> sharded scoring -> CLI), not what a trained HPS model would say. Part 2 trains that tiny model
as a preference classifier on the synthetic coloured-shape set (configs/hps_classifier.py:tiny) and shows held-out
accuracy before and after, through the same `train-preference` / `eval-preference` commands a real run uses."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BANNER = "=" * 78


def say(msg=""):
  print(msg, flush=True)


def synthetic_images(outdir: Path) -> list[tuple[Path, str]]:
  """A few drawn images with prompts that describe them (shapes and colours), in varied sizes and formats."""
  from PIL import Image, ImageDraw
  outdir.mkdir(parents=True, exist_ok=True)
  specs = [("red", "circle", (96, 64), "png"), ("blue", "square", (64, 96), "jpg"), ("green", "triangle", (80, 80), "png"),
           ("yellow", "circle", (40, 30), "webp")]
  colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (240, 220, 40)}
  out = []
  for colour, shape, (w, h), ext in specs:
    img = Image.new("RGB", (w, h), (245, 245, 240))
    d = ImageDraw.Draw(img)
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    if shape == "circle":
      d.ellipse(box, fill=colours[colour])
    elif shape == "square":
      d.rectangle(box, fill=colours[colour])
    else:
      d.polygon([(w / 2, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)], fill=colours[colour])
    path = outdir / f"{colour}_{shape}.{ext}"
    img.save(path)
    out.append((path, f"a {colour} {shape}"))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--outdir", default="demo_out")
  args = ap.parse_args(argv)
  out = Path(args.outdir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()

  import jax
  from flax import nnx
  from hps_jax import Scorer
  from hps_jax.cli import main as cli_main
  from hps_jax.convert.clip import save_hf
  from hps_jax.models.clip import CLIP, CLIPConfig

  say(BANNER)
  say("hps_jax demo — offline, on a TINY CLIP WITH RANDOM WEIGHTS.")
  say("The scores below demonstrate the machinery only; they carry no preference information.")
  say(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s)")
  say(BANNER)

  say("\n[1/5] Writing a random-init tiny CLIP as a Hugging Face CLIPModel checkpoint (config.json + safetensors)")
  ckpt = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), out / "tiny_clip_random_hf")
  say(f"      -> {ckpt}")

  say("\n[2/5] Scoring drawn images through the public API: Scorer.from_checkpoint(...).score(images, prompts)")
  pairs = synthetic_images(out / "images")
  scorer = Scorer.from_checkpoint(ckpt, preprocess="pad", batch_size=8)
  prompts = [p for _, p in pairs]
  images = [str(i) for i, _ in pairs]
  matrix = np.stack([scorer.score(images, p) for p in prompts])  # rows: prompts, cols: images
  width = max(len(p) for p in prompts)
  say("      HPS (100 * cos), rows = prompt, columns = image; compare within a row only:")
  say("      " + " " * width + "".join(f"{Path(i).stem:>16}" for i in images))
  for p, row in zip(prompts, matrix):
    say("      " + p.ljust(width) + "".join(f"{v:16.3f}" for v in row))

  say("\n[3/5] The same through the command line: hps-jax score --pairs pairs.jsonl --output scores.jsonl")
  pairs_file = out / "pairs.jsonl"
  pairs_file.write_text("".join(json.dumps({"image": str(i.resolve()), "prompt": p}) + "\n" for i, p in pairs))
  rc = cli_main(["score", "--checkpoint", str(ckpt), "--pairs", str(pairs_file), "--output", str(out / "scores.jsonl")])
  for line in (out / "scores.jsonl").read_text().splitlines():
    say("      " + line)

  say("\n[4/5] Training the tiny CLIP as a preference classifier on the synthetic set (n-way choice loss):")
  say("      hps-jax train-preference --config configs/hps_classifier.py:tiny --workdir " + str(out / "train"))
  rc_eval_before = cli_main(["eval-preference", "--random", "--dataset", "synthetic", "--split", "test",
                             "--output", str(out / "eval_random.json")])
  config_path = Path(__file__).resolve().parents[1] / "configs" / "hps_classifier.py"
  from hps_jax.cli import load_config
  from hps_jax.preference import train as tr
  config = load_config(f"{config_path}:tiny", [])
  before = tr.evaluate_clip(tr.build_model(config.model, config.seed), tr.build_source(config, "test"),
                            tr.make_transform(config, CLIPConfig.tiny(), tr.build_tokenizer(config)),
                            batch_size=config.eval_batch_size)
  rc_train = cli_main(["train-preference", "--config", f"{config_path}:tiny", "--workdir", str(out / "train")])
  export = out / "train" / "export"

  say("\n[5/5] Held-out preference accuracy: hps-jax eval-preference --checkpoint " + str(export) +
      " --dataset synthetic")
  rc_eval = cli_main(["eval-preference", "--checkpoint", str(export), "--dataset", "synthetic", "--split", "test",
                      "--output", str(out / "eval_trained.json")])
  after = json.loads((out / "eval_trained.json").read_text())
  say(f"      n-way accuracy: {before['accuracy']:.3f} before training (random init; chance "
      f"{before['random_expectation']:.3f}) -> {after['accuracy']:.3f} after {config.num_steps} steps")
  trained = Scorer.from_checkpoint(export, preprocess="pad", batch_size=8)
  matrix = np.stack([trained.score(images, p) for p in prompts])
  wins = int((matrix.argmax(axis=1) == np.arange(len(prompts))).sum())
  say(f"      the drawn images of step 2, rescored by the trained model: the described image wins {wins} of "
      f"{len(prompts)} prompts")

  say("\n" + BANNER)
  say(f"demo finished in {time.time() - t0:.1f}s. Outputs:")
  for what, path in (("checkpoint", ckpt), ("images", out / "images"), ("pairs", pairs_file),
                     ("scores", out / "scores.jsonl"), ("training", out / "train"), ("trained model", export),
                     ("evaluation", out / "eval_trained.json")):
    say(f"  {what:<14} {path}")
  say(BANNER)
  return rc or rc_eval_before or rc_train or rc_eval


if __name__ == "__main__":
  sys.exit(main())
