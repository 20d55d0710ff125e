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
  storage keys, then each storage's bytes), what `torch.save(..., _use_new_zipfile_serialization=False)` writes;
- TorchScript archives (`torch.jit.save` of a scripted or traced module, e.g. OpenAI's CLIP release `.pt`): the zip
  format plus `<folder>/code/` (the module's TorchScript source) and `<folder>/constants.pkl`. They read as the
  module's `state_dict()`: dotted names along the attribute tree (`visual.transformer.resblocks.0.attn.in_proj_weight`,
  `visual.bn1.running_mean`), each module's parameters then its buffers, then its sub-modules'. The module objects
  (`__torch__.<module path>.<Class>` in data.pkl) become inert `_ScriptObject`s holding their attribute dict; which
  attributes are parameters and buffers is read (not run) from the `__parameters__ = [...]` / `__buffers__ = [...]`
  lines of each class's source, as `torch.jit.load` registers them: other tensor attributes and other values are not
  part of the state dict, and only the storages of state-dict tensors are read. `constants.pkl` (the code's tensor
  constants, storages in `<folder>/constants/`) is not needed. As in torch, every buffer is in it (TorchScript keeps
  no 'non-persistent' mark: open_clip's causal `attn_mask` appears).

Refused with a clear error: TorchScript archives of torch < 1.4 (`model.json`), tar-format files of torch < 0.4,
big-endian legacy files, tensors that reach outside their storage. A storage is only allocated after checking that
the file holds all its bytes.

Untrusted files (every failure is one `CheckpointError` line naming the file, never another exception):

- a pickle is scanned (`pickletools.genops`, nothing executed) before it is unpickled: a memo index beyond the
  number of opcodes read so far (which would make the unpickler allocate a memo table of that size) is refused;
  `bytearray(n)` with a number is refused; shared sub-objects are resolved once (no exponential walk of a DAG);
- a stride-0 / overlapping view may not expand its storage beyond 64 MiB; a storage must fit in the archive
  (zip: stored, or deflated within deflate's maximum ratio) or in the rest of the file (legacy);
- a sharded index (`*.safetensors.index.json`) must be a JSON object whose `weight_map` maps names to shard files
  inside the index's folder (no absolute paths, no `..`, no shard that is itself an index); each named tensor must
  be in its shard and no tensor in two shards;
- a safetensors file is validated by `safetensors` itself (header size and offsets against the file size).

`tensor_info` reads names, shapes and dtypes without the tensor data (safetensors headers; the pickle with its
storages checked but not read), so converters can check a config against the weights before loading or building
anything. Non-finite (NaN / Inf) floating-point weights load, with a `NonFiniteWeightsWarning` naming the file and the
tensors (`non_finite_keys`): scores computed with them are refused downstream.
"""

from __future__ import annotations

import ast
import builtins
import collections
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hps_jax import files
from hps_jax.errors import InputError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "params")


class CheckpointError(InputError):
  """A checkpoint file that cannot be read or does not hold what was expected; the message names the file."""


class _Refused(CheckpointError):
  """A pickle names a global outside the allow-list."""


class NonFiniteWeightsWarning(UserWarning):
  """A checkpoint holds NaN / Inf weights: it loads, but what is computed with it may be non-finite."""


class TensorInfo(NamedTuple):
  """A tensor's shape and dtype name (numpy's, e.g. 'float32', 'bfloat16'), read without its data."""

  shape: tuple[int, ...]
  dtype: str

  @property
  def ndim(self) -> int:
    return len(self.shape)


_MAX_JSON_BYTES = 64 << 20  # config.json / index.json files are KBs to a few MBs
_MAX_PICKLE_BYTES = 256 << 20  # the pickle of a state dict (without the storages) is KBs to MBs
_MAX_EXPANSION_BYTES = 64 << 20  # what a stride-0 / overlapping view may materialize beyond its storage
_MAX_CODE_BYTES = 256 << 20  # the TorchScript source read to find a module tree's parameters and buffers (all files)
_MAX_NAME_LIST_CHARS = 1 << 20  # one class's `__parameters__ = [...]` line
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this
_SAFETENSORS_DTYPES = {
  "F64": "float64",
  "F32": "float32",
  "F16": "float16",
  "BF16": "bfloat16",
  "I64": "int64",
  "I32": "int32",
  "I16": "int16",
  "I8": "int8",
  "U64": "uint64",
  "U32": "uint32",
  "U16": "uint16",
  "U8": "uint8",
  "BOOL": "bool",
  "F8_E4M3": "float8_e4m3fn",
  "F8_E5M2": "float8_e5m2",
}


def one_line(text, limit: int = 300) -> str:
  """`text` (an exception's message, ...) as a single line of at most `limit` characters."""
  s = " ".join(str(text).split())
  return s if len(s) <= limit else s[: limit - 3] + "..."


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _no_constant(name):
  raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | os.PathLike, what: str = "a JSON object", max_bytes: int = _MAX_JSON_BYTES) -> dict:
  """A JSON object (config.json, an index, adapter_config.json) from an untrusted file: size-limited, UTF-8, no
  NaN / Infinity, and a JSON object at the top; anything else is a `CheckpointError` naming the file and `what` was
  expected."""
  path = Path(path)
  try:
    if path.is_dir():
      raise CheckpointError(f"{path}: is a directory; expected {what}")
    size = path.stat().st_size
    if size > max_bytes:
      raise CheckpointError(f"{path}: {size} bytes, too large for {what} (at most {max_bytes})")
    raw = path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({one_line(e.strerror or e)}); expected {what}") from e
  try:
    obj = json.loads(raw, parse_constant=_no_constant)
  except RecursionError as e:
    raise CheckpointError(f"{path}: JSON nested too deeply; expected {what}") from e
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
    raise CheckpointError(f"{path}: not valid JSON ({one_line(e, 120)}); expected {what}") from e
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: holds {_JSON_TYPES.get(type(obj), 'null')}; expected {what}")
  return obj


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
    raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(e, 200)})") from e
  return out


