"""LoRA files (hps_jax/convert/lora.py) against diffusers / PEFT on the tiny SD folder: our adapters saved as PEFT and
kohya files load into diffusers' pipeline with the same output; a legacy attn-procs .bin written from a PyTorch
PEFT-adapted UNet loads into ours with the same output; exact round trips; merged UNet export; clear errors."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from hps_jax import lora  # noqa: E402
from hps_jax.convert import lora as lora_io  # noqa: E402
from hps_jax.convert.diffusers import load_unet  # noqa: E402
from hps_jax.convert.io import CheckpointError, save_safetensors  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _quiet():
  level = diffusers.utils.logging.get_verbosity()
  diffusers.utils.logging.set_verbosity_error()
  diffusers.utils.logging.disable_progress_bar()
  yield
  diffusers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def inputs():
  rs = np.random.RandomState(0)
  return (rs.randn(2, 8, 8, 4).astype(np.float32), np.array([10, 700]), rs.randn(2, 7, 32).astype(np.float32))


def _ours(model, inputs):
  # eager on purpose: op-by-op compilations are shared between the differently adapted models below, while
  # nnx.jit would compile the whole UNet again for every new set of ranks / alphas / scales (static attributes)
  return np.asarray(model(*inputs))


def _theirs(unet, inputs):
  x, t, c = inputs
  with torch.no_grad():
    out = unet(
      torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
      torch.from_numpy(t),
      encoder_hidden_states=torch.from_numpy(c),
    ).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _mixed_ranks(model):
  """Rank 4 / alpha 8 (scale 2) on most layers; the mid block's attn2 at rank 2 / alpha 3 and its attn1 at rank 2 /
  alpha 8 (so the file needs both a rank and an alpha pattern)."""
  paths = lora.target_paths(model)
  ranks = {p: 2 if p.startswith("mid_block") else 4 for p in paths}
  alphas = {p: 3.0 if (p.startswith("mid_block") and "/attn2/" in p) else 8.0 for p in paths}
  return ranks, alphas


@pytest.fixture(scope="module")
def adapted(tiny_dir, inputs):
  """(our LoRA'd UNet, its output, the base output): random `up` so every adapter contributes."""
  model = load_unet(tiny_dir)
  base = _ours(model, inputs)
  ranks, alphas = _mixed_ranks(model)
  lora.apply_lora(model, ranks=ranks, alphas=alphas)
  for i, m in enumerate(lora.lora_layers(model).values()):
    m.lora_up.set_value(0.2 * jax.random.normal(jax.random.fold_in(jax.random.key(5), i), m.lora_up.shape))
  return model, _ours(model, inputs), base


@pytest.fixture(scope="module")
def pipe(tiny_dir):
  return diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)


def _through_pipeline(pipe, file, inputs):
  pipe.load_lora_weights(str(file))
  try:
    return _theirs(pipe.unet, inputs)
  finally:
    pipe.unload_lora_weights()


def test_adapter_is_visible(adapted):
  _, out, base = adapted
  assert np.abs(out - base).max() > 0.1  # the comparisons below would be vacuous otherwise


def test_peft_file_in_diffusers(adapted, pipe, inputs, tmp_path, parity):
  model, out, _ = adapted
  file = lora.save_peft(model, tmp_path / "ours")
  assert file.name == "pytorch_lora_weights.safetensors"
  pipe.load_lora_weights(str(tmp_path / "ours"))
  try:
    got = _theirs(pipe.unet, inputs)
    # and back: the files diffusers itself writes from the loaded adapter (its LoraConfig as metadata, prefixed
    # `unet.` by the pipeline's saver, unprefixed by the model's) read as our adapters again
    from peft.utils import get_peft_model_state_dict

    name = next(iter(pipe.unet.peft_config))
    pipe.unet.save_lora_adapter(tmp_path / "model_saved", adapter_name=name)
    diffusers.StableDiffusionPipeline.save_lora_weights(
      tmp_path / "pipe_saved",
      unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=name),
      unet_lora_adapter_metadata=pipe.unet.peft_config[name].to_dict(),
    )
  finally:
    pipe.unload_lora_weights()
  parity("LoRA: our save_peft file through diffusers load_lora_weights vs ours", np.abs(got - out).max(), TOL)
  want = lora.get_adapters(model)
  for saved in ("model_saved", "pipe_saved"):
    back, info = lora_io.load_lora(tmp_path / saved)
    assert info["format"] == "peft" and "metadata" in info["alpha_source"]
    _same(back, want)
  np.testing.assert_allclose(_theirs(pipe.unet, inputs), adapted[2], atol=TOL)  # unloaded again: the base


