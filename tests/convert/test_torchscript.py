"""TorchScript archives (`torch.jit.save` output, the format of OpenAI's CLIP release `.pt` files) read without torch
(hps_jax/convert/io.py): open_clip ViT and ModifiedResNet CLIPs, scripted or traced, fp32 or fp16, read back as
exactly their `state_dict()` (names, order, dtypes, bits); `load_clip` and `hps-jax convert` take them like any
state dict; hostile archives are one-line `CheckpointError`s naming the file, with nothing executed."""

import copy
import pickletools
import struct
import warnings
import zipfile

import numpy as np
import pytest

from hps_jax.cli import main
from hps_jax.convert.io import CheckpointError, load_safetensors, load_state_dict, tensor_info

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from hps_jax.convert.clip import load_clip, params_to_openai  # noqa: E402
from hps_jax.models.clip import CLIP, CLIPConfig  # noqa: E402
from tests.refs import open_clip_model, randomize_  # noqa: E402

CFG = CLIPConfig.tiny(vocab_size=1000, context_length=16)


def _quiet(fn, *args, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.jit.script / trace are deprecated (FutureWarning)
    return fn(*args, **kw)


def _jit_save(module, path, example=None):
  scripted = (
    _quiet(torch.jit.script, module) if example is None else _quiet(torch.jit.trace, module, example, check_trace=False)
  )
  _quiet(torch.jit.save, scripted, str(path))
  return scripted


def _bits(a: np.ndarray) -> np.ndarray:
  return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def _assert_state_dict(path, ref):
  """Our reader gives `ref` (a torch state dict) exactly: same names in the same order, same dtypes and bits with
  keep_dtype, fp16 upcast exactly to float32 without it; tensor_info agrees without reading data."""
  kept = load_state_dict(path, keep_dtype=True)
  up = load_state_dict(path)
  info = tensor_info(path)
  assert list(kept) == list(up) == list(info) == list(ref)
  for k, t in ref.items():
    r = t.detach().numpy()
    assert kept[k].dtype == r.dtype and kept[k].shape == r.shape, k
    assert np.array_equal(_bits(kept[k]), _bits(r)), k
    exp = r.astype(np.float32) if r.dtype == np.float16 else r
    assert up[k].dtype == exp.dtype and np.array_equal(_bits(up[k]), _bits(exp)), k
    assert info[k].shape == r.shape and info[k].dtype == r.dtype.name, k


def _assert_matches_eager(ref, model):
  """The scripted module's state dict is the eager model's plus its non-persistent buffers (TorchScript does not
  keep that mark): open_clip's `attn_mask`."""
  eager = model.state_dict()
  assert set(ref) - set(eager) <= {"attn_mask"} and set(eager) <= set(ref)
  for k, t in eager.items():
    assert t.dtype == ref[k].dtype and torch.equal(t, ref[k]), k


def _openai_quickgelu():
  """What OpenAI's archives hold: open_clip's `build_model_from_openai_state_dict` (QuickGELU, weights partly fp16)
  from the OpenAI-layout state dict of a random model."""
  from flax import nnx

  abstract = nnx.eval_shape(lambda: CLIP(CFG, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(3)
  flat = {
    "/".join(map(str, p)): (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params_to_openai(flat, CFG).items()}
  return open_clip.model.build_model_from_openai_state_dict(sd)


def _resnet():
  from open_clip.model import CLIPTextCfg, CLIPVisionCfg

  vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=32, head_width=64, image_size=64)
  text = CLIPTextCfg(context_length=16, vocab_size=1000, width=64, heads=1, layers=1)
  model = randomize_(open_clip.model.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).eval(), seed=5)
  g = torch.Generator().manual_seed(6)
  with torch.no_grad():  # BatchNorm statistics away from their 0 / 1 initial values
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
      elif name.endswith("num_batches_tracked"):
        b.fill_(1234)
  return model


@pytest.fixture(scope="module")
def vit():
  return open_clip_model(CFG, seed=2)


def _embeddings(path):
  model = load_clip(path)
  cfg = model.config
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  tokens = rng.integers(1, cfg.vocab_size, (2, cfg.context_length)).astype(np.int32)
  return np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))