def _safetensors_info(path) -> dict[str, TensorInfo]:
  """Names, shapes and dtypes from a safetensors header (validated by safetensors against the file size)."""
  out = {}
  try:
    with safe_open(str(path), framework="numpy") as f:
      for k in f.keys():
        sl = f.get_slice(k)
        dt = sl.get_dtype()
        out[k] = TensorInfo(tuple(int(n) for n in sl.get_shape()), _SAFETENSORS_DTYPES.get(dt, dt.lower()))
  except Exception as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(e, 200)})") from e
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
    self.member: zipfile.ZipInfo | None = None  # zip: where its bytes are (checked), when read after the pickle

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


def _bytearray(*args):
  # protocol-2 pickles write bytearrays as bytearray(text, 'latin-1'); bytearray(n) would allocate n bytes
  if args and not isinstance(args[0], (str, bytes)):
    raise pickle.UnpicklingError(f"bytearray is only allowed from bytes or text, not from {type(args[0]).__name__}")
  return bytearray(*args)


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
  **{("builtins", n): getattr(builtins, n) for n in ("set", "frozenset", "tuple", "list", "dict", "complex", "slice")},
  ("builtins", "bytearray"): _bytearray,
}


def _typed_list(data):
  # torch.jit._pickle.build_intlist & co.: TorchScript's typed lists, pickled as build_*list([...])
  if not isinstance(data, list):
    raise pickle.UnpicklingError(f"a TorchScript typed list from {type(data).__name__}, not a list")
  return data


def _restore_type_tag(value, type_str=None):
  # torch.jit._pickle.restore_type_tag(value, 'Dict[str, Tensor]'): the static type of a TorchScript list / dict
  return value


