"""Reading and writing state dicts without torch: safetensors, and PyTorch `torch.save` files through a safe,
allow-listed unpickler.

Everything returns plain `dict[str, np.ndarray]` (fp16 / bf16 tensors of pickles as float32 unless `keep_dtype`).

PyTorch files are read by `load_torch_pickle`, which never imports torch and never runs code from the file: the
pickle's globals are resolved against an explicit allow-list of stand-ins (tensor / parameter rebuild functions,
storage classes, dtypes, `collections.OrderedDict`, a few plain builtins); any other global (e.g. `posix.system`)
is refused with a `CheckpointError` naming it and the file, before it could be called. Supported:

- the zip format of torch >= 1.6 (`<folder>/data.pkl`, `<folder>/data/<key>` raw storages, `<folder>/version`,
  optionally `<folder>/byteorder`), what `torch.save` writes by default;
- the legacy format of torch < 1.6 (a plain pickle stream: magic number, protocol, sys info, the object, the
  storage keys, then each storage's bytes), what `torch.save(..., _use_new_zipfile_serialization=False)` writes.

Refused with a clear error: TorchScript archives (`constants.pkl` / `code/`, e.g. OpenAI's CLIP release `.pt`),
tar-format files of torch < 0.4, big-endian legacy files, tensors that reach outside their storage. A storage is only
allocated after checking that the file holds all its bytes.
"""

from __future__ import annotations

import builtins
import collections
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hps_jax.errors import InputError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "params")


class CheckpointError(InputError):
  """A checkpoint file that cannot be read or does not hold what was expected; the message names the file."""


def _is_safetensors(path: Path) -> bool:
  if path.suffix in SAFETENSORS_SUFFIXES:
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(9)
  except OSError:
    return False
  # safetensors: 8-byte little-endian header length, then a JSON object.
  return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy, in its stored dtype (bf16 as `ml_dtypes.bfloat16`; 64-bit
  dtypes stay 64-bit, which reading through JAX would narrow)."""
  out = {}
  try:
    with safe_open(str(path), framework="numpy") as f:
      for k in f.keys():
        out[k] = np.asarray(f.get_tensor(k))
  except Exception as e:  # safetensors raises its own error types
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  return out


def _torch_to_numpy(t) -> np.ndarray:
  """A torch tensor (or an array from `load_torch_pickle`) as numpy; fp16 / bf16 become float32. torch is only
  imported for an actual torch tensor."""
  if isinstance(t, np.ndarray):
    return _upcast(t)
  import torch

  if t.dtype in (torch.bfloat16, torch.float16):
    t = t.float()
  return t.detach().cpu().numpy()


def _upcast(a: np.ndarray) -> np.ndarray:
  return a.astype(np.float32) if a.dtype in (np.float16, ml_dtypes.bfloat16) else a


# ------------------------------------------------------------------------------------------------------------
# the torch-free reader of torch.save files
# ------------------------------------------------------------------------------------------------------------
# the legacy storage classes (what `torch.save` names in its persistent ids) -> element dtype
_STORAGE_DTYPES = {
  "FloatStorage": np.dtype(np.float32),
  "DoubleStorage": np.dtype(np.float64),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
}
# `torch.<name>` dtype objects (they pickle as globals) -> numpy dtype
_TORCH_DTYPES = {
  **{n: np.dtype(np.float32) for n in ("float32", "float")},
  **{n: np.dtype(np.float64) for n in ("float64", "double")},
  **{n: np.dtype(np.float16) for n in ("float16", "half")},
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  **{n: np.dtype(np.int64) for n in ("int64", "long")},
  **{n: np.dtype(np.int32) for n in ("int32", "int")},
  **{n: np.dtype(np.int16) for n in ("int16", "short")},
  "int8": np.dtype(np.int8),
  "uint8": np.dtype(np.uint8),
  "uint16": np.dtype(np.uint16),
  "uint32": np.dtype(np.uint32),
  "uint64": np.dtype(np.uint64),
  "bool": np.dtype(np.bool_),
  **{n: np.dtype(np.complex64) for n in ("complex64", "cfloat")},
  **{n: np.dtype(np.complex128) for n in ("complex128", "cdouble")},
  "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
  "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_DIMS = 64


class _StorageType:
  """Stand-in for `torch.FloatStorage` & co. (and the untyped `torch.storage.UntypedStorage`, read as bytes)."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self):
    return f"torch.{self.name}"


