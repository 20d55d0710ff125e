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
  assert res["base"]["hps_mean"] != res["adapted"]["hps_mean"]  # the adapter changed the images
  rows = [
    json.loads(line) for line in (tmp_path / "table4_images" / "adapted" / "images.jsonl").read_text().splitlines()
  ]
  assert {r["negative_prompt"] for r in rows} == {"Weird image."} and [r["seed"] for r in rows] == list(range(6))
  table = out.with_suffix(".md").read_text().splitlines()
  assert table[0] == "| model | FID ↓ | Aesthetic ↑ | CLIP score ↑ | HPS ↑ |"
  assert [line.split("|")[1].strip() for line in table[2:]] == ["base", "adapted"]
  assert f"{res['adapted']['hps_mean']:.4g}" in table[3]


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