# what TorchScript's pickler adds to torch.save's globals (only allowed in a TorchScript archive's data.pkl); its
# `__torch__.<module path>.<Class>` objects are `_ScriptObject`s
_SCRIPT_ALLOWED: dict[tuple[str, str], object] = {
  **{("torch.jit._pickle", f"build_{k}list"): _typed_list for k in ("int", "double", "bool", "tensor")},
  ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _ScriptObject:
  """Stand-in for an instance of a TorchScript class `__torch__.<module path>.<Class>` (a scripted / traced module,
  or a scripted class): nothing of the class is imported or run. The unpickler makes one subclass per class name
  (`qualname`); the pickled state (for a module: its attribute dict) is kept, unchecked, as `state`."""

  __slots__ = ("state",)
  qualname = "__torch__"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.state = None
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state


# opcodes that store into the unpickler's memo at an index given in the stream
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _scan_pickle(stream, path, max_bytes: int | None = None) -> None:
  """Walks the opcodes of one pickle (up to STOP) without executing anything; the stream's position is restored.
  Refuses a memo index larger than the number of opcodes read so far: a pickler numbers its memo entries
  consecutively, and CPython's unpickler allocates (and zeroes) a memo table as large as the index."""
  start = stream.tell()
  n = 0
  try:
    for op, arg, pos in pickletools.genops(stream):
      n += 1
      if op.name in _MEMO_PUTS and (not _is_int(arg) or arg > n):
        raise CheckpointError(f"{path}: malformed pickle (memo index {arg!r:.30} at byte {pos})")
      if max_bytes is not None and pos is not None and pos - start > max_bytes:
        raise CheckpointError(f"{path}: pickle larger than {max_bytes} bytes")
  except CheckpointError:
    raise
  except RecursionError as e:
    raise CheckpointError(f"{path}: pickle nested too deeply") from e
  except Exception as e:  # ValueError (bad opcode, truncated), MemoryError, ...
    raise CheckpointError(f"{path}: not a readable torch.save pickle ({type(e).__name__}: {one_line(e, 160)})") from e
  stream.seek(start)


class _SafeUnpickler(pickle.Unpickler):
  """Resolves globals against `_ALLOWED` only, and hands each persistent id to `load_storage`. With `script` (a
  TorchScript archive's data.pkl), also `_SCRIPT_ALLOWED`, and every `__torch__.*` class becomes a `_ScriptObject`."""

  def __init__(self, file, path, load_storage=None, script: bool = False):
    super().__init__(file)
    self._path, self._load_storage, self._script = path, load_storage, script
    self._script_classes: dict[str, type] = {}

  def find_class(self, module, name):
    if module == "__builtin__":  # protocol 2 (torch.save's) names the builtins module as Python 2 did
      module = "builtins"
    found = _ALLOWED.get((module, name))
    if found is None and self._script:
      found = _SCRIPT_ALLOWED.get((module, name))
      if found is None and (module == "__torch__" or module.startswith("__torch__.")):
        qualname = f"{module}.{name}"
        found = self._script_classes.get(qualname)
        if found is None:
          found = type("_ScriptObject", (_ScriptObject,), {"__slots__": (), "qualname": qualname})
          self._script_classes[qualname] = found
    if found is None:
      raise _Refused(
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


class _Resolver:
  """Turns the unpickled object into plain containers with every pending tensor built as a numpy array (or, with
  `meta`, described as a `TensorInfo`). Each object is resolved once (memoized by identity), so a pickle whose
  containers share sub-objects cannot make the walk exponential; the number of containers and their nesting are
  bounded."""

  def __init__(self, path, meta: bool):
    self.path, self.meta = path, meta
    self.memo: dict[int, object] = {}  # the unpickled root keeps every input alive: ids stay unique
    self.nodes = 0

  def __call__(self, obj, depth=0):
    if depth > 100:
      raise CheckpointError(f"{self.path}: nested too deeply")
    if not isinstance(obj, (_Pending, dict, list, tuple, _Storage, _StorageType, _DType)):
      return obj
    if id(obj) in self.memo:
      return self.memo[id(obj)]
    self.nodes += 1
    if self.nodes > 10_000_000:
      raise CheckpointError(f"{self.path}: too many objects in the pickle")
    if isinstance(obj, _Pending):
      out = _tensor_info(obj, self.path) if self.meta else _build_tensor(obj, self.path)
    elif isinstance(obj, dict):
      out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
      for k, v in obj.items():
        out[k] = self(v, depth + 1)
    elif isinstance(obj, list):
      out = [self(v, depth + 1) for v in obj]
    elif isinstance(obj, tuple):
      out = tuple(self(v, depth + 1) for v in obj)
    else:
      out = repr(obj)  # a bare storage / dtype outside a tensor: keep a readable marker, never the stand-in
    self.memo[id(obj)] = out
    return out


def _resolve(obj, path, meta: bool = False):
  return _Resolver(path, meta)(obj)


def _layout(p: _Pending, path) -> tuple[np.dtype, tuple, tuple, int, int]:
  """(dtype, size, stride, offset, elements of the storage in dtype) of a pending tensor, validated against its
  storage's declared size (no data needed)."""
  storage = p.storage
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"{path}: a tensor without a storage ({type(storage).__name__})")
  dtype, numel = storage.dtype, storage.numel
  if p.dtype is not None and p.dtype != dtype:  # _rebuild_tensor_v3: untyped bytes viewed as dtype
    if dtype != np.uint8 or numel % p.dtype.itemsize:
      raise CheckpointError(f"{path}: storage of {numel} bytes does not hold whole {p.dtype} elements")
    dtype, numel = p.dtype, numel // p.dtype.itemsize
  size, stride, offset = p.size, p.stride, p.offset
  if not (
    isinstance(size, tuple)
    and isinstance(stride, tuple)
    and len(size) == len(stride) <= _MAX_DIMS
    and all(_is_int(x) and x >= 0 for x in (*size, *stride, offset))
  ):
    raise CheckpointError(f"{path}: malformed tensor (size {size!r:.60}, stride {stride!r:.60}, offset {offset!r:.20})")
  if 0 not in size:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
      raise CheckpointError(
        f"{path}: a tensor of size {size} (stride {stride}, offset {offset}) reaches past its storage of {numel} "
        "elements"
      )
    total = math.prod(size)
    if total > numel and total * dtype.itemsize > _MAX_EXPANSION_BYTES:
      raise CheckpointError(
        f"{path}: a tensor of size {size} (stride {stride}) repeats its storage of {numel} elements into "
        f"{total * dtype.itemsize} bytes (at most {_MAX_EXPANSION_BYTES} allowed)"
      )
  return dtype, size, stride, offset, numel


def _tensor_info(p: _Pending, path) -> TensorInfo:
  dtype, size, *_ = _layout(p, path)
  return TensorInfo(size, dtype.name)


def _build_tensor(p: _Pending, path) -> np.ndarray:
  dtype, size, stride, offset, _ = _layout(p, path)
  flat = p.storage.array()
  if dtype != flat.dtype:
    flat = flat.view(dtype)
  if 0 in size:
    return np.zeros(size, flat.dtype)
  numel = math.prod(size)
  contiguous = all(s == math.prod(size[i + 1 :]) for i, s in enumerate(stride) if size[i] > 1)
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


def _check_member(info: zipfile.ZipInfo, archive_size: int, path) -> None:
  """The archive must hold a member's bytes: stored, or deflated within deflate's maximum ratio, inside the file."""
  if info.header_offset + info.compress_size > archive_size:
    raise CheckpointError(f"{path}: {info.filename} reaches past the end of the archive (truncated?)")
  if info.compress_type == zipfile.ZIP_STORED:
    ok = info.compress_size == info.file_size
  else:
    ok = info.compress_type == zipfile.ZIP_DEFLATED and info.file_size <= _DEFLATE_MAX_RATIO * info.compress_size + 64
  if not ok:
    raise CheckpointError(
      f"{path}: {info.filename} declares {info.file_size} bytes from {info.compress_size} stored (compression "
      f"{info.compress_type}); not what torch.save writes"
    )


def _load_zip(path: Path, meta: bool = False):
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise CheckpointError(f"{path}: not a readable zip archive ({one_line(e, 200)})") from e
  archive_size = path.stat().st_size
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1] or [n for n in names if n == "data.pkl"]
    if len(pkls) != 1:
      if any(n.endswith("/model.json") or n == "model.json" for n in names):
        raise CheckpointError(
          f"{path}: a TorchScript archive in the format of torch < 1.4 (model.json), not supported: load it with "
          "torch.jit.load(...).state_dict() and save that"
        )
      raise CheckpointError(f"{path}: a zip archive but not a torch.save file (no single <folder>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    # torch.jit.save writes the module's code and its constants next to data.pkl
    script = prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names)
    order = "<"
    if prefix + "byteorder" in names:
      bo_info = zf.getinfo(prefix + "byteorder")
      _check_member(bo_info, archive_size, path)
      if bo_info.file_size > 16:
        raise CheckpointError(f"{path}: unknown byteorder record of {bo_info.file_size} bytes")
      bo = _read_zip(zf, bo_info, path).strip()
      if bo not in (b"little", b"big"):
        raise CheckpointError(f"{path}: unknown byteorder {bo[:20]!r}")
      order = "<" if bo == b"little" else ">"
    storages: dict[str, _Storage] = {}

    def read_storage(st: _Storage) -> None:
      raw = _read_member(zf, st.member, st.numel * st.dtype.itemsize, path)
      if order == ">" and st.dtype.itemsize > 1:
        st.data = raw.view(st.dtype.newbyteorder(">")).astype(st.dtype)
      else:
        st.data = raw.view(st.dtype)

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
      _check_member(info, archive_size, path)
      st = _Storage(dtype, numel)
      st.member = info
      storages[key] = st
      if not (meta or script):  # a TorchScript archive's storages are read once known to be in its state dict
        read_storage(st)
      return st

    info = zf.getinfo(pkls[0])
    _check_member(info, archive_size, path)
    if info.file_size > _MAX_PICKLE_BYTES:
      raise CheckpointError(f"{path}: {pkls[0]} is {info.file_size} bytes (a state dict's pickle is at most MBs)")
    f = io.BytesIO(_read_zip(zf, info, path))
    _scan_pickle(f, path)
    obj = _unpickle(_SafeUnpickler(f, path, load_storage, script=script), path)
    if script:
      obj = _script_state_dict(obj, _ScriptSource(zf, prefix, archive_size, path), path)
      if not meta:
        for p in obj.values():
          if isinstance(p.storage, _Storage) and p.storage.data is None:
            read_storage(p.storage)
    return _resolve(obj, path, meta)


