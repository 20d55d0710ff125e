"""End to end: a tiny random Stable Diffusion written in the diffusers folder layout by diffusers itself; our
sampler's images equal `StableDiffusionPipeline`'s (PNDM and DDIM, CFG with a negative prompt) from the same initial
latents; the same seed gives the same image whatever the batch."""

import numpy as np
import pytest

from hps_jax.data.tokenizer import CLIPTokenizer
from tests.refs import randomize_

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle on a table", "an astronaut riding a horse"]
NEGATIVE = "Weird image. "
H = W = 32  # VAE factor 4 -> 8x8 latents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("sd_tiny")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,
  )
  vae = diffusers.AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
  )
  text = transformers.CLIPTextModel(
    transformers.CLIPTextConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=77,
      vocab_size=49408,
      hidden_act="quick_gelu",
    )
  )
  for i, m in enumerate((unet, vae, text)):
    randomize_(m.eval(), seed=10 + i, std=0.05)
  ours_tok = CLIPTokenizer.default()
  vocab = {
    {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(k, k): v
    for k, v in ours_tok.vocab.items()
  }
  merges = [m for m, _ in sorted(ours_tok.ranks.items(), key=lambda kv: kv[1])]
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
  sched = diffusers.PNDMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
  )
  pipe = diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text,
    tokenizer=tok,
    unet=unet,
    scheduler=sched,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(d)
  return d, pipe


def _reference(pipe, latents_nhwc, scheduler, steps):
  if scheduler == "ddim":
    # SD 1.x configs say clip_sample=false; DDIM defaults to true when the key is absent (a PNDM config)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
  else:
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
  lat = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = pipe(
      PROMPTS,
      negative_prompt=[NEGATIVE] * len(PROMPTS),
      latents=lat,
      num_inference_steps=steps,
      guidance_scale=7.5,
      height=H,
      width=W,
      output_type="np",
    )
  return out.images


@pytest.mark.parametrize("scheduler, steps", [("pndm", 10), ("ddim", 8)])
def test_images_match_diffusers_pipeline(model_dir, scheduler, steps, parity):
  from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion

  d, pipe = model_dir
  sd = StableDiffusion.from_pretrained(d)
  latents = np.asarray(sd.initial_latents([1, 2], H, W))
  got = sd.sample(
    PROMPTS,
    [1, 2],
    SampleConfig(steps=steps, guidance=7.5, scheduler=scheduler, height=H, width=W),
    negative_prompt=NEGATIVE,
    latents=latents,
    output="float",
  )
  want = _reference(pipe, latents, scheduler, steps)
  assert got.shape == want.shape == (2, H, W, 3)
  parity(
    f"SD sampler ({scheduler}, {steps} steps, CFG 7.5, negative prompt) vs StableDiffusionPipeline",
    np.abs(got - want).max(),
    1e-3,
  )


def test_same_seed_same_image_at_any_batch(model_dir):
  from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion

  d, _ = model_dir
  sd = StableDiffusion.from_pretrained(d)
  cfg = SampleConfig(steps=4, height=H, width=W)
  one = sd.sample(["a red circle on a table"], [7], cfg, negative_prompt=NEGATIVE, output="float")
  many = sd.sample(
    ["x"] * 3 + ["a red circle on a table"] + ["y"] * 4,
    [0, 1, 2, 7, 3, 4, 5, 6],
    cfg,
    negative_prompt=NEGATIVE,
    output="float",
  )
  assert many.shape == (8, H, W, 3)
  # equal up to float rounding of a different batch layout (a bit-exact match is not promised by XLA)
  np.testing.assert_allclose(one[0], many[3], rtol=0, atol=1e-5)
  assert np.abs(many[0] - many[1]).max() > 1e-2  # other seeds, other images
  assert sd.sample(["a"], [7], cfg).dtype == np.uint8


def test_sample_command(model_dir, tmp_path):
  import json

  from PIL import Image

  from hps_jax.cli import main as cli
  from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion

  d, _ = model_dir
  (tmp_path / "prompts.txt").write_text("a red circle on a table\n\nan astronaut riding a horse\n")
  rc = cli(
    [
      "sample",
      "--model",
      str(d),
      "--prompts",
      str(tmp_path / "prompts.txt"),
      "--negative-prompt",
      NEGATIVE,
      "--steps",
      "4",
      "--num-images",
      "2",
      "--seed",
      "5",
      "--height",
      str(H),
      "--width",
      str(W),
      "--batch-size",
      "3",
      "--grid",
      "--outdir",
      str(tmp_path / "out"),
    ]
  )
  assert rc == 0
  rows = [json.loads(l) for l in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
  assert [(r["prompt"], r["seed"]) for r in rows] == [
    ("a red circle on a table", 5),
    ("a red circle on a table", 6),
    ("an astronaut riding a horse", 7),
    ("an astronaut riding a horse", 8),
  ]
  assert rows[0]["negative_prompt"] == NEGATIVE and rows[0]["steps"] == 4
  img = np.asarray(Image.open(tmp_path / "out" / rows[2]["file"]))
  want = StableDiffusion.from_pretrained(d).sample(
    ["an astronaut riding a horse"], [7], SampleConfig(steps=4, height=H, width=W), negative_prompt=NEGATIVE
  )
  assert np.abs(img.astype(int) - want[0].astype(int)).max() <= 1
  assert Image.open(tmp_path / "out" / "grid.png").size == (2 * W, 2 * H)
