"""`hps-jax eval-generator`: base vs LoRA-adapted tiny SD, the Table 4 columns (FID, aesthetic, CLIP score, HPS) in
JSON and markdown; each number equals `hps-jax metrics` on the same rendered images."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hps_jax import lora
from hps_jax.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from hps_jax.convert.aesthetic import save_aesthetic
  from hps_jax.convert.clip import save_hf
  from hps_jax.convert.diffusers import load_unet
  from hps_jax.convert.inception import save_inception_torch
  from hps_jax.diffusion.tiny import write_tiny_sd
  from hps_jax.lora import save_peft
  from hps_jax.metrics.fid import FeatureStats  # noqa: F401  (the stats file below is what `fid --save-stats` writes)
  from hps_jax.models.aesthetic import AestheticMLP
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.models.inception import FIDInception

  d = tmp_path_factory.mktemp("evalgen")
  model = write_tiny_sd(d / "sd", seed=2)
  unet = load_unet(model)
  lora.apply_lora(unet, lora.LoRAConfig(rank=4))
  for i, m in enumerate(lora.lora_layers(unet).values()):
    m.lora_up.set_value(0.3 * jax.random.normal(jax.random.key(i), m.lora_up.shape))
  files = {
    "model": model,
    "lora": save_peft(unet, d / "lora.safetensors"),
    "hps": save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), d / "hps"),
    "clip": save_hf(CLIP(CLIPConfig.tiny().replace(embed_dim=768), rngs=nnx.Rngs(1)), d / "clip"),
    "aesthetic": save_aesthetic(AestheticMLP(rngs=nnx.Rngs(2)), d / "aesthetic.safetensors"),
    "inception": save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), d / "inception.safetensors"),
  }
  ref = d / "reference"
  ref.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
  assert (
    main(
      [
        "fid",
        str(ref),
        "--save-stats",
        str(d / "ref_stats.npz"),
        "--inception-weights",
        str(files["inception"]),
        "--batch-size",
        "4",
      ]
    )
    == 0
  )
  files["stats"] = d / "ref_stats.npz"
  (d / "prompts.txt").write_text("a red circle\na blue square\na photo of a green triangle\n")
  files["prompts"] = d / "prompts.txt"
  return files


def test_table4_for_base_and_adapted(setup, tmp_path):
  f = setup
  out = tmp_path / "table4.json"
  rc = main(
    [
      "eval-generator",
      "--model",
      str(f["model"]),
      "--lora",
      str(f["lora"]),
      "--prompts",
      str(f["prompts"]),
      "--reference-stats",
      str(f["stats"]),
      "--clip-checkpoint",
      str(f["clip"]),
      "--aesthetic-mlp",
      str(f["aesthetic"]),
      "--hps-checkpoint",
      str(f["hps"]),
      "--inception-weights",
      str(f["inception"]),
      "--num-images",
      "2",
      "--steps",
      "2",
      "--height",
      "32",
      "--width",
      "32",
      "--sample-batch-size",
      "2",
      "--batch-size",
      "4",
      "--output",
      str(out),
    ]
  )
  assert rc == 0
  summary = json.loads(out.read_text())
  res = summary["results"]
  assert set(res) == {"base", "adapted"}
  for name in ("base", "adapted"):
    assert res[name]["num_generated"] == 6 and res[name]["num_images"] == 6
    assert {"fid", "aesthetic_mean", "clip_score", "hps_mean"} <= set(res[name])
  for name in ("adapted",):  # the same numbers as `hps-jax metrics` on the images it rendered
    m = tmp_path / f"metrics_{name}.json"
    assert (
      main(
        [
          "metrics",
          "--images",
          str(tmp_path / "table4_images" / name / "images.jsonl"),
          "--metrics",
          "fid,clip,aesthetic,hps",
          "--reference",
          str(f["stats"]),
          "--inception-weights",
          str(f["inception"]),
          "--clip-checkpoint",
          str(f["clip"]),
          "--aesthetic-mlp",
          str(f["aesthetic"]),
          "--checkpoint",
          str(f["hps"]),
          "--batch-size",
          "4",
          "--output",
          str(m),
        ]
      )
      == 0
    )
    want = json.loads(m.read_text())
    for k in ("fid", "aesthetic_mean", "clip_score", "hps_mean"):
      assert res[name][k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), (name, k)
    for k in ("clip", "hps"):  # both scales, as `hps-jax metrics` reports them
      assert res[name][k]["cosine"] == pytest.approx(want[k]["cosine"], rel=1e-6, abs=1e-8), (name, k)
  for name in ("base", "adapted"):  # each similarity on both scales, labelled; x100 is exactly 100 * cos
    clip, hps = res[name]["clip"], res[name]["hps"]
    assert clip["x100"] == 100 * clip["cosine"] and hps["x100"] == 100 * hps["cosine"]
    assert clip["clamp"] == "per_image" and hps["clamp"] == "none"
    assert clip["num_images"] == hps["num_images"] == 6
    assert res[name]["clip_score"] == clip["x100"] and res[name]["hps_mean"] == hps["x100"]  # the old keys
    assert -1 <= hps["cosine"] <= 1 and 0 <= clip["cosine"] <= 1
  assert res["base"]["hps_mean"] != res["adapted"]["hps_mean"]  # the adapter changed the images
  rows = [
    json.loads(line) for line in (tmp_path / "table4_images" / "adapted" / "images.jsonl").read_text().splitlines()
  ]
  assert {r["negative_prompt"] for r in rows} == {"Weird image."} and [r["seed"] for r in rows] == list(range(6))
  text = out.with_suffix(".md").read_text()
  table = text.splitlines()
  assert table[0] == (
    "| model | images | FID ↓ | Aesthetic ↑ | CLIP score (cos) ↑ | CLIP score (×100) ↑ | HPS (cos) ↑ | HPS (×100) ↑ |"
  )
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:4]}
  assert list(rows) == ["base", "adapted"]
  for name, cells in rows.items():
    r = res[name]
    assert cells == [
      "6",
      f"{r['fid']:.4g}",
      f"{r['aesthetic_mean']:.4g}",
      f"{r['clip']['cosine']:.4g}",
      f"{r['clip']['x100']:.4g}",
      f"{r['hps']['cosine']:.4g}",
      f"{r['hps']['x100']:.4g}",
    ]
  assert table[4] == ""
  assert (
    "clamped at 0 per image" in text and "HPS (cos): mean cos(image, prompt) under the HPS model, not clamped" in text
  )
  settings = table[-1]  # what made the images, under the table
  assert settings.startswith("Settings: 3 prompts × 2 images per model; sampler pndm, 2 steps, guidance 7.5; 32×32 px")
  assert "seed 0 " in settings and "base '', adapted 'Weird image.'" in settings
  for k in ("model", "lora", "clip", "aesthetic", "hps", "stats", "inception"):
    assert str(f[k]) in settings, k
  assert summary["settings"]["hps_checkpoint"] == str(f["hps"]) and summary["settings"]["resize"] == "tf1"


def test_usage_errors(setup, tmp_path, capsys):
  f = setup
  base = [
    "eval-generator",
    "--model",
    str(f["model"]),
    "--prompts",
    str(f["prompts"]),
    "--output",
    str(tmp_path / "x.json"),
  ]
  assert main(base + ["--metrics", "fid"]) == 2
  assert "--reference" in capsys.readouterr().err
  assert main(base + ["--metrics", "nope"]) == 2
  assert main(base + ["--metrics", "hps", "--hps-checkpoint", str(f["hps"]), "--lora", str(tmp_path / "no.st")]) == 2