class _ScriptSource:
  """The parameter and buffer names of the TorchScript classes of an archive, read (never run) from their source:
  class `__torch__.a.b.C` is printed in `<prefix>code/__torch__/a/b.py` as `class C(Module):` followed by
  `__parameters__ = ["weight", "bias", ]` and `__buffers__ = [...]` lines, the lists `torch.jit.load` registers the
  module's parameters and buffers from. Each source file is read once, size-limited."""

  _CLASS = re.compile(r"class\s+(\w+)\s*(?:\(\s*([\w.]*)\s*\))?\s*:")
  _LIST = re.compile(r"\s+__(parameters|buffers)__\s*=\s*(\[.*\])\s*")

  def __init__(self, zf: zipfile.ZipFile, prefix: str, archive_size: int, path):
    self.zf, self.prefix, self.archive_size, self.path = zf, prefix, archive_size, path
    self.files: dict[str, dict] = {}
    self.bytes_read = 0

  def module_names(self, qualname: str) -> tuple[tuple[str, ...], tuple[str, ...] | None] | None:
    """(parameter names, buffer names or None when the source lists none) of class `qualname` if it is a module;
    None for a class that is not a module (a scripted class, a custom C++ class `__torch__.torch.classes.*`)."""
    module, _, name = qualname.rpartition(".")
    member = f"{self.prefix}code/{module.replace('.', '/')}.py"
    if member not in self.files:
      self.files[member] = self._parse(member)
    classes = self.files[member]
    if name not in classes:
      if module == "__torch__.torch.classes" or module.startswith("__torch__.torch.classes."):
        return None
      raise CheckpointError(
        f"{self.path}: data.pkl holds an object of class {qualname!r:.120} that {member!r:.120} does not define "
        "(a TorchScript archive without its code?)"
      )
    return classes[name]

  def _parse(self, member: str) -> dict:
    try:
      info = self.zf.getinfo(member)
    except KeyError:
      return {}
    _check_member(info, self.archive_size, self.path)
    self.bytes_read += info.file_size
    if self.bytes_read > _MAX_CODE_BYTES:
      raise CheckpointError(
        f"{self.path}: more than {_MAX_CODE_BYTES} bytes of TorchScript code (at {member!r:.120}); a model's is MBs"
      )
    try:
      text = _read_zip(self.zf, info, self.path).decode("utf-8")
    except UnicodeDecodeError as e:
      raise CheckpointError(f"{self.path}: {member} is not UTF-8 text ({one_line(e, 100)})") from e
    classes: dict[str, tuple | None] = {}
    current = None  # [parameters, buffers] of the module class being read
    for line in text.splitlines():
      if not line.strip():
        continue
      if not line.startswith((" ", "\t")):
        m = self._CLASS.fullmatch(line.rstrip())
        if m is None:
          current = None
          continue
        current = [None, None] if m.group(2) == "Module" else None
        classes[m.group(1)] = current
        continue
      m = self._LIST.fullmatch(line.rstrip()) if current is not None else None
      if m is None:
        continue
      slot = 0 if m.group(1) == "parameters" else 1
      if current[slot] is None:
        current[slot] = self._names(m.group(2), member)
    out = {}
    for name, lists in classes.items():
      if lists is None:
        out[name] = None
      elif lists[0] is None:
        raise CheckpointError(f"{self.path}: {member}: module class {name!r:.80} has no __parameters__ list")
      else:
        out[name] = (lists[0], lists[1])
    return out

  def _names(self, text: str, member: str) -> tuple[str, ...]:
    if len(text) > _MAX_NAME_LIST_CHARS:
      raise CheckpointError(f"{self.path}: {member}: an attribute list of {len(text)} characters")
    try:
      names = ast.literal_eval(text)  # a literal list of strings: nothing is evaluated
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
      raise CheckpointError(f"{self.path}: {member}: unreadable attribute list {text!r:.80}") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise CheckpointError(f"{self.path}: {member}: attribute list {text!r:.80} is not a list of names")
    return tuple(names)