def _assert_load_clip_same(archive, model, tmp_path):
  """load_clip of the archive == load_clip of `torch.save(model.state_dict())`: embeddings identical."""
  pt = tmp_path / (archive.stem + "-sd.pt")
  torch.save(model.state_dict(), pt)
  for a, b in zip(_embeddings(archive), _embeddings(pt)):
    assert a.shape == b.shape and np.abs(a - b).max() == 0


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_scripted_vit_clip(tmp_path, vit, half):
  model = copy.deepcopy(vit).half() if half else vit
  path = tmp_path / "ViT-T.pt"
  ref = _jit_save(model, path).state_dict()
  _assert_matches_eager(ref, model)
  _assert_state_dict(path, ref)
  assert list(_quiet(torch.jit.load, str(path)).state_dict()) == list(ref)
  if half:
    assert load_state_dict(path, keep_dtype=True)["visual.conv1.weight"].dtype == np.float16
  _assert_load_clip_same(path, model, tmp_path)


@pytest.mark.parametrize("half", [False, True], ids=["mixed", "fp16"])
def test_scripted_openai_quickgelu_clip(tmp_path, half):
  model = _openai_quickgelu()
  if half:
    model = model.half()
  path = tmp_path / "ViT-Q.pt"
  ref = _jit_save(model, path).state_dict()
  _assert_matches_eager(ref, model)
  dtypes = {t.dtype for t in ref.values()}
  assert torch.float16 in dtypes and (half or torch.float32 in dtypes)
  _assert_state_dict(path, ref)
  _assert_load_clip_same(path, model, tmp_path)


def test_traced_vit_clip(tmp_path, vit):
  example = (torch.randn(1, 3, CFG.image_size, CFG.image_size), torch.randint(1, 1000, (1, CFG.context_length)))
  path = tmp_path / "traced.pt"
  ref = _jit_save(vit, path, example).state_dict()
  with zipfile.ZipFile(path) as z:
    assert any("___torch_mangle_" in n for n in z.namelist())  # traced: one class per module instance
  _assert_matches_eager(ref, vit)
  _assert_state_dict(path, ref)
  _assert_load_clip_same(path, vit, tmp_path)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_scripted_resnet_clip(tmp_path, half):
  model = _resnet()
  if half:
    model = model.half()
  path = tmp_path / "RN-T.pt"
  ref = _jit_save(model, path).state_dict()
  _assert_matches_eager(ref, model)
  assert {"visual.bn1.running_mean", "visual.bn1.running_var", "visual.layer1.0.bn3.num_batches_tracked"} <= set(ref)
  assert ref["visual.bn1.num_batches_tracked"].dtype == torch.int64
  _assert_state_dict(path, ref)
  assert load_clip(path).config.resnet_layers == (1, 1, 1, 1)
  _assert_load_clip_same(path, model, tmp_path)  # the ModifiedResNet CLIP from the archive == from a state dict


def _rewrite(src, dst, rename=None, drop=(), replace=None):
  """A copy of the zip `src` with members renamed (`rename(name)`), dropped, or their bytes replaced."""
  replace = replace or {}
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      name = info.filename
      if name in drop:
        continue
      data = replace[name](zin.read(name)) if name in replace else zin.read(name)
      zout.writestr(rename(name) if rename else name, data)
  return dst