def _same_delta_alpha(adapters, alpha):
  """The same adapters with every alpha set to `alpha` and `up` rescaled so each delta is unchanged."""
  return {
    p: lora.Adapter(a.down, a.up * np.float32((a.alpha / a.rank) / (alpha / a.rank)), alpha)
    for p, a in adapters.items()
  }


def test_kohya_file_in_diffusers(adapted, pipe, inputs, tmp_path, parity):
  """diffusers' kohya conversion (0.42) keys per-module alphas by names that match no module, so a file whose
  alphas differ between layers loads with wrong scales there; we write one alpha (ranks still differ)."""
  model, out, _ = adapted
  file = lora_io.save_kohya(_same_delta_alpha(lora.get_adapters(model), 8.0), tmp_path / "my_lora.safetensors")
  got = _through_pipeline(pipe, file, inputs)
  parity("LoRA: our save_kohya file through diffusers' kohya conversion vs ours", np.abs(got - out).max(), TOL)


@pytest.fixture(scope="module")
def torch_legacy(tiny_dir, inputs, tmp_path_factory):
  """A PyTorch UNet adapted with PEFT (rank 4, attn2 of the mid block rank 2, scale 1 as in the legacy format),
  random A and B; its output and its adapters written in the diffusers-0.13 attn-procs layout with torch.save."""
  unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
  targets = ["to_q", "to_k", "to_v", "to_out.0"]
  mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
  rank_pattern = {f"{mid}.{t}": 2 for t in targets}
  alpha_pattern = dict(rank_pattern)
  unet.add_adapter(
    peft.LoraConfig(
      r=4,
      lora_alpha=4,
      target_modules=targets,
      rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern,
      init_lora_weights=True,
    )
  )
  gen = torch.Generator().manual_seed(0)
  state, n = {}, 0
  for name, module in unet.named_modules():
    if not isinstance(module, peft.tuners.lora.LoraLayer):
      continue
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    with torch.no_grad():
      a.copy_(torch.randn(a.shape, generator=gen) / 4)
      b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    attn, proj = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[: -len(".to_out.0")], "to_out")
    state[f"{attn}.processor.{proj}_lora.down.weight"] = a.detach().clone()
    state[f"{attn}.processor.{proj}_lora.up.weight"] = b.detach().clone()
    n += 1
  assert n == 32
  d = tmp_path_factory.mktemp("legacy")
  torch.save(state, d / "pytorch_lora_weights.bin")
  return d, _theirs(unet, inputs)


def test_legacy_bin_from_pytorch(tiny_dir, torch_legacy, inputs, parity):
  d, want = torch_legacy
  model = load_unet(tiny_dir)
  info = lora.apply_lora_file(model, d)
  assert info["format"] == "attn_procs" and info["layers"] == 32 and info["ranks"] == [2, 4]
  assert info["alphas"] == [2.0, 4.0] and info["alpha_source"].startswith("rank")
  parity(
    "LoRA: legacy attn-procs .bin (PyTorch PEFT UNet) loaded into ours vs PyTorch",
    np.abs(_ours(model, inputs) - want).max(),
    TOL,
  )


def _same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for p in a:
    np.testing.assert_array_equal(a[p].down, b[p].down)
    np.testing.assert_array_equal(a[p].up, b[p].up)
    assert a[p].alpha == b[p].alpha


