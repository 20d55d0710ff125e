"""The FID Inception-v3 port against pytorch-fid (resize="torch") and torch-fidelity (resize="tf1").

The real `pt_inception-2015-12-05` weights cannot be downloaded here, so both sides run the same *random* weights:
pytorch-fid's own `fid_inception_v3()` skeleton with random convolutions, BatchNorm affine parameters and BatchNorm
running statistics (calibrated on a batch of images like the test inputs, then perturbed, so every BatchNorm does
real work and the activations stay O(1) through all 94 layers). The state dict goes through a .pth file: our
converter reads it, torch-fidelity loads it strictly from the path, and pytorch-fid loads it strictly through its
`load_state_dict_from_url` (patched to hand it over instead of downloading).

Conditioning. With zero-mean BatchNorm shifts, a random BN+ReLU stack amplifies perturbations ~1.5-2x per Inception
block (about 2500x from the input to pool3: a 1e-7 input change moved pool3 by 2.5e-4), so float32 round-off alone
broke a 1e-4 tolerance. The shifts are drawn around +0.75 instead (about a quarter of the ReLU inputs still
negative), which brings the amplification to ~200x and the float32 differences to ~2e-5. The float64 test shows
that what remains is round-off: both networks agree to ~1e-14 there.
"""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
pytest.importorskip("torch_fidelity")
import torch.nn.functional as F  # noqa: E402
import torchvision.models.inception as tv_inception  # noqa: E402
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x  # noqa: E402

from hps_jax.convert.inception import (  # noqa: E402
  build_inception,
  expected_shapes,
  inception_params_from_torch,
  load_inception,
  model_params,
  save_inception_torch,
)
from hps_jax.convert.io import CheckpointError, load_state_dict  # noqa: E402
from hps_jax.metrics.inception_features import (  # noqa: E402
  extract,
  features,
  preprocess,
  resize_bilinear_tf1,
  resize_bilinear_torch,
)
from hps_jax.models.inception import avg_pool_exclude_pad, max_pool  # noqa: E402

SIZES = [(64, 80), (320, 300)]  # upsampling (smooth inputs) and downsampling (noise-like inputs)
BATCH = 2


def _nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _nhwc(t) -> np.ndarray:
  return t.permute(0, 2, 3, 1).numpy()


def _images(seed: int, h: int, w: int, n: int = BATCH) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _random_fid_state_dict(seed: int = 0) -> dict:
  """pytorch-fid's FID Inception skeleton with random weights and non-trivial BatchNorm statistics."""
  with pytest.MonkeyPatch.context() as mp:  # build the module tree without fetching (or loading) weights
    mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: None)
    mp.setattr(tv_inception.Inception3, "load_state_dict", lambda self, *a, **k: None)
    net = pytorch_fid_inception.fid_inception_v3()
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
    for m in bns:
      m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
      m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3 + 0.75)
      m.momentum = None  # cumulative average: one training-mode batch sets the running stats to its statistics
      m.reset_running_stats()
    net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) * 2048**-0.5)
    net.fc.bias.copy_(torch.randn(net.fc.bias.shape, generator=g) * 0.1)
    # calibrate on inputs like the tests' (one upsampled, one downsampled random image), then perturb
    calib = (
      torch.cat(
        [
          F.interpolate(
            _nchw(_images(100 + i, h, w, 1)).float() / 255, size=(299, 299), mode="bilinear", align_corners=False
          )
          for i, (h, w) in enumerate(SIZES)
        ]
      )
      * 2
      - 1
    )
    net.train()
    net(calib)
    net.eval()
    for m in bns:
      m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.05 * m.running_var.sqrt())
      m.running_var.mul_(torch.exp(torch.randn(m.running_var.shape, generator=g) * 0.1))
      m.momentum = 0.1
  return net.state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  sd = _random_fid_state_dict()
  path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
  torch.save(sd, path)
  return sd, path


@pytest.fixture(scope="module")
def pytorch_fid_model(weights):
  sd, _ = weights
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: sd)
    model = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
  return model.eval()


