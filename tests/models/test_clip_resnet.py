"""CLIP's ModifiedResNet image tower (OpenAI RN50 ... RN50x64, Table 2's CLIP RN50x64 row): parity of the NNX model
against open_clip's `ModifiedResNet` CLIP on the same random weights, through every way the weights arrive (an
open_clip state dict, the OpenAI layout through open_clip's OpenAI builder), and the architecture read back from
the shapes."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.convert import clip as cc
from hps_jax.convert.io import CheckpointError
from hps_jax.models.clip import CLIPConfig
from tests.refs import open_clip_resnet, random_images

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse, highly detailed " * 6, "Weird image. a bowl"]
TOL = 1e-4


def _tokens(n):
  return open_clip.tokenize(PROMPTS[:n]).numpy().astype(np.int32)


def _hps(img, txt):
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  return 100 * (img * txt).sum(-1)


def _reference(ref, images, ids):
  with torch.no_grad():
    ri = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).float().numpy()
    rt = ref.encode_text(torch.from_numpy(ids).long()).float().numpy() if ids is not None else None
  return ri, rt


def _check(parity, label, model, ref, images, ids, tol=TOL):
  ri, rt = _reference(ref, images, ids)
  oi = np.asarray(model.encode_image(jnp.asarray(images)))
  parity(f"{label}: image embedding", np.abs(oi - ri).max(), tol)
  if ids is not None:
    ot = np.asarray(model.encode_text(jnp.asarray(ids)))
    parity(f"{label}: text embedding", np.abs(ot - rt).max(), tol)
    parity(f"{label}: HPS (x100 cosine)", np.abs(_hps(oi, ot) - _hps(ri, rt)).max(), 1e-3)


def _state_dict(ref) -> dict:
  return {k: v.detach().numpy() for k, v in ref.state_dict().items()}


def test_tiny_resnet_open_clip_parity(tmp_path, parity):
  """An open_clip state dict ({'state_dict': ...} as HPS v2 saves it), architecture inferred from its shapes."""
  cfg = CLIPConfig.tiny_resnet()
  ref = open_clip_resnet(cfg, seed=1)
  torch.save({"state_dict": ref.state_dict()}, tmp_path / "rn.pt")
  model = cc.load_clip(tmp_path / "rn.pt")
  assert model.config == cfg.replace(logit_scale_init=model.config.logit_scale_init)
  assert model.config.is_resnet and model.config.activation == "quick_gelu"
  _check(parity, "open_clip ModifiedResNet CLIP tiny", model, ref, random_images(4, 64, seed=2), _tokens(4))


def test_openai_layout_through_open_clip_openai_builder(tmp_path, parity):
  """The OpenAI state-dict layout (what `RN50x64.pt` holds) given to open_clip's builder for OpenAI weights, and to
  ours (`format='openai'`); a layer2-deep variant so stages with several blocks are covered."""
  cfg = CLIPConfig.tiny_resnet(resnet_layers=(2, 3, 1, 2), image_size=96)
  src = open_clip_resnet(cfg, seed=3).state_dict()
  ref = open_clip.model.build_model_from_openai_state_dict(dict(src), quick_gelu=True, cast_dtype=None).float()
  ref.load_state_dict(src)  # the builder rounds weights through fp16, as OpenAI's release is; restore fp32 values
  ref.eval()
  torch.save(src, tmp_path / "RN.pt")
  for fmt in ("openai", "auto"):
    model = cc.load_clip(tmp_path / "RN.pt", fmt)
    assert model.config.resnet_layers == (2, 3, 1, 2) and model.config.image_size == 96
    _check(
      parity,
      f"OpenAI-layout ResNet CLIP via open_clip's OpenAI builder ({fmt})",
      model,
      ref,
      random_images(2, 96, seed=4),
      _tokens(2),
    )


def test_round_trip_and_batch_stats():
  """openai state dict -> our params -> state dict is exact (BatchNorm running statistics included; the
  `num_batches_tracked` counters carry nothing and are dropped); the statistics are BatchStats, not Params."""
  from flax import nnx

  cfg = CLIPConfig.tiny_resnet()
  sd = _state_dict(open_clip_resnet(cfg, seed=5))
  flat = cc.params_from_openai(sd, cfg)
  back = cc.params_to_openai(flat, cfg)
  assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
  assert all(np.array_equal(back[k], sd[k]) for k in back)
  model = cc.build_model(cfg, flat)
  stats = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
  assert len(stats) == 2 * sum(1 for k in sd if k.endswith("running_mean"))
  assert not any(str(p[-1]) in ("mean", "var") for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_inferred_configs_of_the_released_architectures():
  """The five released ResNet CLIPs' shapes (open_clip builds them; only shapes are read, no weights) infer back
  to our presets."""
  from open_clip.model import CLIPTextCfg, CLIPVisionCfg

  for name in ("rn50", "rn101", "rn50x4", "rn50x16", "rn50x64"):
    cfg = CLIPConfig.preset(name)
    with torch.device("meta"):
      ref = open_clip.model.CLIP(
        cfg.embed_dim,
        CLIPVisionCfg(layers=cfg.resnet_layers, width=cfg.vision_width, image_size=cfg.image_size),
        CLIPTextCfg(width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers),
        quick_gelu=True,
      )
    shapes = {k: _Shape(tuple(v.shape)) for k, v in ref.state_dict().items()}
    assert cc.infer_openai_config(shapes) == cfg, name


class _Shape:
  def __init__(self, shape):
    self.shape = shape


def test_bad_resnet_state_dicts_are_refused():
  cfg = CLIPConfig.tiny_resnet()
  sd = _state_dict(open_clip_resnet(cfg, seed=6))
  gap = {k: v for k, v in sd.items() if not k.startswith("visual.layer3.")}
  with pytest.raises(CheckpointError, match="visual.layer3.0.conv1.weight"):
    cc.infer_openai_config(gap)
  odd = dict(sd, **{"visual.attnpool.positional_embedding": np.zeros((7, 512), np.float32)})
  with pytest.raises(CheckpointError, match="1 \\+ a square"):
    cc.infer_openai_config(odd)
  extra = dict(sd, **{"visual.layer1.0.conv4.weight": np.zeros((1,), np.float32)})
  with pytest.raises(CheckpointError, match="unexpected keys"):
    cc.params_from_openai(extra, cfg)
  with pytest.raises(CheckpointError, match="transformers has no ResNet CLIP"):
    cc.save_hf(cc.build_model(cfg, cc.params_from_openai(sd, cfg)), "unused")


def test_rn50_full_config_parity(tmp_path, parity):
  """The full RN50 architecture (224 px, stages 3-4-6-3, 64 wide; 102M parameters), one state dict from open_clip."""
  cfg = CLIPConfig.rn50()
  ref = open_clip_resnet(cfg, seed=7)
  torch.save(ref.state_dict(), tmp_path / "RN50.pt")
  model = cc.load_clip(tmp_path / "RN50.pt")
  assert model.config == cfg.replace(logit_scale_init=model.config.logit_scale_init)
  _check(parity, "open_clip RN50 (full config)", model, ref, random_images(2, 224, seed=8), _tokens(2))


@pytest.mark.skipif(
  not os.environ.get("HPS_JAX_RN50X64"),
  reason="the full RN50x64 (623M parameters) takes minutes on CPU: set HPS_JAX_RN50X64=1 to run it",
)
def test_rn50x64_full_config_parity(tmp_path, parity):
  """The full RN50x64 (448 px, stages 3-15-36-10, 128 wide, 1024-d text): a state dict written by open_clip loads
  into the architecture inferred from it and matches on one image."""
  cfg = CLIPConfig.rn50x64()
  ref = open_clip_resnet(cfg, seed=9)
  torch.save(ref.state_dict(), tmp_path / "RN50x64.pt")
  model = cc.load_clip(tmp_path / "RN50x64.pt")
  assert model.config == cfg.replace(logit_scale_init=model.config.logit_scale_init)
  _check(parity, "open_clip RN50x64 (full config)", model, ref, random_images(1, 448, seed=10), _tokens(1))


def test_scorer_with_clip_preprocessing_matches_open_clip_end_to_end(tmp_path, parity):
  """`Scorer.from_checkpoint(..., preprocess='clip')` on image files: CLIP's own preprocessing at the model's
  resolution (bicubic short side + center crop; 448 for RN50x64, 96 here) and the ResNet tower give open_clip's HPS
  for the same files through open_clip's own eval transform."""
  from PIL import Image

  from hps_jax.preference.scorer import Scorer

  cfg = CLIPConfig.tiny_resnet(image_size=96)
  ref = open_clip_resnet(cfg, seed=11)
  torch.save(ref.state_dict(), tmp_path / "RN.pt")
  rng = np.random.default_rng(12)
  paths = []
  for i, (w, h) in enumerate(((160, 120), (97, 300), (96, 96))):
    paths.append(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
  prompt = "a red bicycle leaning on a wall"
  scorer = Scorer.from_checkpoint(tmp_path / "RN.pt", preprocess="clip", batch_size=4)
  ours = scorer.score(paths, prompt)
  transform = open_clip.image_transform(96, is_train=False)
  with torch.no_grad():
    img = ref.encode_image(torch.stack([transform(Image.open(p)) for p in paths])).numpy()
    txt = ref.encode_text(open_clip.tokenize([prompt])).numpy()
  parity(
    "Scorer(clip preprocessing) on a ResNet CLIP vs open_clip's transform + model: HPS",
    np.abs(ours - _hps(img, np.repeat(txt, 3, 0))).max(),
    1e-3,
  )