_MAX_SCRIPT_MODULES = 100_000  # module visits of one tree (ViT-H/14 has under 1,000 modules)


def _script_state_dict(root, source: _ScriptSource, path) -> collections.OrderedDict:
  """{dotted name: pending tensor} of a TorchScript module tree, as its `state_dict()`: each module's parameters,
  then its buffers (attribute order; None values skipped; every buffer, as TorchScript keeps no 'non-persistent'
  mark), then each sub-module's under `<attribute>.`. Plain tensor attributes and other values are not part of it.
  A sub-module reached through two attributes appears under both names, as in torch."""
  out: collections.OrderedDict = collections.OrderedDict()
  visits = 0

  def walk(obj: _ScriptObject, prefix: str, on_path: tuple) -> None:
    nonlocal visits
    visits += 1
    if visits > _MAX_SCRIPT_MODULES:
      raise CheckpointError(f"{path}: more than {_MAX_SCRIPT_MODULES} modules in the TorchScript module tree")
    if len(on_path) > 100:
      raise CheckpointError(f"{path}: TorchScript modules nested too deeply (at {prefix[:100]!r})")
    if id(obj) in on_path:
      raise CheckpointError(f"{path}: the TorchScript module {prefix[:-1][:100]!r} contains itself")
    names = source.module_names(obj.qualname)
    state = obj.state
    if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
      raise CheckpointError(
        f"{path}: the TorchScript module {prefix[:-1][:100]!r} ({obj.qualname:.120}) has a state of "
        f"{type(state).__name__}, not a dict of attributes"
      )
    params, buffers = names
    if buffers is None:  # a source that lists no buffers: every other tensor attribute is one
      buffers = tuple(k for k, v in state.items() if isinstance(v, _Pending) and k not in params)
    for kind, group in (("parameter", params), ("buffer", buffers)):
      for name in group:
        if name not in state:
          raise CheckpointError(
            f"{path}: the TorchScript module {prefix[:-1][:100]!r} ({obj.qualname:.120}) declares {kind} "
            f"{name!r:.80} but does not hold it"
          )
        value = state[name]
        if value is None:
          continue
        if not isinstance(value, _Pending):
          raise CheckpointError(
            f"{path}: {kind} {prefix + name!r:.160} of the TorchScript module is {type(value).__name__}, not a tensor"
          )
        if prefix + name in out:
          raise CheckpointError(f"{path}: {prefix + name!r:.160} named twice in the TorchScript module")
        out[prefix + name] = value
    for name, value in state.items():
      if isinstance(value, _ScriptObject) and source.module_names(value.qualname) is not None:
        walk(value, f"{prefix}{name}.", (*on_path, id(obj)))

  if not isinstance(root, _ScriptObject) or source.module_names(root.qualname) is None:
    raise CheckpointError(
      f"{path}: a TorchScript archive whose data.pkl holds {getattr(root, 'qualname', type(root).__name__)!r:.120}, "
      "not a module"
    )
  walk(root, "", ())
  return out