@pytest.fixture(scope="module")
def fidelity_model(weights):
  _, path = weights
  return FeatureExtractorInceptionV3(
    "inception-v3-compat", ["2048", "logits_unbiased", "logits"], feature_extractor_weights_path=str(path)
  ).eval()


@pytest.fixture(scope="module")
def model(weights):
  _, path = weights
  return load_inception(path)


# ------------------------------------------------------------------------------------------------------------
# Building blocks: resizes and pools
# ------------------------------------------------------------------------------------------------------------
RESIZE_CASES = [
  ((64, 80), (299, 299)),
  ((320, 300), (299, 299)),
  ((17, 500), (299, 299)),
  ((5, 7), (11, 3)),
  ((299, 299), (299, 299)),
]


@pytest.mark.parametrize("src,dst", RESIZE_CASES)
def test_resize_torch_matches_interpolate(src, dst, parity):
  x = np.random.default_rng(1).random((2,) + src + (3,), dtype=np.float32)
  expected = _nhwc(F.interpolate(_nchw(x), size=dst, mode="bilinear", align_corners=False))
  got = np.asarray(resize_bilinear_torch(jnp.asarray(x), dst))
  assert got.shape == expected.shape
  parity(f"inception resize torch {src}->{dst} vs F.interpolate ([0,1] input)", np.abs(got - expected).max(), 1e-6)


@pytest.mark.parametrize("src,dst", RESIZE_CASES)
def test_resize_tf1_matches_torch_fidelity(src, dst, parity):
  x = np.random.default_rng(2).integers(0, 256, (2,) + src + (3,)).astype(np.float32)
  expected = _nhwc(interpolate_bilinear_2d_like_tensorflow1x(_nchw(x), size=dst, align_corners=False))
  got = np.asarray(resize_bilinear_tf1(jnp.asarray(x), dst))
  assert got.shape == expected.shape
  # values up to 255, where a float32 ulp is 1.5e-5 (a 1e-5 bound would ask for bit-exact agreement): the [0, 1]
  # test's 1e-6 (~8 ulps at 1) scaled by 255, i.e. float32 resolution at this scale.
  parity(f"inception resize tf1 {src}->{dst} vs torch-fidelity ([0,255] input)", np.abs(got - expected).max(), 255e-6)


