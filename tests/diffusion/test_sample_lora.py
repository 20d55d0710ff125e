"""`hps-jax sample` with a LoRA: the adapted images differ from the base's, scale 0 is exactly the base model, the
A/B mode renders both from the same seeds (and equals the two separate runs), best-of-N keeps the candidate with the
highest HPS (as re-scored from the saved PNG)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hps_jax import lora
from hps_jax.cli import main
from hps_jax.diffusion.render import GridLayout

STEPS = ["--steps", "2", "--height", "32", "--width", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from hps_jax.convert.clip import save_hf
  from hps_jax.convert.diffusers import load_unet
  from hps_jax.diffusion.tiny import write_tiny_sd
  from hps_jax.lora import save_peft
  from hps_jax.models.clip import CLIP, CLIPConfig

  d = tmp_path_factory.mktemp("sample_lora")
  model = write_tiny_sd(d / "sd", seed=1)
  unet = load_unet(model)
  lora.apply_lora(unet, lora.LoRAConfig(rank=4, alpha=2.0))
  for i, m in enumerate(lora.lora_layers(unet).values()):
    m.lora_up.set_value(0.3 * jax.random.normal(jax.random.key(i), m.lora_up.shape))
  adapter = save_peft(unet, d / "adapter" / "pytorch_lora_weights.safetensors")
  save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), d / "hps")
  (d / "prompts.txt").write_text("a red circle\na photo of a blue square\n")
  return d, model, adapter


def _run(*args):
  assert main([str(a) for a in args]) == 0


def _images(folder):
  rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
  return rows, np.stack([np.asarray(Image.open(folder / r["file"])) for r in rows])


def test_lora_ab_and_scale(setup, tmp_path):
  d, model, adapter = setup
  common = ["sample", "--model", model, "--prompts", d / "prompts.txt", "--num-images", "2", *STEPS]
  _run(*common, "--outdir", tmp_path / "base")
  _run(*common, "--lora", adapter, "--negative-prompt", "Weird image.", "--outdir", tmp_path / "adapted")
  _run(*common, "--lora", adapter, "--lora-scale", "0", "--outdir", tmp_path / "scale0")
  _run(*common, "--lora", adapter, "--negative-prompt", "Weird image.", "--ab", "--outdir", tmp_path / "ab")
  base_rows, base = _images(tmp_path / "base")
  _, adapted = _images(tmp_path / "adapted")
  _, scale0 = _images(tmp_path / "scale0")
  ab_rows, ab_base = _images(tmp_path / "ab" / "base")
  _, ab_adapted = _images(tmp_path / "ab" / "adapted")
  assert [r["seed"] for r in base_rows] == [0, 1, 2, 3] == [r["seed"] for r in ab_rows]
  np.testing.assert_array_equal(scale0, base)  # scale 0 = the base model exactly
  np.testing.assert_array_equal(ab_base, base)  # A/B = the two separate runs
  np.testing.assert_array_equal(ab_adapted, adapted)
  assert np.abs(adapted.astype(int) - base.astype(int)).mean() > 1  # the adapter changes the images
  grid = np.asarray(Image.open(tmp_path / "ab" / "ab_grid.png"))
  layout = GridLayout(tile_h=256, tile_w=256, scale=8)  # 32 px tiles enlarged 8x (nearest) to be readable
  assert grid.shape == (layout.header + 4 * (256 + layout.caption), 2 * 256 + layout.gap, 3)
  for col, images in ((0, base), (1, adapted)):  # row = image, left = base, right = adapted
    t, l, b, r = layout.box(1, col)
    np.testing.assert_array_equal(grid[t:b:8, l:r:8], images[1])
  t, l, b, r = layout.box(1, 0)
  caption = grid[b : b + layout.caption, : 2 * 256]
  assert (caption < 128).any()  # the prompt is written under the row
  assert (
    ab_rows[0]["negative_prompt"] == ""
    and _images(tmp_path / "ab" / "adapted")[0][0]["negative_prompt"] == "Weird image."
  )


def test_best_of_keeps_the_highest_hps(setup, tmp_path):
  from hps_jax.preference.scorer import Scorer

  d, model, _ = setup
  _run(
    "sample",
    "--model",
    model,
    "--prompt",
    "a green triangle",
    "--num-images",
    "2",
    "--best-of",
    "3",
    "--scorer",
    d / "hps",
    *STEPS,
    "--outdir",
    tmp_path / "best",
  )
  rows, images = _images(tmp_path / "best")
  scorer = Scorer.from_checkpoint(d / "hps")
  for row, img in zip(rows, images):
    cands = row["candidates"]
    assert [c["seed"] for c in cands] == [row["seed"] // 3 * 3 + c for c in range(3)]
    assert row["hps"] == max(c["hps"] for c in cands) and len({c["hps"] for c in cands}) == 3
    assert abs(float(scorer.score([img], [row["prompt"]])[0]) - row["hps"]) < 1e-4


def test_usage_errors(setup, tmp_path, capsys):
  d, model, _ = setup
  assert main(["sample", "--model", str(model), "--prompt", "x", "--ab", "--outdir", str(tmp_path)]) == 2
  assert "--ab compares the base model with its LoRA" in capsys.readouterr().err
  assert main(["sample", "--model", str(model), "--prompt", "x", "--best-of", "2", "--outdir", str(tmp_path)]) == 2
  assert (
    main(
      [
        "sample",
        "--model",
        str(model),
        "--prompt",
        "x",
        "--lora",
        str(tmp_path / "nope.safetensors"),
        "--outdir",
        str(tmp_path),
      ]
    )
    == 2
  )


def test_size_defaults_to_the_model_and_is_checked_before_sampling(setup, tmp_path, capsys):
  """No --height / --width: the model's native size (tiny SD: 8 latents x VAE factor 4 = 32 px), not 512; a size
  that is not a multiple of the VAE factor is a one-line usage error before anything compiles."""
  _, model, _ = setup
  _run("sample", "--model", model, "--prompt", "a red circle", "--steps", "2", "--outdir", tmp_path / "native")
  rows, images = _images(tmp_path / "native")
  assert images.shape == (1, 32, 32, 3) and rows[0]["height"] == rows[0]["width"] == 32
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:  # argparse: image sides are multiples of 8 (SD's VAE factor)
    main(["sample", "--model", str(model), "--prompt", "x", "--height", "33", "--outdir", str(tmp_path / "x")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--height: expected an integer in [8, 8192], a multiple of 8, got 33" in err and "Traceback" not in err
  assert not (tmp_path / "x").exists()  # checked before anything was written