def test_any_top_folder_name_and_bare_modules(tmp_path):
  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin = torch.nn.Linear(2, 3)
      self.nobias = torch.nn.Linear(3, 2, bias=False)
      self.bn = torch.nn.BatchNorm1d(3)
      self.seq = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
      self.same = self.lin  # one module under two names: in the state dict twice
      self.register_buffer("gone", None)
      self.register_buffer("view", self.lin.weight.detach()[1])  # shares the weight's storage
      self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
      self.plain = torch.arange(4.0)  # a plain tensor attribute: not in state_dict
      self.sizes = [1, 2]

    def forward(self, x):
      y = self.seq(self.bn(self.lin(x)))
      return self.nobias(y) + self.plain.sum() + self.view.sum() + self.frozen + float(self.sizes[0]) + self.same(x)[:2]

  path = tmp_path / "net.pt"
  ref = _jit_save(Net(), path).state_dict()
  assert "plain" not in ref and "gone" not in ref and "same.weight" in ref and "nobias.bias" not in ref
  _assert_state_dict(path, ref)
  got = load_state_dict(path)
  assert np.array_equal(got["view"], got["lin.weight"][1])
  renamed = _rewrite(path, tmp_path / "renamed.pt", rename=lambda n: "whatever-name/" + n.split("/", 1)[1])
  with zipfile.ZipFile(renamed) as z:
    assert {n.split("/")[0] for n in z.namelist()} == {"whatever-name"}
  _assert_state_dict(renamed, ref)


def test_cli_convert(tmp_path, vit, capsys):
  model = copy.deepcopy(vit).half()
  path = tmp_path / "ViT-T.pt"
  ref = _jit_save(model, path).state_dict()
  out = tmp_path / "out.safetensors"
  assert main(["convert", str(path), str(out)]) == 0
  assert f"wrote {len(ref)} tensors" in capsys.readouterr().err
  got = load_safetensors(out)
  assert set(got) == set(ref)
  for k, t in ref.items():
    assert got[k].dtype == t.numpy().dtype and np.array_equal(_bits(got[k]), _bits(t.numpy())), k


# ------------------------------------------------------------------------------------------------------------
# hostile archives: a real scripted Linear's archive (its code/ defines the class) with a hand-written data.pkl
# ------------------------------------------------------------------------------------------------------------