def test_preprocess_modes_and_input_semantics(parity):
  u8 = _images(3, 64, 80)
  # torch mode: pytorch-fid's wrapper on u8 / 255
  expected = _nhwc(
    2 * F.interpolate(_nchw(u8).float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
  )
  got = np.asarray(preprocess(jnp.asarray(u8), resize="torch"))
  parity("inception preprocess torch vs pytorch-fid wrapper", np.abs(got - expected).max(), 1e-6)
  # tf1 mode: torch-fidelity's cast -> resize -> (x - 128) / 128
  x = interpolate_bilinear_2d_like_tensorflow1x(_nchw(u8).float(), size=(299, 299), align_corners=False)
  expected_tf1 = _nhwc((x - 128) / 128)
  got_tf1 = np.asarray(preprocess(jnp.asarray(u8), resize="tf1"))
  parity("inception preprocess tf1 vs torch-fidelity", np.abs(got_tf1 - expected_tf1).max(), 1e-6)
  # the two conventions sample different source positions
  assert np.abs(got - got_tf1).max() > 1e-2
  # float input is read as [0, 1] in both modes
  f = u8.astype(np.float32) / 255
  for mode, ref in (("torch", got), ("tf1", got_tf1)):
    parity(
      f"inception preprocess {mode}: float [0,1] vs uint8 input",
      np.abs(np.asarray(preprocess(jnp.asarray(f), resize=mode)) - ref).max(),
      1e-6,
    )
  assert preprocess(jnp.asarray(u8[:, :32, :32]), resize="tf1").shape == (BATCH, 299, 299, 3)
  with pytest.raises(ValueError, match="resize must be one of"):
    preprocess(jnp.asarray(u8), resize="pil")
  with pytest.raises(ValueError, match="shape"):
    preprocess(jnp.asarray(u8[..., 0]), resize="tf1")


def test_pools_match_torch(parity):
  x = np.random.default_rng(4).standard_normal((2, 9, 7, 5)).astype(np.float32) - 1.0  # mostly negative
  t = _nchw(x)
  avg = _nhwc(F.avg_pool2d(t, kernel_size=3, stride=1, padding=1, count_include_pad=False))
  parity(
    "inception avg pool (count_include_pad=False)",
    np.abs(np.asarray(avg_pool_exclude_pad(jnp.asarray(x))) - avg).max(),
    1e-6,
  )
  avg_incl = _nhwc(F.avg_pool2d(t, kernel_size=3, stride=1, padding=1, count_include_pad=True))
  assert np.abs(avg - avg_incl).max() > 1e-2  # the border really differs between the conventions
  mx = _nhwc(F.max_pool2d(t, kernel_size=3, stride=1, padding=1))
  parity("inception max pool 3x3/1 pad 1", np.abs(np.asarray(max_pool(jnp.asarray(x), 3, 1, pad=1)) - mx).max(), 0)
  mx2 = _nhwc(F.max_pool2d(t, kernel_size=3, stride=2))
  parity("inception max pool 3x3/2", np.abs(np.asarray(max_pool(jnp.asarray(x), 3, 2)) - mx2).max(), 0)


# ------------------------------------------------------------------------------------------------------------
# Whole network
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_pytorch_fid(size, weights, pytorch_fid_model, model, parity):
  sd, _ = weights
  u8 = _images(10, *size)
  with torch.no_grad():
    pool3 = pytorch_fid_model(_nchw(u8).float() / 255)[0][:, :, 0, 0]
    logits = F.linear(pool3, sd["fc.weight"], sd["fc.bias"])
  out = extract(model, u8, resize="torch")
  pool3, logits = pool3.numpy(), logits.numpy()
  assert 0.05 < np.abs(pool3).mean() < 10  # O(1) activations: the absolute tolerances below mean something
  name = f"inception {size[0]}x{size[1]} resize=torch vs pytorch-fid"
  parity(f"{name}: pool3", np.abs(np.asarray(out["pool3"]) - pool3).max(), 1e-4)
  parity(f"{name}: logits", np.abs(np.asarray(out["logits"]) - logits).max(), 1e-4)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_torch_fidelity(size, fidelity_model, model, parity):
  u8 = _images(20, *size)
  with torch.no_grad():
    pool3, unbiased, logits = (t.numpy() for t in fidelity_model(_nchw(u8)))
  out = extract(model, u8, resize="tf1")
  assert 0.05 < np.abs(pool3).mean() < 10
  name = f"inception {size[0]}x{size[1]} resize=tf1 vs torch-fidelity"
  parity(f"{name}: pool3", np.abs(np.asarray(out["pool3"]) - pool3).max(), 1e-4)
  parity(f"{name}: logits_unbiased", np.abs(np.asarray(out["logits_unbiased"]) - unbiased).max(), 1e-4)
  parity(f"{name}: logits", np.abs(np.asarray(out["logits"]) - logits).max(), 1e-4)
  assert np.abs(logits - unbiased).max() > 1e-3  # the bias is really left out of logits_unbiased


def test_float64_network_is_exact(weights, pytorch_fid_model, parity):
  """Both networks in float64 on one identical 299x299 input agree to float64 round-off: the float32 differences
  above are round-off amplified by the network, not a structural mismatch."""
  import jax

  sd, _ = weights
  x = np.random.default_rng(40).uniform(-1, 1, (1, 299, 299, 3))
  ref = copy.deepcopy(pytorch_fid_model).double()
  with torch.no_grad():
    h = _nchw(x)
    for block in ref.blocks:
      h = block(h)
    expected = h[:, :, 0, 0].numpy()
  with jax.enable_x64(True):
    m64 = build_inception(
      inception_params_from_torch({k: v.numpy() for k, v in sd.items()}), dtype=jnp.float64, param_dtype=jnp.float64
    )
    out = nnx.jit(lambda m, v: m(v))(m64, jnp.asarray(x))
    assert out["pool3"].dtype == jnp.float64
    got = np.asarray(out["pool3"])
  parity("inception float64 network (299x299 input) vs pytorch-fid float64: pool3", np.abs(got - expected).max(), 1e-10)


def test_features_batches_and_pads(model):
  u8 = _images(30, 64, 80, n=3)
  got = features(model, u8, resize="tf1", batch_size=2, keys=("pool3", "logits"))
  assert set(got) == {"pool3", "logits"} and got["pool3"].shape == (3, 2048) and got["logits"].shape == (3, 1008)
  first = extract(model, u8[:2], resize="tf1")
  last = extract(model, u8[1:], resize="tf1")
  np.testing.assert_allclose(got["pool3"][:2], np.asarray(first["pool3"]), atol=1e-5)
  np.testing.assert_allclose(got["pool3"][2], np.asarray(last["pool3"][1]), atol=1e-5)
  empty = features(model, u8[:0], resize="tf1")
  assert empty["pool3"].shape == (0, 2048) and empty["logits_unbiased"].shape == (0, 1008)


# ------------------------------------------------------------------------------------------------------------
# Converter
# ------------------------------------------------------------------------------------------------------------
def test_converter_layout_and_roundtrip(weights, fidelity_model, model, tmp_path):
  sd, _ = weights
  # pytorch-fid's fid_inception_v3 and torch-fidelity's extractor share one state-dict layout
  assert set(fidelity_model.state_dict()) == set(sd)
  kernel = np.asarray(model.Mixed_6b.branch7x7_2.conv.kernel[...])
  assert kernel.shape == (1, 7, 128, 128)  # HWIO of torch's (128, 128, 1, 7)
  np.testing.assert_array_equal(kernel, sd["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
    np.asarray(model.Mixed_7c.branch_pool.bn.var[...]), sd["Mixed_7c.branch_pool.bn.running_var"].numpy()
  )
  # save -> the same torch layout, values bit-identical; the written file loads into torch-fidelity strictly
  out = save_inception_torch(model, tmp_path / "roundtrip.pth")
  back = load_state_dict(out)
  assert set(back) == set(sd)
  for k, v in sd.items():
    if not k.endswith("num_batches_tracked"):  # training bookkeeping; written as 0
      np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(out))
  st = save_inception_torch(model, tmp_path / "roundtrip.safetensors")
  flat = inception_params_from_torch(load_state_dict(st), str(st))
  mine = model_params(model)
  assert set(flat) == set(mine) == set(expected_shapes())
  assert all(np.array_equal(flat[k], mine[k]) for k in mine)


def test_converter_errors(weights, tmp_path):
  sd, _ = weights
  base = {k: v.numpy() for k, v in sd.items()}
  # num_batches_tracked is optional
  assert len(inception_params_from_torch({k: v for k, v in base.items() if "num_batches" not in k})) == 472
  missing = dict(base)
  del missing["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  with pytest.raises(CheckpointError, match=r"missing keys \[Mixed_6c\.branch7x7dbl_3\.bn\.running_var\]"):
    inception_params_from_torch(missing, "x.pth")
  extra = dict(base, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected keys \[AuxLogits\.fc\.weight\]"):
    inception_params_from_torch(extra, "x.pth")
  wrong = dict(base, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  path = tmp_path / "wrong.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in wrong.items()}, path)
  with pytest.raises(CheckpointError, match=rf"{path}: wrong shapes .*fc\.weight \(1000, 2048\)"):
    load_inception(path)


def test_bfloat16_compute(weights, model):
  _, path = weights
  m = load_inception(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert m.Conv2d_1a_3x3.conv.kernel[...].dtype == jnp.bfloat16 and m.fc.bias[...].dtype == jnp.bfloat16
  u8 = _images(50, 64, 80)
  got = extract(m, u8, resize="tf1")
  assert got["pool3"].dtype == jnp.float32  # the global pool and the classifier accumulate in float32
  ref = np.asarray(extract(model, u8, resize="tf1")["pool3"])
  rel = np.linalg.norm(np.asarray(got["pool3"]) - ref) / np.linalg.norm(ref)
  assert rel < 0.1, rel  # bfloat16 through 94 layers: a few percent
