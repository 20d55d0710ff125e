"""The torch-free reader of `torch.save` files (hps_jax/convert/io.py) and `hps-jax convert`: files written by torch
read back bit-exactly (zip and legacy formats, every dtype, strided / offset views sharing a storage, parameters,
scalars, wrapped state dicts); malicious and malformed files are refused without running anything; loading works
with torch unimportable; the CLI round-trips to safetensors with dtypes kept and refuses what it should."""

import collections
import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest

from hps_jax.cli import main
from hps_jax.convert.io import CheckpointError, load_safetensors, load_state_dict, load_torch_pickle

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  return collections.OrderedDict(
    f32=torch.randn(3, 4, generator=g),
    f16=torch.randn(7, generator=g).half(),
    bf16=torch.randn(2, 3, generator=g).bfloat16(),
    f64=torch.randn(2, generator=g).double(),
    i64=torch.arange(-5, 5),
    i32=torch.arange(4, dtype=torch.int32),
    u8=torch.arange(250, 256, dtype=torch.uint8),
    bool=torch.tensor([True, False, True]),
    transposed=base.t(),  # non-contiguous view of `base`'s storage
    sliced=base[2:5, 1::2],  # offset + strided view of the same storage
    base=base,
    param=torch.nn.Parameter(torch.randn(4, 2, generator=g)),
    scalar=torch.tensor(2.5),
    empty=torch.zeros(0, 3),
  )


def _np(t) -> np.ndarray:
  return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def _same(got: np.ndarray, t) -> bool:
  ref = _np(t)
  if got.dtype == ml_dtypes.bfloat16:
    got = got.astype(np.float32)
  return got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_torch_save_bit_exact(tmp_path, legacy):
  sd = _tensors()
  path = tmp_path / "w.pt"
  torch.save({"state_dict": sd, "epoch": 3, "dtype": torch.float16}, path, _use_new_zipfile_serialization=not legacy)
  obj = load_torch_pickle(path)
  assert obj["epoch"] == 3 and isinstance(obj["state_dict"], collections.OrderedDict)
  got = obj["state_dict"]
  assert list(got) == list(sd)
  for k, t in sd.items():
    assert _same(got[k], t), k
  assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["f16"].dtype == np.float16
  # the views were rebuilt from the shared storage, not from each other
  assert np.array_equal(got["transposed"], got["base"].T) and np.array_equal(got["sliced"], got["base"][2:5, 1::2])


def test_load_state_dict_unwraps_and_upcasts(tmp_path):
  sd = _tensors()
  torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {}}, tmp_path / "hpc.pt")
  out = load_state_dict(tmp_path / "hpc.pt")
  assert list(out) == list(sd)
  assert out["f16"].dtype == np.float32 and out["bf16"].dtype == np.float32 and out["i64"].dtype == np.int64
  assert np.array_equal(out["bf16"], _np(sd["bf16"])) and np.array_equal(out["f16"], sd["f16"].float().numpy())
  kept = load_state_dict(tmp_path / "hpc.pt", keep_dtype=True)
  assert all(_same(kept[k], t) for k, t in sd.items())


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _zip_checkpoint(path, pkl: bytes, storages=None):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/version", "3\n")
    for key, data in (storages or {}).items():
      z.writestr(f"archive/data/{key}", data)
  return path


@pytest.mark.parametrize("layout", ["zip", "plain pickle"])
def test_malicious_pickle_is_refused_not_run(tmp_path, layout):
  marker = tmp_path / "MARKER"
  pkl = pickle.dumps({"state_dict": {"w": _Evil(marker)}}, protocol=2)
  path = tmp_path / "evil.pt"
  if layout == "zip":
    _zip_checkpoint(path, pkl)
  else:
    path.write_bytes(pkl)
  with pytest.raises(CheckpointError, match=r"posix\.system|os\.system") as e:
    load_state_dict(path)
  assert str(path) in str(e.value)
  assert not marker.exists()
  # the CLI: one line, exit 2, nothing written
  assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
  assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


class _Tensor:
  """Pickles as torch's `_rebuild_tensor_v2(storage, offset, size, stride, ...)` over a storage of `numel`."""

  def __init__(self, numel, size, stride, offset=0):
    self.storage = ("storage", torch.FloatStorage, "0", "cpu", numel)
    self.args = (offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2, (_Ref(self.storage), *self.args))


class _Ref:
  def __init__(self, pid):
    self.pid = pid


def _crafted(path, tensor, data: bytes):
  buf = io.BytesIO()
  p = pickle.Pickler(buf, protocol=2)
  p.persistent_id = lambda obj: obj.pid if isinstance(obj, _Ref) else None
  p.dump({"w": tensor})
  return _zip_checkpoint(path, buf.getvalue(), {"0": data})


def test_malformed_files_are_refused(tmp_path):
  four = np.arange(4, dtype="<f4").tobytes()
  # the crafted writer itself is right: a valid tensor reads back
  assert np.array_equal(
    load_state_dict(_crafted(tmp_path / "ok.pt", _Tensor(4, (2, 2), (1, 2)), four))["w"], [[0, 2], [1, 3]]
  )
  cases = {
    "reaches past": _Tensor(4, (100,), (1,)),  # a view outside its storage (never read out of bounds)
    "declares": _Tensor(10**12, (2,), (1,)),  # a huge declared storage: refused before allocating
  }
  for why, tensor in cases.items():
    with pytest.raises(CheckpointError, match=why):
      load_state_dict(_crafted(tmp_path / "bad.pt", tensor, four))
  torch.save({"w": torch.ones(8)}, tmp_path / "t.pt")  # a truncated storage member
  with zipfile.ZipFile(tmp_path / "t.pt") as z, zipfile.ZipFile(tmp_path / "short.pt", "w") as out:
    for n in z.namelist():
      out.writestr(n, z.read(n)[:-4] if n.endswith("/data/0") else z.read(n))
  with pytest.raises(CheckpointError, match="holds 28 bytes"):
    load_state_dict(tmp_path / "short.pt")
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
  with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
    load_state_dict(tmp_path / "junk.pt")
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("readme.txt", "hi")
  with pytest.raises(CheckpointError, match="not a torch.save file"):
    load_state_dict(tmp_path / "other.zip")