def test_round_trips(adapted, tmp_path):
  model, _, _ = adapted
  want = lora.get_adapters(model)
  got, info = lora_io.load_lora(lora.save_peft(model, tmp_path / "peft"))
  _same(got, want)
  assert info["format"] == "peft" and info["ranks"] == [2, 4] and info["rank"] is None
  assert info["alphas"] == [3.0, 8.0] and "lora_adapter_metadata" in info["alpha_source"]
  got, info = lora_io.load_lora(lora_io.save_kohya(want, tmp_path / "kohya.safetensors"))
  _same(got, want)
  assert info["format"] == "kohya" and info["alpha_source"] == "alpha keys"
  got, _ = lora.load_lora(lora_io.save_kohya(want, tmp_path / "kohya_resolved.safetensors"), model=model)
  _same(got, want)
  # the legacy layout folds alpha / r into `up`: same delta, alpha = r
  got, info = lora_io.load_lora(lora_io.save_legacy(want, tmp_path / "legacy"))
  assert info["format"] == "attn_procs" and got.keys() == want.keys()
  for p, a in want.items():
    assert got[p].alpha == got[p].rank == a.rank
    np.testing.assert_allclose(got[p].down @ got[p].up, a.alpha / a.rank * (a.down @ a.up), rtol=1e-6, atol=1e-7)
  # fp16 files, and a PEFT file without metadata (alpha = rank), and unprefixed / base_model.model. keys
  got, _ = lora_io.load_lora(lora_io.save_kohya(want, tmp_path / "half.safetensors", fp16=True))
  for p, a in want.items():
    np.testing.assert_array_equal(got[p].up, a.up.astype(np.float16).astype(np.float32))
  plain = {f"base_model.model.{lora_io.module_name(p)}.lora_A.weight": a.down.T for p, a in want.items()}
  plain.update({f"{lora_io.module_name(p)}.lora_B.weight": a.up.T for p, a in want.items()})
  save_safetensors(plain, tmp_path / "plain.safetensors")
  got, info = lora_io.load_lora(tmp_path / "plain.safetensors")
  assert info["alpha_source"].startswith("rank")
  assert all(got[p].alpha == a.rank for p, a in want.items())


def test_kohya_names_parse_without_a_model(adapted):
  model, _, _ = adapted
  from hps_jax.lora import _linears

  for p, _ in _linears(model):  # every linear layer of the UNet, ff/net/0/proj and time_embedding included
    assert lora_io._parse_kohya(lora_io.kohya_name(p)[len("lora_unet_") :]) == lora_io.module_name(p)


def test_apply_lora_file_and_scale(tiny_dir, adapted, inputs, tmp_path, parity):
  model, out, base = adapted
  file = lora.save_peft(model, tmp_path)
  fresh = load_unet(tiny_dir)
  lora.apply_lora(fresh, lora.LoRAConfig(rank=8, targets=r".*attn1/to_q|.*ff/net/2"))  # replaced / removed
  info = lora.apply_lora_file(fresh, file)
  assert set(lora.lora_layers(fresh)) == set(lora.lora_layers(model)) and info["layers"] == 32
  parity("LoRA: apply_lora_file(save_peft(model)) vs model", np.abs(_ours(fresh, inputs) - out).max(), 1e-6)
  lora.set_lora_scale(fresh, 0.0)
  np.testing.assert_allclose(_ours(fresh, inputs), base, atol=1e-6)
  lora.apply_lora_file(fresh, file, multiplier=0.5)
  assert all(m.scale == 0.5 * m.alpha / m.rank for m in lora.lora_layers(fresh).values())
  # a kohya file that also adapts a 1x1 conv (proj_in of SD 1.x): a clear error, and the model is left alone
  conv = {
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((2, 32, 1, 1), np.float32),
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.ones((32, 2, 1, 1), np.float32),
  }
  save_safetensors(conv, tmp_path / "locon.safetensors")
  with pytest.raises(CheckpointError, match=r"locon\.safetensors.*not linear.*down_blocks/0/attentions/0/proj_in"):
    lora.apply_lora_file(fresh, tmp_path / "locon.safetensors")
  assert set(lora.lora_layers(fresh)) == set(lora.lora_layers(model))


