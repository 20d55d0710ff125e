import dataclasses

import pytest

from tests.hostile.harness import build_assets


@pytest.fixture(scope="session")
def hostile_assets(tmp_path_factory):
  """The good inputs the corpus cases start from (tiny random CLIP, images, tiny SD), once per xdist worker."""
  return build_assets(tmp_path_factory.mktemp("hostile_assets"), inception=False)


@pytest.fixture(scope="session")
def hostile_assets_inception(hostile_assets, tmp_path_factory):
  """The same, plus random-init FID Inception weights (for the statistics-file cases)."""
  from flax import nnx

  from hps_jax.convert.inception import save_inception_torch
  from hps_jax.models.inception import FIDInception

  path = save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("inc") / "inception.safetensors")
  return dataclasses.replace(hostile_assets, inception=path)
