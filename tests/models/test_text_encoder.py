"""Stable Diffusion's text encoder (`text_encoder/`, a transformers CLIPTextModel) loaded into our CLIP text tower:
hidden states equal transformers', ids from the pipeline's `tokenizer/` dir equal transformers'."""

import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.convert import clip as cc
from hps_jax.convert import diffusers as cd
from hps_jax.convert.io import CheckpointError
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.models.clip import CLIPConfig
from tests.refs import randomize_

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of an astronaut riding a horse", "Weird image. a bowl of fruit", "", "word " * 90]


def _text_model(seed=0):
  cfg = CLIPConfig.tiny()
  tc = cc.config_to_hf(cfg)["text_config"]
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tc)).eval()
  return randomize_(model, seed), cfg


def test_hidden_states_match_clip_text_model(tmp_path, parity):
  ref, cfg = _text_model(seed=4)
  ref.save_pretrained(tmp_path / "text_encoder")
  enc = cd.load_text_encoder(tmp_path / "text_encoder")
  assert enc.config.text_width == cfg.text_width and enc.config.activation == cfg.activation
  ids = CLIPTokenizer.default()(PROMPTS)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
  got = np.asarray(enc(jnp.asarray(ids)))
  assert got.shape == want.shape == (len(PROMPTS), 77, cfg.text_width)
  parity("CLIPTextModel (SD text_encoder/) last_hidden_state", np.abs(got - want).max(), 1e-4)
  # state dict round trip is exact
  sd = {
    (k if k.startswith("text_model.") else f"text_model.{k}"): v.numpy()
    for k, v in ref.state_dict().items()
    if not k.endswith("position_ids")
  }
  back = cd.text_encoder_state_dict(enc)
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  # the released SD layout (keys prefixed `text_model.`, as older transformers wrote them) loads the same
  import shutil

  from hps_jax.convert.io import save_safetensors

  (tmp_path / "released").mkdir()
  shutil.copy(tmp_path / "text_encoder" / "config.json", tmp_path / "released" / "config.json")
  save_safetensors(back, tmp_path / "released" / "model.safetensors")
  again = np.asarray(cd.load_text_encoder(tmp_path / "released")(jnp.asarray(ids)))
  np.testing.assert_array_equal(again, got)


def test_pipeline_tokenizer_dir_matches_transformers(tmp_path):
  """SD's `tokenizer/` holds an HF CLIPTokenizer; the pipeline pads to 77 with the end token."""
  ours = CLIPTokenizer.default()
  vocab = {
    {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(k, k): v for k, v in ours.vocab.items()
  }
  merges = [m for m, _ in sorted(ours.ranks.items(), key=lambda kv: kv[1])]
  hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  hf.save_pretrained(tmp_path / "tokenizer")
  tok = CLIPTokenizer.from_hf_dir(tmp_path / "tokenizer")
  want = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(tok(PROMPTS), want)


def test_errors(tmp_path):
  ref, _ = _text_model()
  ref.save_pretrained(tmp_path / "te")
  with pytest.raises(CheckpointError, match="config.json"):
    cd.load_text_encoder(tmp_path)
  full = cc.config_to_hf(CLIPConfig.tiny())
  transformers.CLIPModel(transformers.CLIPConfig.from_dict(full)).save_pretrained(tmp_path / "clip")
  with pytest.raises(CheckpointError, match="clip_text_model"):
    cd.load_text_encoder(tmp_path / "clip")