class _DType:
  """Stand-in for a `torch.<dtype>` object (passed to `_rebuild_tensor_v3`)."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """A storage named by the pickle: `numel` elements of `dtype`; its bytes (`data`, a flat array) are read from
  the file when the pickle names it (zip) or after the pickle (legacy). `base` / `start`: a legacy view into
  another storage."""

  def __init__(self, dtype: np.dtype, numel: int, base: _Storage | None = None, start: int = 0):
    self.dtype, self.numel, self.base, self.start = dtype, numel, base, start
    self.data: np.ndarray | None = None

  def array(self) -> np.ndarray:
    if self.base is not None:
      return self.base.array()[self.start : self.start + self.numel]
    assert self.data is not None
    return self.data


class _Pending:
  """A tensor to build from a storage once all storages are read."""

  def __init__(self, storage: _Storage, offset, size, stride, dtype: np.dtype | None = None):
    self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
  return _Pending(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  return _Pending(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  if not isinstance(dtype, _DType):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v3 with a dtype that is not a torch dtype: {dtype!r}")
  return _Pending(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  return data


def _device(*args):
  return ":".join(str(a) for a in args)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
  # protocol-2 pickles write `bytes` objects as _codecs.encode(text, 'latin1')
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("_codecs.encode is only allowed on text with the latin1 encoding")
  return obj.encode("latin1", errors)


_ALLOWED: dict[tuple[str, str], object] = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch", "Size"): tuple,
  ("torch", "device"): _device,
  ("_codecs", "encode"): _codecs_encode,
  **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
  **{(m, "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)) for m in ("torch", "torch.storage")},
  ("torch.storage", "TypedStorage"): _StorageType("TypedStorage", np.dtype(np.uint8)),
  **{("torch", n): _DType(n, d) for n, d in _TORCH_DTYPES.items()},
  **{
    ("builtins", n): getattr(builtins, n)
    for n in ("set", "frozenset", "tuple", "list", "dict", "complex", "bytearray", "slice")
  },
}


class _SafeUnpickler(pickle.Unpickler):
  """Resolves globals against `_ALLOWED` only, and hands each persistent id to `load_storage`."""

  def __init__(self, file, path, load_storage=None):
    super().__init__(file)
    self._path, self._load_storage = path, load_storage

  def find_class(self, module, name):
    found = _ALLOWED.get((module, name))
    if found is None:
      raise CheckpointError(
        f"{self._path}: refusing to unpickle {module}.{name}: only tensors, storages, dtypes and plain containers are "
        "allowed in a weights file (nothing was executed). If you trust the file, re-save its state dict as "
        "safetensors"
      )
    return found

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise pickle.UnpicklingError("unexpected persistent id")
    return self._load_storage(pid)


def _storage_id(pid, path, legacy: bool):
  """(storage type, key, numel[, view metadata]) of a persistent id, checked."""
  if not isinstance(pid, tuple) or not pid:
    raise CheckpointError(f"{path}: malformed storage reference {pid!r:.80}")
  kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
  if kind != "storage" or len(pid) != (6 if legacy else 5):
    raise CheckpointError(f"{path}: unsupported persistent id {kind!r:.40} (only tensor storages are supported)")
  stype, key, _location, numel = pid[1:5]
  if not isinstance(stype, _StorageType):
    raise CheckpointError(f"{path}: storage of an unknown type {stype!r:.60}")
  if not isinstance(key, str) or not _is_int(numel) or numel < 0:
    raise CheckpointError(f"{path}: malformed storage reference {pid!r:.80}")
  return stype.dtype, key, numel, (pid[5] if legacy else None)


def _resolve(obj, path, depth=0):
  """The unpickled object with every pending tensor built as a numpy array."""
  if depth > 100:
    raise CheckpointError(f"{path}: nested too deeply")
  if isinstance(obj, _Pending):
    return _build_tensor(obj, path)
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v, path, depth + 1)
    return out
  if isinstance(obj, list):
    return [_resolve(v, path, depth + 1) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, path, depth + 1) for v in obj)
  if isinstance(obj, (_Storage, _StorageType, _DType)):
    return repr(obj)  # a bare storage / dtype outside a tensor: keep a readable marker, never the stand-in
  return obj


def _build_tensor(p: _Pending, path) -> np.ndarray:
  storage = p.storage
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"{path}: a tensor without a storage ({type(storage).__name__})")
  flat = storage.array()
  if p.dtype is not None and p.dtype != flat.dtype:  # _rebuild_tensor_v3: untyped bytes viewed as dtype
    if flat.dtype != np.uint8 or flat.size % p.dtype.itemsize:
      raise CheckpointError(f"{path}: storage of {flat.size} bytes does not hold whole {p.dtype} elements")
    flat = flat.view(p.dtype)
  size, stride, offset = p.size, p.stride, p.offset
  if not (
    isinstance(size, tuple)
    and isinstance(stride, tuple)
    and len(size) == len(stride) <= _MAX_DIMS
    and all(_is_int(x) and x >= 0 for x in (*size, *stride, offset))
  ):
    raise CheckpointError(f"{path}: malformed tensor (size {size!r:.60}, stride {stride!r:.60}, offset {offset!r:.20})")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointError(
      f"{path}: a tensor of size {size} (stride {stride}, offset {offset}) reaches past its storage of {flat.size} "
      "elements"
    )
  numel = int(np.prod(size, dtype=np.int64))
  contiguous = all(s == int(np.prod(size[i + 1 :], dtype=np.int64)) for i, s in enumerate(stride) if size[i] > 1)
  if contiguous and offset == 0 and numel == flat.size:
    return flat.reshape(size)  # the whole storage: no copy (tensors sharing it share memory, as with torch.load)
  if contiguous:
    return flat[offset : offset + numel].reshape(size).copy()
  isz = flat.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * isz for s in stride], writeable=False)
  return view.copy()


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int, path) -> np.ndarray:
  buf = np.empty(nbytes, np.uint8)
  view = memoryview(buf)
  with zf.open(info) as f:
    got = 0
    while got < nbytes:
      n = f.readinto(view[got:])
      if not n:
        break
      got += n
  if got != nbytes:
    raise CheckpointError(f"{path}: storage {info.filename} is truncated ({got} of {nbytes} bytes)")
  return buf


def _load_zip(path: Path):
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f"{path}: not a readable zip archive ({e})") from e
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1] or [n for n in names if n == "data.pkl"]
    if any(n.endswith("constants.pkl") or "/code/" in n or n.startswith("code/") for n in names):
      raise CheckpointError(
        f"{path}: a TorchScript archive (e.g. OpenAI's CLIP release .pt), not a state dict; reading those is not "
        "supported: load it with torch.jit.load(...).state_dict() and save that (or use the HF / open_clip weights)"
      )
    if len(pkls) != 1:
      raise CheckpointError(f"{path}: a zip archive but not a torch.save file (no single <folder>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in names:
      bo = zf.read(prefix + "byteorder").strip()
      if bo not in (b"little", b"big"):
        raise CheckpointError(f"{path}: unknown byteorder {bo[:20]!r}")
      order = "<" if bo == b"little" else ">"
    storages: dict[str, _Storage] = {}

    def load_storage(pid):
      dtype, key, numel, _ = _storage_id(pid, path, legacy=False)
      if key in storages:
        st = storages[key]
        if st.dtype != dtype or st.numel != numel:
          raise CheckpointError(f"{path}: storage {key!r} named with two different types or sizes")
        return st
      member = f"{prefix}data/{key}"
      try:
        info = zf.getinfo(member)
      except KeyError:
        raise CheckpointError(f"{path}: storage {member} is missing") from None
      nbytes = numel * dtype.itemsize
      if info.file_size != nbytes:
        raise CheckpointError(
          f"{path}: storage {member} holds {info.file_size} bytes, the pickle declares {numel} x {dtype} = {nbytes}"
        )
      st = _Storage(dtype, numel)
      raw = _read_member(zf, info, nbytes, path)
      if order == ">" and dtype.itemsize > 1:
        st.data = raw.view(dtype.newbyteorder(">")).astype(dtype)
      else:
        st.data = raw.view(dtype)
      storages[key] = st
      return st

    with zf.open(pkls[0]) as f:
      obj = _unpickle(_SafeUnpickler(f, path, load_storage), path)
    return _resolve(obj, path)


def _unpickle(unpickler: _SafeUnpickler, path):
  try:
    return unpickler.load()
  except CheckpointError:
    raise
  except RecursionError as e:
    raise CheckpointError(f"{path}: pickle nested too deeply") from e
  except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError from a malformed stream
    raise CheckpointError(f"{path}: not a readable torch.save pickle ({type(e).__name__}: {str(e)[:200]})") from e


def _load_legacy(path: Path):
  """The pre-1.6 format: pickles of the magic number, protocol version and sys info, the object (storages as
  persistent ids), the list of storage keys, then for each key an int64 element count and the raw bytes."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    try:
      magic = _SafeUnpickler(f, path).load()
      proto = _SafeUnpickler(f, path).load() if magic == _LEGACY_MAGIC else None
      info = _SafeUnpickler(f, path).load() if proto == _LEGACY_PROTOCOL else None
    except CheckpointError:
      raise
    except Exception:
      magic = None
    if magic != _LEGACY_MAGIC or proto != _LEGACY_PROTOCOL or not isinstance(info, dict):
      if magic != _LEGACY_MAGIC and _is_tar(path):
        raise CheckpointError(
          f"{path}: legacy torch format (tar, torch < 0.4): re-save with torch>=1.6 or convert to safetensors"
        )
      raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle)")
    if not info.get("little_endian", True):
      raise CheckpointError(
        f"{path}: legacy torch format written on a big-endian machine: re-save with torch>=1.6 or convert to "
        "safetensors"
      )
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def load_storage(pid):
      dtype, key, numel, view = _storage_id(pid, path, legacy=True)
      root = roots.get(key)
      if root is None:
        root = roots[key] = _Storage(dtype, numel)
      elif root.dtype != dtype or root.numel != numel:
        raise CheckpointError(f"{path}: storage {key!r} named with two different types or sizes")
      if view is None:
        return root
      if not (isinstance(view, tuple) and len(view) == 3 and all(_is_int(x) and x >= 0 for x in view[1:])):
        raise CheckpointError(f"{path}: malformed storage view {view!r:.80}")
      view_key, start, n = view
      if start + n > numel:
        raise CheckpointError(f"{path}: storage view {view_key!r} reaches past its storage")
      if view_key not in views:
        views[view_key] = _Storage(dtype, n, base=root, start=start)
      return views[view_key]

    obj = _unpickle(_SafeUnpickler(f, path, load_storage), path)
    keys = _unpickle(_SafeUnpickler(f, path), path)
    if not isinstance(keys, list) or set(keys) != set(roots):
      raise CheckpointError(f"{path}: the storage list does not match the storages the pickle names")
    for key in keys:
      st = roots[key]
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointError(f"{path}: truncated before storage {key!r}")
      (numel,) = struct.unpack("<q", head)
      nbytes = numel * st.dtype.itemsize
      if numel != st.numel or nbytes > size - f.tell():
        raise CheckpointError(
          f"{path}: storage {key!r} declares {numel} elements; expected {st.numel} and at most the file's remaining "
          f"{size - f.tell()} bytes"
        )
      buf = np.empty(nbytes, np.uint8)
      if f.readinto(memoryview(buf)) != nbytes:
        raise CheckpointError(f"{path}: storage {key!r} is truncated")
      st.data = buf.view(st.dtype)
  return _resolve(obj, path)