def _read_zip(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> bytes:
  try:
    return zf.read(info)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
    raise CheckpointError(f"{path}: cannot read {info.filename} ({one_line(e, 160)})") from e


def _unpickle(unpickler: _SafeUnpickler, path):
  try:
    return unpickler.load()
  except CheckpointError:
    raise
  except RecursionError as e:
    raise CheckpointError(f"{path}: pickle nested too deeply") from e
  except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError from a malformed stream
    raise CheckpointError(f"{path}: not a readable torch.save pickle ({type(e).__name__}: {one_line(e, 200)})") from e


def _small_pickle(f, path):
  """One of the legacy header pickles (magic number, protocol, sys info): scanned, then unpickled."""
  _scan_pickle(f, path, max_bytes=1 << 16)
  return _SafeUnpickler(f, path).load()


def _load_legacy(path: Path, meta: bool = False):
  """The pre-1.6 format: pickles of the magic number, protocol version and sys info, the object (storages as
  persistent ids), the list of storage keys, then for each key an int64 element count and the raw bytes."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    try:
      magic = _small_pickle(f, path)
      proto = _small_pickle(f, path) if magic == _LEGACY_MAGIC else None
      info = _small_pickle(f, path) if proto == _LEGACY_PROTOCOL else None
    except _Refused:
      raise
    except Exception:  # a malformed stream (the scan's CheckpointError included): not this format
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

    _scan_pickle(f, path, max_bytes=_MAX_PICKLE_BYTES)
    obj = _unpickle(_SafeUnpickler(f, path, load_storage), path)
    _scan_pickle(f, path, max_bytes=_MAX_PICKLE_BYTES)
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
      if meta:
        f.seek(nbytes, os.SEEK_CUR)
        continue
      buf = np.empty(nbytes, np.uint8)
      if f.readinto(memoryview(buf)) != nbytes:
        raise CheckpointError(f"{path}: storage {key!r} is truncated")
      st.data = buf.view(st.dtype)
  return _resolve(obj, path, meta)


def _is_tar(path: Path) -> bool:
  import tarfile

  try:
    return tarfile.is_tarfile(path)
  except OSError:
    return False


def load_torch_pickle(path: str | os.PathLike, *, meta: bool = False):
  """What `torch.load(path, weights_only=True)` returns, with tensors as numpy arrays (native dtypes, bf16 as
  `ml_dtypes.bfloat16`), read without torch and without running anything from the file (see the module doc); for a
  TorchScript archive, the module's `state_dict()` (an OrderedDict of dotted name -> array). With `meta`, tensors are
  `TensorInfo`s: the storages are checked against the file but not read."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      zipped = f.read(4) == b"PK\x03\x04"  # as torch tells the formats apart (a legacy file may hold PK bytes)
    return _load_zip(path, meta) if zipped else _load_legacy(path, meta)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({one_line(e.strerror or e)})") from e


def unwrap_state_dict(obj, path="checkpoint") -> dict:
  """Finds the tensor dict inside common training-checkpoint wrappers and strips DDP's `module.` prefix."""
  seen = 0
  while isinstance(obj, Mapping) and seen < 4:
    if any(k in obj for k in _WRAPPER_KEYS) and not _looks_like_tensors(obj):
      key = next((k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
      if key is None:
        break
      obj = obj[key]
      seen += 1
    else:
      break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(k, str):
      if hasattr(v, "shape"):
        raise CheckpointError(f"{path}: a tensor named {k!r:.60} ({type(k).__name__}); expected string names")
      continue
    k = k[len("module.") :] if k.startswith("module.") else k
    out[k] = v
  return out


def _looks_like_tensors(d: Mapping) -> bool:
  vals = list(d.values())[:8]
  return bool(vals) and all(hasattr(v, "shape") for v in vals)


def _check_file(path: Path) -> None:
  try:
    if not path.exists():
      raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
      raise CheckpointError(f"{path}: is a directory; expected a weights file")
    if path.stat().st_size == 0:
      raise CheckpointError(f"{path}: empty file")
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({one_line(e.strerror or e)})") from e


def is_index(path: str | os.PathLike) -> bool:
  """A sharded checkpoint's index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`)."""
  return Path(path).name.endswith(".index.json")


def index_shards(path: str | os.PathLike) -> dict[Path, list[str]]:
  """{shard file: the tensor names the index maps to it} of a sharded checkpoint index, checked: a JSON object with
  a non-empty `weight_map` of name -> relative file name; every shard stays inside the index's folder (no absolute
  path, no `..`, and its folder resolves inside the index's) and is not itself an index."""
  path = Path(path)
  index = read_json(path, "a sharded checkpoint index (a JSON object with a weight_map)")
  wm = index.get("weight_map")
  if not isinstance(wm, dict) or not wm:
    got = "missing" if wm is None else f"{_JSON_TYPES.get(type(wm), 'null')}" if not isinstance(wm, dict) else "empty"
    raise CheckpointError(f"{path}: weight_map is {got}; expected an object of tensor name -> shard file")
  folder = path.parent
  root = folder.resolve()
  shards: dict[Path, list[str]] = {}
  checked: dict[str, Path] = {}
  for key, shard in wm.items():
    if shard in checked:
      shards[checked[shard]].append(key)
      continue
    where = f"{path}: weight_map[{key!r:.80}]"
    if not isinstance(shard, str) or not shard.strip():
      raise CheckpointError(f"{where} is {shard!r:.60}; expected a shard file name")
    rel = Path(os.path.normpath(shard))
    if rel.is_absolute() or rel.drive or ".." in rel.parts or rel == Path("."):
      raise CheckpointError(f"{where} = {shard!r:.100} points outside the index's folder {folder}")
    # the shard's folder must resolve inside the index's; the file itself may be a symlink (the Hugging Face hub
    # cache links every file of a snapshot into its blobs/ folder)
    target = folder / rel
    if not target.parent.resolve().is_relative_to(root):
      raise CheckpointError(f"{where} = {shard!r:.100} resolves outside the index's folder {folder}")
    if is_index(rel) or target.resolve() == path.resolve():
      raise CheckpointError(f"{where} = {shard!r:.100} is an index, not a weights file")
    if not _is_file(target):
      raise CheckpointError(f"{where} = {shard!r:.100}: no such file in {folder}")
    checked[shard] = target
    shards[target] = [key]
  return shards


def _is_file(p: Path) -> bool:
  try:
    return p.is_file()
  except OSError:
    return False


def _load_index(path: Path, load_one) -> dict:
  """Every shard of an index read with `load_one(shard)`, checked against the weight map."""
  out: dict = {}
  for shard, keys in index_shards(path).items():
    part = load_one(shard)
    absent = [k for k in keys if k not in part]
    if absent:
      raise CheckpointError(f"{path}: maps {absent[0]!r} to {shard.name}, which does not hold it")
    twice = next((k for k in part if k in out), None)
    if twice is not None:
      raise CheckpointError(f"{path}: tensor {twice!r} is in more than one shard (again in {shard.name})")
    out.update(part)
  return out


def tensor_info(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """{name: TensorInfo(shape, dtype)} of a weights file (safetensors, a torch.save pickle, a TorchScript archive, a
  sharded index) without reading the tensor data: what a converter checks a config against before loading anything.
  Same validation and errors as `load_state_dict`."""
  path = Path(path)
  _check_file(path)
  if is_index(path):
    return _load_index(path, tensor_info)
  if _is_safetensors(path):
    return _safetensors_info(path)
  obj = unwrap_state_dict(load_torch_pickle(path, meta=True), path)
  out = {k: v for k, v in obj.items() if isinstance(v, TensorInfo)}
  if not out:
    raise CheckpointError(f"{path}: holds no tensors")
  return out


_FLOAT_NAMES = ("float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def check_float_weights(sd: Mapping, source, skip=None) -> None:
  """CheckpointError naming `source` and the first tensor of `sd` (arrays or `TensorInfo`s) that does not hold
  floating-point values (an int8 / bool tensor where a model expects weights), except keys for which `skip(key)`."""
  for k, v in sd.items():
    if skip is not None and skip(k):
      continue
    name = v.dtype if isinstance(v, TensorInfo) else np.asarray(v).dtype.name
    if name not in _FLOAT_NAMES:
      raise CheckpointError(f"{source}: {k} holds {name} values; expected floating-point weights")


def _is_float(a: np.ndarray) -> bool:
  return a.dtype.kind in "fc" or a.dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)


def non_finite_keys(sd: Mapping[str, np.ndarray]) -> list[str]:
  """The names of the floating-point tensors of `sd` holding NaN or Inf (a float64 sum per tensor, then an exact
  check of the few whose sum is not finite)."""
  bad = []
  for k, v in sd.items():
    a = np.asarray(v)
    if a.size and _is_float(a):
      with np.errstate(all="ignore"):
        quick = np.sum(a, dtype=np.complex128 if a.dtype.kind == "c" else np.float64)
      if not np.isfinite(quick) and not np.isfinite(a).all():
        bad.append(k)
  return bad


def _note_non_finite(sd: Mapping[str, np.ndarray], path) -> None:
  # an attention mask holds -inf by design (open_clip's causal mask is a buffer a TorchScript archive keeps)
  bad = [k for k in non_finite_keys(sd) if not k.endswith("attn_mask")]
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    warnings.warn(
      f"{path}: tensor {bad[0]}{more} hold NaN / Inf values; results computed with these weights may be non-finite",
      NonFiniteWeightsWarning,
      stacklevel=3,
    )


def load_state_dict(path: str | os.PathLike, keep_dtype: bool = False) -> dict[str, np.ndarray]:
  """Reads a safetensors file, a PyTorch pickle (plain or wrapped in {'state_dict': ...}; read without torch), a
  TorchScript archive (its module's state dict, e.g. OpenAI's CLIP `.pt` files), or a sharded index (`*.safetensors.index.json`, `*.bin.index.json`; shards confined to its folder, see
  `index_shards`). Non-tensor entries are dropped. fp16 / bf16 tensors of a pickle become float32 unless
  `keep_dtype`; safetensors tensors keep their stored dtype. NaN / Inf weights load with a
  `NonFiniteWeightsWarning`. Every problem with the file is a one-line `CheckpointError` naming it."""
  path = Path(path)
  out = _load(path, keep_dtype)
  _note_non_finite(out, path)
  return out


def _load(path: Path, keep_dtype: bool) -> dict[str, np.ndarray]:
  _check_file(path)
  if is_index(path):
    return _load_index(path, lambda shard: _load(shard, keep_dtype))
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
  """Writes `tensors` as safetensors at `path`, atomically (a temporary file renamed over it when complete)."""
  # (np.ascontiguousarray would turn 0-d tensors such as logit_scale into shape (1,))
  arrays = {k: np.array(v, order="C", copy=True) for k, v in tensors.items()}
  with files.atomic_path(path, suffix=".safetensors") as tmp:
    save_file(arrays, str(tmp), metadata=metadata)
