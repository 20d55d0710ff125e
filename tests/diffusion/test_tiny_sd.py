"""The tiny SD folder our own savers write (hps_jax.diffusion.tiny, used by the demo, notebooks and LoRA tests) is a
real diffusers checkpoint: diffusers' `StableDiffusionPipeline.from_pretrained` and transformers' `CLIPTokenizer`
load it, and the pipeline's image equals our sampler's from the same latents."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "Weird image. a dog on the moon, trending on artstation"]


def test_tokenizer_folder_round_trip(tiny_dir):
  from hps_jax.data.tokenizer import CLIPTokenizer

  theirs = transformers.CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
  ours = CLIPTokenizer.from_hf_dir(tiny_dir / "tokenizer")
  want = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(np.asarray(ours(PROMPTS)), np.asarray(want))
  assert theirs.model_max_length == 77


def test_diffusers_pipeline_loads_and_matches(tiny_dir, parity):
  from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
  sd = StableDiffusion.from_pretrained(tiny_dir)
  latents = np.asarray(sd.initial_latents([0, 1], 32, 32))
  got = sd.sample(
    PROMPTS,
    [0, 1],
    SampleConfig(steps=4, guidance=7.5, height=32, width=32),
    negative_prompt="Weird image. ",
    latents=latents,
    output="float",
  )
  with torch.no_grad():
    want = pipe(
      PROMPTS,
      negative_prompt=["Weird image. "] * 2,
      num_inference_steps=4,
      guidance_scale=7.5,
      height=32,
      width=32,
      output_type="np",
      latents=torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))),
    ).images
  parity("tiny SD folder (our savers) through diffusers' pipeline vs our sampler", np.abs(got - want).max(), 1e-3)