def _is_tar(path: Path) -> bool:
  import tarfile

  try:
    return tarfile.is_tarfile(path)
  except OSError:
    return False


def load_torch_pickle(path: str | os.PathLike):
  """What `torch.load(path, weights_only=True)` returns, with tensors as numpy arrays (native dtypes, bf16 as
  `ml_dtypes.bfloat16`), read without torch and without running anything from the file (see the module doc)."""
  path = Path(path)
  with open(path, "rb") as f:
    zipped = f.read(4) == b"PK\x03\x04"  # as torch tells the formats apart (a legacy file may hold PK bytes)
  return _load_zip(path) if zipped else _load_legacy(path)


def unwrap_state_dict(obj, path="checkpoint") -> dict:
  """Finds the tensor dict inside common training-checkpoint wrappers and strips DDP's `module.` prefix."""
  seen = 0
  while isinstance(obj, Mapping) and seen < 4:
    if any(k in obj for k in _WRAPPER_KEYS) and not _looks_like_tensors(obj):
      key = next(k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping))
      obj = obj[key]
      seen += 1
    else:
      break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    k = k[len("module.") :] if k.startswith("module.") else k
    out[k] = v
  return out


def _looks_like_tensors(d: Mapping) -> bool:
  vals = list(d.values())[:8]
  return bool(vals) and all(hasattr(v, "shape") for v in vals)


