"""The LAION aesthetic predictor on its real published weights, against the PyTorch MLP it was saved from."""

import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.convert.aesthetic import aesthetic_params, load_aesthetic
from hps_jax.convert.io import CheckpointError

torch = pytest.importorskip("torch")
nn = torch.nn

FILES = {"linear": "sac+logos+ava1-l14-linearMSE.pth", "relu": "ava+logos-l14-reluMSE.pth"}


def reference_mlp(variant):
  """The predictor's torch module layout, rebuilt from its description (Linear/Dropout[/ReLU] Sequential)."""
  if variant == "linear":
    layers = [
      nn.Linear(768, 1024),
      nn.Dropout(0.2),
      nn.Linear(1024, 128),
      nn.Dropout(0.2),
      nn.Linear(128, 64),
      nn.Dropout(0.1),
      nn.Linear(64, 16),
      nn.Linear(16, 1),
    ]
  else:
    layers = [
      nn.Linear(768, 1024),
      nn.ReLU(),
      nn.Dropout(0.2),
      nn.Linear(1024, 128),
      nn.ReLU(),
      nn.Dropout(0.2),
      nn.Linear(128, 64),
      nn.ReLU(),
      nn.Dropout(0.1),
      nn.Linear(64, 16),
      nn.ReLU(),
      nn.Linear(16, 1),
    ]
  m = nn.Module()
  m.layers = nn.Sequential(*layers)
  return m.eval()


@pytest.mark.parametrize("variant", sorted(FILES))
def test_real_weights_parity(variant, aesthetic_weights, parity):
  path = aesthetic_weights / FILES[variant]
  ref = reference_mlp(variant)
  ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  ours = load_aesthetic(path)
  assert ours.variant == variant and ours.dims == (768, 1024, 128, 64, 16, 1)
  emb = np.random.default_rng(0).standard_normal((16, 768)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  with torch.no_grad():
    expected = ref.layers(torch.from_numpy(emb))[:, 0].numpy()
  got = np.asarray(ours(jnp.asarray(emb)))
  parity(f"aesthetic head {variant} (real weights) vs torch", np.abs(got - expected).max(), 1e-5)
  # the two heads are different functions of the embedding
  assert np.abs(expected).max() > 0


def test_variants_differ_and_bad_files(aesthetic_weights, tmp_path):
  emb = jnp.asarray(np.eye(768, dtype=np.float32)[:4])
  a = np.asarray(load_aesthetic(aesthetic_weights / FILES["linear"])(emb))
  b = np.asarray(load_aesthetic(aesthetic_weights / FILES["relu"])(emb))
  assert np.abs(a - b).max() > 1e-3
  with pytest.raises(CheckpointError, match="not a LAION aesthetic MLP"):
    aesthetic_params({"layers.1.weight": np.zeros((2, 2)), "layers.1.bias": np.zeros(2)}, "x.pth")


@pytest.mark.parametrize("variant", ["linear", "relu"])
def test_save_round_trip_into_the_torch_head(variant, tmp_path, parity):
  """save_aesthetic writes the LAION layout: the torch head loads it strictly and rates like ours."""
  torch = pytest.importorskip("torch")
  from flax import nnx
  from safetensors.torch import load_file

  from hps_jax.convert.aesthetic import save_aesthetic
  from hps_jax.models.aesthetic import AestheticMLP

  ours = AestheticMLP(variant=variant, rngs=nnx.Rngs(3))
  path = save_aesthetic(ours, tmp_path / "head.safetensors")
  head = reference_mlp(variant)
  head.load_state_dict(load_file(str(path)), strict=True)
  emb = np.random.default_rng(1).standard_normal((6, 768)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  with torch.no_grad():
    want = head.layers(torch.from_numpy(emb))[:, 0].numpy()
  parity(f"aesthetic head ({variant}) saved by us, rated by torch", np.abs(np.asarray(ours(emb)) - want).max(), 1e-5)
  np.testing.assert_array_equal(np.asarray(load_aesthetic(path)(emb)), np.asarray(ours(emb)))