def _u(s: str) -> bytes:
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _g(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _i(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def _tup(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _tensor(key: str, numel: int, size, stride) -> bytes:
  storage = _tup(_u("storage"), _g("torch", "FloatStorage"), _u(key), _u("cpu"), _i(numel)) + b"Q"
  args = storage + _i(0) + _tup(*map(_i, size)) + _tup(*map(_i, stride)) + b"\x89" + _g("collections", "OrderedDict")
  return _g("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b")RtR"


def _module(cls: tuple, items: dict) -> bytes:
  return _g(*cls) + b")\x81}(" + b"".join(_u(k) + v for k, v in items.items()) + b"ub"


def _pkl(body: bytes) -> bytes:
  return b"\x80\x02" + body + b"."


WEIGHT = _tensor("0", 6, (3, 2), (2, 1))  # the archive's data/0: 6 floats
BIAS = _tensor("1", 3, (3,), (1,))


@pytest.fixture(scope="module")
def linear_pt(tmp_path_factory):
  path = tmp_path_factory.mktemp("ts") / "lin.pt"
  _jit_save(torch.nn.Linear(2, 3), path)
  with zipfile.ZipFile(path) as z:
    prefix = z.namelist()[0].split("/")[0] + "/"
    op, arg, _ = next(pickletools.genops(z.read(prefix + "data.pkl")[2:]))  # the module's class (maybe mangled)
  assert op.name == "GLOBAL" and arg.startswith("__torch__.torch.nn.modules.linear")
  return path, prefix, tuple(arg.split(" "))


def test_hostile_archives(tmp_path, linear_pt):
  linear_pt, prefix, cls = linear_pt
  data_pkl = prefix + "data.pkl"
  marker = tmp_path / "executed"
  # a correct hand-written data.pkl reads back (the crafting is right)
  ok = _rewrite(
    linear_pt, tmp_path / "ok.pt", replace={data_pkl: lambda _: _pkl(_module(cls, {"weight": WEIGHT, "bias": BIAS}))}
  )
  assert [k for k in load_state_dict(ok)] == ["weight", "bias"]
  pkls = {
    "os-system": (_pkl(_g("os", "system") + _u(f"touch {marker}") + b"\x85R"), r"refusing to unpickle os\.system"),
    "posix-system": (_pkl(_g("posix", "system") + _u(f"touch {marker}") + b"\x85R"), "refusing to unpickle"),
    "state-list": (_pkl(_g(*cls) + b")\x81]b"), "has a state of list, not a dict"),
    "param-str": (
      _pkl(_module(cls, {"weight": _u("boom"), "bias": BIAS})),
      "parameter 'weight' .* is str, not a tensor",
    ),
    "param-absent": (_pkl(_module(cls, {"bias": BIAS})), "declares parameter 'weight' but does not hold it"),
    "missing-storage": (
      _pkl(_module(cls, {"weight": _tensor("9", 6, (3, 2), (2, 1)), "bias": BIAS})),
      "data/9 is missing",
    ),
    "oversized-tensor": (
      _pkl(_module(cls, {"weight": _tensor("0", 6, (3000, 2000), (2000, 1)), "bias": BIAS})),
      "reaches past its storage",
    ),
    "storage-too-big": (
      _pkl(_module(cls, {"weight": _tensor("0", 10**9, (3, 2), (2, 1)), "bias": BIAS})),
      "holds 24 bytes",
    ),
    "unknown-class": (_pkl(_module(("__torch__.evil", "Thing"), {"weight": WEIGHT})), "does not define"),
    "not-a-module": (_pkl(_u("hello")), "holds 'str', not a module"),
    "self-cycle": (
      _pkl(_g(*cls) + b"q\x00)\x81q\x01}(" + _u("weight") + WEIGHT + _u("bias") + BIAS + _u("me") + b"h\x01ub"),
      "contains itself",
    ),
  }
  # 40 levels of modules, each holding the next under two names: 2^40 paths, refused after a bounded walk
  dag = _module(cls, {"weight": WEIGHT, "bias": BIAS}) + b"r" + struct.pack("<I", 0)  # LONG_BINPUT: memo 0
  for k in range(1, 40):  # "b": LONG_BINGET of the level below
    dag = _module(cls, {"weight": WEIGHT, "bias": BIAS, "a": dag, "b": b"j" + struct.pack("<I", k - 1)})
    dag += b"r" + struct.pack("<I", k)
  pkls["dag"] = (_pkl(dag), "more than 100000 modules")
  cases = {
    k: _rewrite(linear_pt, tmp_path / f"{k}.pt", replace={data_pkl: lambda _, p=p: p}) for k, (p, _) in pkls.items()
  }
  matches = {k: m for k, (_, m) in pkls.items()}
  # a storage member shorter than the pickle declares; a missing one; a truncated archive; an unparsable code file
  cases["short-member"] = _rewrite(linear_pt, tmp_path / "short.pt", replace={prefix + "data/0": lambda b: b[:-4]})
  matches["short-member"] = "holds 20 bytes, the pickle declares 6"
  cases["dropped-member"] = _rewrite(linear_pt, tmp_path / "dropped.pt", drop={prefix + "data/1"})
  matches["dropped-member"] = "data/1 is missing"
  code = prefix + "code/" + cls[0].replace(".", "/") + ".py"
  cases["bad-code"] = _rewrite(
    linear_pt,
    tmp_path / "badcode.pt",
    replace={code: lambda b: b.replace(b'["weight", "bias", ]', b"[__import__('os')]")},
  )
  matches["bad-code"] = "unreadable attribute list"
  raw = linear_pt.read_bytes()
  for cut in (len(raw) // 2, len(raw) - 30):
    (tmp_path / f"cut{cut}.pt").write_bytes(raw[:cut])
    cases[f"cut{cut}"], matches[f"cut{cut}"] = tmp_path / f"cut{cut}.pt", None
  for name, path in cases.items():
    for fn in (load_state_dict, tensor_info):
      with pytest.raises(CheckpointError, match=matches[name]) as e:
        fn(path)
      msg = str(e.value)
      assert str(path) in msg and "\n" not in msg, (name, msg)
  assert not marker.exists()