def load_state_dict(path: str | os.PathLike, keep_dtype: bool = False) -> dict[str, np.ndarray]:
  """Reads a safetensors file, a PyTorch pickle (plain or wrapped in {'state_dict': ...}; read without torch), or a
  sharded safetensors index (`*.safetensors.index.json`). Non-tensor entries are dropped. fp16 / bf16 tensors of a
  pickle become float32 unless `keep_dtype`; safetensors tensors keep their stored dtype."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file")
  if path.is_dir():
    raise CheckpointError(f"{path}: is a directory; expected a weights file")
  if path.stat().st_size == 0:
    raise CheckpointError(f"{path}: empty file")
  if path.name.endswith(".index.json"):
    index = json.loads(path.read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
      out.update(load_state_dict(path.parent / shard, keep_dtype))
    return out
  if _is_safetensors(path):
    return load_safetensors(path)
  obj = unwrap_state_dict(load_torch_pickle(path), path)
  out = {}
  for k, v in obj.items():
    if isinstance(v, np.ndarray):
      out[k] = v if keep_dtype else _upcast(v)
  if not out:
    raise CheckpointError(f"{path}: holds no tensors")
  return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None):

  Path(path).parent.mkdir(parents=True, exist_ok=True)
  # (np.ascontiguousarray would turn 0-d tensors such as logit_scale into shape (1,))
  save_file({k: np.array(v, order="C", copy=True) for k, v in tensors.items()}, str(path), metadata=metadata)