def test_torchscript_archive_reads_as_its_state_dict(tmp_path):
  """TorchScript archives (OpenAI's `ViT-L-14.pt`) are read without torch: tests/convert/test_torchscript.py."""
  lin = torch.nn.Linear(2, 2)
  torch.jit.save(torch.jit.script(lin), tmp_path / "ViT-L-14.pt")
  sd = load_state_dict(tmp_path / "ViT-L-14.pt")
  assert sorted(sd) == ["bias", "weight"] and np.array_equal(sd["weight"], lin.weight.detach().numpy())


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
import numpy as np
from hps_jax.convert.clip import load_clip_params
from hps_jax.convert.io import load_state_dict
try:
  import torch
  raise SystemExit("torch is importable")
except ImportError:
  pass
out = {{}}
cfg, flat = load_clip_params({hpc!r}, "openai")
out.update({{"clip/" + k: v for k, v in flat.items()}})
if {aesthetic!r}:
  out.update({{"aesthetic/" + k: v for k, v in load_state_dict({aesthetic!r}).items()}})
np.savez({npz!r}, **out)
print("torch" in sys.modules and sys.modules["torch"] is None)
"""


def _run_without_torch(tmp_path, hpc, aesthetic=""):
  npz = tmp_path / "out.npz"
  script = _NO_TORCH.format(hpc=str(hpc), aesthetic=str(aesthetic), npz=str(npz))
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == "True"
  with np.load(npz) as z:
    return {k: z[k] for k in z.files}


def _hpc_pt(tmp_path):
  from hps_jax.convert.clip import params_from_openai
  from hps_jax.models.clip import CLIPConfig
  from tests.refs import open_clip_model

  pytest.importorskip("open_clip")
  cfg = CLIPConfig.tiny()
  src = open_clip_model(cfg, seed=8).state_dict()
  path = tmp_path / "hpc.pt"
  torch.save({"state_dict": {"module." + k: v for k, v in src.items()}, "optimizer": {}}, path)
  ref = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
  return path, params_from_openai({k[len("module.") :]: v.numpy() for k, v in ref.items()}, cfg)


def test_loads_without_torch_openai_clip(tmp_path):
  path, ref = _hpc_pt(tmp_path)
  got = _run_without_torch(tmp_path, path)
  assert set(got) == {"clip/" + k for k in ref}
  assert all(np.array_equal(got["clip/" + k], v) and got["clip/" + k].dtype == v.dtype for k, v in ref.items())


def test_loads_without_torch_real_aesthetic_head(tmp_path, aesthetic_weights):
  path, _ = _hpc_pt(tmp_path)
  for name in ("sac+logos+ava1-l14-linearMSE.pth", "ava+logos-l14-reluMSE.pth"):
    pth = aesthetic_weights / name
    if not pth.exists():
      continue
    got = _run_without_torch(tmp_path, path, pth)
    ref = torch.load(pth, map_location="cpu", weights_only=True)
    assert {k for k in got if k.startswith("aesthetic/")} == {"aesthetic/" + k for k in ref}
    for k, t in ref.items():
      assert _same(got["aesthetic/" + k], t), (name, k)


def test_cli_convert_round_trip(tmp_path, capsys):
  sd = _tensors()
  src = tmp_path / "w.pth"
  torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, src)
  dst = tmp_path / "w.safetensors"
  assert main(["convert", str(src), str(dst)]) == 0
  assert capsys.readouterr().err.strip() == f"wrote {len(sd)} tensors to {dst}"
  back = load_safetensors(dst)
  assert list(sorted(back)) == sorted(sd)
  assert all(_same(back[k], t) for k, t in sd.items())
  assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
  # safetensors -> safetensors, and the legacy format, read too
  torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
  assert main(["convert", str(tmp_path / "old.bin"), str(tmp_path / "old.safetensors")]) == 0
  assert main(["convert", str(dst), str(tmp_path / "copy.safetensors")]) == 0
  for f in ("old.safetensors", "copy.safetensors"):
    back = load_safetensors(tmp_path / f)
    assert all(_same(back[k], t) for k, t in sd.items())


def test_cli_convert_refusals(tmp_path, capsys):
  src = tmp_path / "w.pt"
  torch.save({"w": torch.ones(2)}, src)
  dst = tmp_path / "w.safetensors"
  assert main(["convert", str(src), str(dst)]) == 0
  capsys.readouterr()
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"\x00" * 16)
  cases = {
    "exists": [str(src), str(dst)],  # an existing DST without --overwrite
    "DST is SRC": [str(dst), str(dst), "--overwrite"],
    "no such file": [str(tmp_path / "missing.pt"), str(tmp_path / "m.safetensors")],
    "not a PyTorch checkpoint": [str(junk), str(tmp_path / "j.safetensors")],
    "must end in .safetensors": [str(src), str(tmp_path / "w.bin")],
  }
  for why, argv in cases.items():
    assert main(["convert", *argv]) == 2, why
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1, (why, err)
  assert not (tmp_path / "j.safetensors").exists()
  torch.save({"w": torch.zeros(3)}, src)
  assert main(["convert", str(src), str(dst), "--overwrite"]) == 0
  assert np.array_equal(load_safetensors(dst)["w"], np.zeros(3, np.float32))
