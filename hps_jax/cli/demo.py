"""`make demo`: the paper's whole pipeline offline, on tiny random-init models and synthetic data.

Steps 1-3 score with RANDOM weights: they show the machinery end to end (checkpoint format -> loader -> tokenizer
-> preprocessing -> sharded scoring -> CLI), not what a trained HPS model would say. Steps 4-5 train that tiny
model as a preference classifier on the synthetic coloured-shape set (config hps_classifier:tiny) and show
held-out accuracy before and after. Steps 6-9 are the adaptation of Stable Diffusion (Sec. 5) on a tiny random SD:
HPS-label generated images with the trained classifier, train LoRA adapters on the labelled set
(config lora_sd14:tiny), render base vs adapted with the same seeds ("Weird image." as the adapted model's
negative prompt), and compute the Table 4 metrics (FID, aesthetic, CLIP score, HPS; FID's Inception, the CLIP and
the aesthetic head are random here too). Step 10 is the human study (Sec. 5's user study, Fig. 8): a study file
from the A/B samples, the voting web app on a loopback port, 5 scripted participants voting through its HTTP API
(they prefer the adapted image 70% of the time), the votes exported and the report written. Every step goes
through the same commands a real run uses."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from hps_jax.cli import main as cli_main  # the demo drives the commands exactly as a user would
from hps_jax.cli.common import UsageError, add_parser, check_outdir, load_config
from hps_jax.convert.aesthetic import save_aesthetic
from hps_jax.convert.clip import save_hf
from hps_jax.convert.inception import save_inception_torch
from hps_jax.data.synthetic import SyntheticPreference, write_generated
from hps_jax.models.aesthetic import AestheticMLP
from hps_jax.models.clip import CLIP, CLIPConfig
from hps_jax.models.inception import FIDInception
from hps_jax.preference import train as tr
from hps_jax.preference.evaluate import evaluate_clip
from hps_jax.preference.scorer import Scorer

BANNER = "=" * 78


def say(msg=""):
  print(msg, flush=True)


def synthetic_images(outdir: Path) -> list[tuple[Path, str]]:
  """A few drawn images with prompts that describe them (shapes and colours), in varied sizes and formats."""
  outdir.mkdir(parents=True, exist_ok=True)
  specs = [
    ("red", "circle", (96, 64), "png"),
    ("blue", "square", (64, 96), "jpg"),
    ("green", "triangle", (80, 80), "png"),
    ("yellow", "circle", (40, 30), "webp"),
  ]
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


def add_demo(sub):
  p = add_parser(
    sub,
    "demo",
    help="the whole paper pipeline offline on tiny random models (what `make demo` runs)",
    description=__doc__,
  )
  p.add_argument("--outdir", default="demo_out", help="where every output of the demo goes")
  p.set_defaults(run=run_demo)


def run_demo(args) -> int:
  out = check_outdir(args.outdir)
  if any(out.iterdir()):  # its training runs would resume and its outputs would collide with a previous run's
    raise UsageError(f"--outdir {out} is not empty: choose a new folder (or remove it; `make demo` does)")
  t0 = time.time()

  say(BANNER)
  say("hps_jax demo — offline, on a TINY CLIP WITH RANDOM WEIGHTS.")
  say("The scores below demonstrate the machinery only; they carry no preference information.")
  say(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s)")
  say(BANNER)

  say("\n[1/11] Writing a random-init tiny CLIP as a Hugging Face CLIPModel checkpoint (config.json + safetensors)")
  ckpt = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), out / "tiny_clip_random_hf")
  say(f"      -> {ckpt}")

  say("\n[2/11] Scoring drawn images through the public API: Scorer.from_checkpoint(...).score(images, prompts)")
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

  say("\n[3/11] The same through the command line: hps-jax score --pairs pairs.jsonl --output scores.jsonl")
  pairs_file = out / "pairs.jsonl"
  pairs_file.write_text("".join(json.dumps({"image": str(i.resolve()), "prompt": p}) + "\n" for i, p in pairs))
  rc = cli_main(["score", "--checkpoint", str(ckpt), "--pairs", str(pairs_file), "--output", str(out / "scores.jsonl")])
  for line in (out / "scores.jsonl").read_text().splitlines():
    say("      " + line)

  say("\n[4/11] Training the tiny CLIP as a preference classifier on the synthetic set (n-way choice loss):")
  say("      hps-jax train-preference --config hps_classifier:tiny --workdir " + str(out / "train"))
  rc_eval_before = cli_main(
    [
      "eval-preference",
      "--random",
      "--dataset",
      "synthetic",
      "--split",
      "test",
      "--output",
      str(out / "eval_random.json"),
    ]
  )
  config = load_config("hps_classifier:tiny")
  before = evaluate_clip(
    tr.build_model(config.model, config.seed),
    tr.build_source(config, "test"),
    tr.make_transform(config, CLIPConfig.tiny(), tr.build_tokenizer(config)),
    batch_size=config.eval_batch_size,
  )
  rc_train = cli_main(["train-preference", "--config", "hps_classifier:tiny", "--workdir", str(out / "train")])
  export = out / "train" / "export"

  say(
    "\n[5/11] Held-out preference accuracy: hps-jax eval-preference --checkpoint "
    + str(export)
    + " --dataset synthetic"
  )
  rc_eval = cli_main(
    [
      "eval-preference",
      "--checkpoint",
      str(export),
      "--dataset",
      "synthetic",
      "--split",
      "test",
      "--output",
      str(out / "eval_trained.json"),
    ]
  )
  after = json.loads((out / "eval_trained.json").read_text())
  say(
    f"      n-way accuracy: {before['accuracy']:.3f} before training (random init; chance "
    f"{before['random_expectation']:.3f}) -> {after['accuracy']:.3f} after {config.num_steps} steps"
  )
  trained = Scorer.from_checkpoint(export, preprocess="pad", batch_size=8)
  matrix = np.stack([trained.score(images, p) for p in prompts])
  wins = int((matrix.argmax(axis=1) == np.arange(len(prompts))).sum())
  say(
    f"      the drawn images of step 2, rescored by the trained model: the described image wins {wins} of "
    f"{len(prompts)} prompts"
  )

  adapt = adaptation(out, export, cli_main)
  study = human_study(out, adapt["samples"], cli_main)

  say("\n" + BANNER)
  say(f"demo finished in {time.time() - t0:.1f}s. Outputs:")
  for what, path in (
    ("checkpoint", ckpt),
    ("images", out / "images"),
    ("pairs", pairs_file),
    ("scores", out / "scores.jsonl"),
    ("training", out / "train"),
    ("trained model", export),
    ("evaluation", out / "eval_trained.json"),
    *adapt["outputs"],
    *study["outputs"],
  ):
    say(f"  {what:<18} {path}")
  say(BANNER)
  return rc or rc_eval_before or rc_train or rc_eval or adapt["rc"] or study["rc"]


def adaptation(out: Path, scorer_ckpt: Path, cli_main) -> dict:
  """Steps 6-10: label -> train-lora -> A/B samples -> Table 4 metrics -> leaderboard and score correlation, on a
  tiny random SD."""
  rcs = []

  say(
    "\n[6/11] HPS labelling (paper Sec. 5): 3-4 generated images per prompt, scored by the classifier trained in "
    "step 4;\n      per prompt the best is kept when softmax(HPS) > 2/n, the worst likewise with the caption "
    "prefix 'Weird image. '"
  )
  gen = write_generated(SyntheticPreference(48, seed=5, split="generated", image_size=32, min_images=3), out / "gen")
  reg = out / "regularization"
  reg.mkdir(parents=True, exist_ok=True)
  reg_src = SyntheticPreference(8, seed=6, split="regularization", image_size=32)
  with open(reg / "metadata.jsonl", "w", encoding="utf-8") as f:
    for i in range(len(reg_src)):
      rec = reg_src[i]
      (reg / f"{i:03d}.png").write_bytes(rec["images"][rec["chosen"]])
      f.write(json.dumps({"file_name": f"{i:03d}.png", "caption": rec["prompt"]}) + "\n")
  manifest = out / "labelled" / "manifest.jsonl"
  say(f"      hps-jax label --checkpoint {scorer_ckpt} --images {gen} --regularization {reg} --out {manifest}")
  rcs.append(
    cli_main(
      [
        "label",
        "--checkpoint",
        str(scorer_ckpt),
        "--images",
        str(gen),
        "--regularization",
        str(reg),
        "--out",
        str(manifest),
      ]
    )
  )

  say("\n[7/11] LoRA on the tiny random SD's attention projections, trained on the labelled manifest:")
  lora_wd = out / "lora"
  say(f"      hps-jax train-lora --config lora_sd14:tiny --workdir {lora_wd} --config.data.manifest={manifest}")
  rcs.append(
    cli_main(
      [
        "train-lora",
        "--config",
        "lora_sd14:tiny",
        "--workdir",
        str(lora_wd),
        f"--config.data.manifest={manifest}",
        "--config.num_steps=120",
      ]
    )
  )
  losses = [json.loads(line) for line in (lora_wd / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in losses if "loss" in r]
  say(f"      diffusion loss {np.mean(losses[:3]):.3f} (first logged steps) -> {np.mean(losses[-3:]):.3f} (last)")
  model, adapter = lora_wd / "base_model", lora_wd / "export" / "pytorch_lora_weights.safetensors"

  say("\n[8/11] Base vs adapted from the same seeds (adapted: negative prompt 'Weird image.'), one grid:")
  prompts = out / "prompts.txt"
  prompts.write_text("a photo of a red circle\na blue square\nan image showing a yellow triangle\n")
  samples = out / "samples"
  say(f"      hps-jax sample --model {model} --lora {adapter} --ab --negative-prompt 'Weird image.' ...")
  rcs.append(
    cli_main(
      [
        "sample",
        "--model",
        str(model),
        "--lora",
        str(adapter),
        "--ab",
        "--negative-prompt",
        "Weird image.",
        "--prompts",
        str(prompts),
        "--num-images",
        "2",
        "--steps",
        "10",
        "--height",
        "32",
        "--width",
        "32",
        "--batch-size",
        "2",
        "--outdir",
        str(samples),
      ]
    )
  )

  say("\n[9/11] Table 4 columns for base and adapted (random Inception / CLIP / aesthetic head: machinery only):")
  w = out / "metric_models"
  inception = save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), w / "inception_random.safetensors")
  clip = save_hf(CLIP(CLIPConfig.tiny().replace(embed_dim=768), rngs=nnx.Rngs(1)), w / "clip_random")
  head = save_aesthetic(AestheticMLP(rngs=nnx.Rngs(2)), w / "aesthetic_random.safetensors")
  stats = w / "reference_stats.npz"
  rcs.append(
    cli_main(["fid", str(reg), "--save-stats", str(stats), "--inception-weights", str(inception), "--batch-size", "8"])
  )
  table = out / "table4.json"
  rcs.append(
    cli_main(
      [
        "eval-generator",
        "--model",
        str(model),
        "--lora",
        str(adapter),
        "--prompts",
        str(prompts),
        "--reference",
        str(stats),
        "--clip-checkpoint",
        str(clip),
        "--aesthetic-mlp",
        str(head),
        "--checkpoint",
        str(scorer_ckpt),
        "--inception-weights",
        str(inception),
        "--num-images",
        "2",
        "--steps",
        "10",
        "--height",
        "32",
        "--width",
        "32",
        "--sample-batch-size",
        "2",
        "--batch-size",
        "8",
        "--output",
        str(table),
      ]
    )
  )
  bench, corr = out / "benchmark", out / "correlation"
  say("\n[10/11] Compare generators (leaderboard, tiny random models: machinery only) and how the scores agree:")
  say(
    f"      hps-jax benchmark --protocol mean --generator base={samples / 'base'} --generator adapted=... --out {bench}"
  )
  rcs.append(
    cli_main(
      [
        "benchmark",
        "--protocol",
        "mean",
        "--generator",
        f"base={samples / 'base'}",
        "--generator",
        f"adapted={samples / 'adapted'}",
        "--checkpoint",
        f"hps={scorer_ckpt}",
        "--aesthetic",
        f"aesthetic={head}",
        "--clip-checkpoint",
        str(clip),
        "--batch-size",
        "8",
        "--bootstrap",
        "500",
        "--out",
        str(bench),
      ]
    )
  )
  scores = bench / "scores.jsonl"
  say(f"      hps-jax correlate --scores hps={scores}:hps --scores aesthetic={scores}:aesthetic --out {corr}")
  rcs.append(
    cli_main(
      ["correlate", "--scores", f"hps={scores}:hps", "--scores", f"aesthetic={scores}:aesthetic", "--min-per-prompt",
       "2", "--bootstrap", "500", "--out", str(corr)]
    )
  )  # fmt: skip
  return {
    "rc": next((rc for rc in rcs if rc), 0),
    "samples": samples,
    "outputs": (
      ("leaderboard", bench / "leaderboard.md"),
      ("score correlation", corr / "correlation.md"),
      ("label manifest", manifest),
      ("LoRA training", lora_wd),
      ("LoRA adapter", adapter),
      ("A/B grid", samples / "ab_grid.png"),
      ("metrics (JSON)", table),
      ("metrics (markdown)", table.with_suffix(".md")),
    ),
  }


def human_study(out: Path, samples: Path, cli_main, participants: int = 5, p_adapted: float = 0.7) -> dict:
  """Step 11: study create -> the web app on a loopback port -> scripted participants through its JSON API ->
  study export -> study report. Skipped (named) without the `study` extra (Flask, SQLAlchemy, waitress)."""
  say("\n[11/11] Human A/B study of base vs adapted: study create -> web app -> 5 scripted participants -> report")
  try:
    import waitress.server

    from hps_jax.study import store as study_store
    from hps_jax.study import web
    from hps_jax.study.create import load_study
  except ImportError as e:
    say(f"      skipped: the study web app needs pip install 'hps_jax[study]' ({e})")
    return {"rc": 0, "outputs": ()}
  d = out / "study"
  study_file, db, votes, report_dir = d / "study.json", d / "votes.sqlite", d / "votes.jsonl", d / "report"
  for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
    f.unlink(missing_ok=True)  # a rerun of the demo starts a fresh study
  rc = cli_main(["study", "create", "--ab", str(samples), "--out", str(study_file), "--allow-tie", "--checks", "2",
                 "--seed", "0", "--overwrite"])  # fmt: skip
  if rc not in (0, 1):
    return {"rc": rc, "outputs": ()}
  study = load_study(study_file)
  store = study_store.open_store(f"sqlite:///{db}", study)
  server = waitress.server.create_server(web.make_app(study, store, "demo"), host="127.0.0.1", port=0, threads=4)
  url = f"http://127.0.0.1:{server.effective_port}"
  stop = threading.Event()
  thread = threading.Thread(target=web.run_until, args=(server, stop.is_set), daemon=True)
  thread.start()
  say(f"      serving on {url}/ (what a participant opens); voting through {url}/api/...")
  system_of = {key: study.images[image_id]["system"] for key, image_id in web.image_keys(study).items()}
  rng = np.random.default_rng(0)
  try:
    for i in range(participants):  # fixed codes: the same sides and order on every run of the demo
      code = _api(url + "/api/join", {"code": f"demo{i + 1}"})["participant"]
      while not (pair := _api(f"{url}/api/next?participant={code}")).get("done"):
        left, right = (system_of[u.rsplit("/", 1)[-1]] for u in (pair["left_url"], pair["right_url"]))
        vote = {"participant": code, "pair_id": pair["pair_id"], "response_ms": int(rng.integers(800, 4000))}
        _api(url + "/api/vote", {**vote, "choice": _scripted_choice(left, right, rng.random() < p_adapted)})
  finally:
    stop.set()
    thread.join(timeout=30)
    store.close()
  rcs = [cli_main(["study", "export", "--db", str(db), "--out", str(votes), "--overwrite"])]
  rcs.append(cli_main(["study", "report", str(votes), "--study", str(study_file), "--out", str(report_dir),
                       "--bootstrap", "500"]))  # fmt: skip
  return {
    "rc": next((r for r in rcs if r), 0),
    "outputs": (("study", study_file), ("votes", votes), ("study report", report_dir / "report.html")),
  }


def _scripted_choice(left: str | None, right: str | None, prefers_adapted: bool) -> str:
  """A scripted participant's answer: "tie" on an identical-image check, the intact side of a broken-image check
  (its broken image has no system), else the adapted side when `prefers_adapted`, the base side otherwise."""
  if left == right:
    return "tie"
  if left is None or right is None:
    return "right" if left is None else "left"
  return "left" if (left == "adapted") == prefers_adapted else "right"


def _api(url: str, body: dict | None = None) -> dict:
  """One JSON request to the study server (POST when there is a body)."""
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
  with urllib.request.urlopen(req, timeout=30) as r:
    return json.loads(r.read())


def main(argv=None) -> int:
  """`python -m hps_jax.cli.demo [--outdir DIR]`, the same as `hps-jax demo`."""
  return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