def test_save_merged_unet(adapted, inputs, tmp_path, parity):
  model, out, _ = adapted
  kernels = {p: np.asarray(m.kernel[...]) for p, m in lora.lora_layers(model).items()}
  d = lora.save_merged_unet(model, tmp_path / "unet")
  assert all(not m.merged for m in lora.lora_layers(model).values())  # the model is left as it was
  for p, m in lora.lora_layers(model).items():
    np.testing.assert_array_equal(np.asarray(m.kernel[...]), kernels[p])
  merged = load_unet(d, subfolder=None)
  assert not lora.lora_layers(merged)
  parity(
    "LoRA: save_merged_unet reloaded (plain UNet) vs adapted model", np.abs(_ours(merged, inputs) - out).max(), TOL
  )
  theirs = diffusers.UNet2DConditionModel.from_pretrained(d)
  parity(
    "LoRA: save_merged_unet loaded by diffusers vs adapted model", np.abs(_theirs(theirs, inputs) - out).max(), TOL
  )


def test_errors_and_skipped_keys(tmp_path):
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  a, b = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)
  save_safetensors(
    {f"unet.{name}.lora_A.weight": a, f"unet.{name}.lora_B.weight": b, "unet.conv_in.weird_thing": a},
    tmp_path / "bad.safetensors",
  )
  with pytest.raises(CheckpointError, match=r"bad\.safetensors.*unet\.conv_in\.weird_thing"):
    lora_io.load_lora(tmp_path / "bad.safetensors")
  save_safetensors({f"unet.{name}.lora_A.weight": a}, tmp_path / "half.safetensors")
  with pytest.raises(CheckpointError, match="only one of the down / up"):
    lora_io.load_lora(tmp_path / "half.safetensors")
  save_safetensors(
    {f"unet.{name}.lora_A.weight": a, f"unet.{name}.lora_B.weight": b, f"unet.{name}.lora_magnitude_vector": b[:, 0]},
    tmp_path / "dora.safetensors",
  )
  with pytest.raises(CheckpointError, match="unsupported adapter type"):
    lora_io.load_lora(tmp_path / "dora.safetensors")
  kohya = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": a,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": b,
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": np.asarray(1.0, np.float32),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": a,
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": b,
  }
  save_safetensors(kohya, tmp_path / "k.safetensors")
  got, info = lora_io.load_lora(tmp_path / "k.safetensors")
  assert info["skipped_text_encoder"] == 2 and list(got) == [name.replace(".", "/")]
  assert got[name.replace(".", "/")].alpha == 1.0 and got[name.replace(".", "/")].rank == 2
  save_safetensors({k: v for k, v in kohya.items() if k.startswith("lora_te")}, tmp_path / "te.safetensors")
  with pytest.raises(CheckpointError, match="no UNet LoRA weights.*2 text-encoder"):
    lora_io.load_lora(tmp_path / "te.safetensors")
  with pytest.raises(CheckpointError, match="no LoRA weights file"):
    lora_io.load_lora(tmp_path)  # several .safetensors, none with a standard name


def test_peft_adapter_folder_with_rslora(tmp_path):
  """A PEFT `save_pretrained` folder: adapter_model.safetensors with an adapter name in the keys, and
  adapter_config.json holding alpha (rsLoRA: scale alpha / sqrt(r), i.e. our alpha = lora_alpha * sqrt(r))."""
  import json

  name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
  a, b = np.full((2, 32), 0.5, np.float32), np.full((32, 2), 0.25, np.float32)
  save_safetensors(
    {f"base_model.model.{name}.lora_A.default.weight": a, f"base_model.model.{name}.lora_B.default.weight": b},
    tmp_path / "adapter_model.safetensors",
  )
  (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 6, "use_rslora": True}))
  got, info = lora_io.load_lora(tmp_path)
  ad = got[name.replace(".", "/")]
  assert info["alpha_source"].endswith("adapter_config.json") and info["rank"] == 2
  np.testing.assert_array_equal(ad.down, a.T)
  assert abs(ad.alpha / ad.rank - 6 / np.sqrt(2)) < 1e-12
