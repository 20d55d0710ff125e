"""`hps-jax convert`: any supported PyTorch / safetensors state-dict checkpoint to one safetensors file.

The PyTorch pickles (`torch.save` zip files, the legacy pre-1.6 format, and TorchScript archives) are read by the
torch-free, allow-listed reader in `hps_jax.convert.io`: torch is not needed, and nothing in the file is executed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hps_jax import files
from hps_jax.cli.common import UsageError, add_parser
from hps_jax.convert.io import load_state_dict, save_safetensors


def add_convert(sub):
  p = add_parser(
    sub,
    "convert",
    help="any supported PyTorch / safetensors checkpoint to safetensors (no torch needed)",
    description="Reads a state dict (a torch.save .pt / .pth / .bin / .ckpt, plain or wrapped in {'state_dict': ...}, "
    "a safetensors file or a sharded *.safetensors.index.json) without torch and without running code from the "
    "file, and writes its tensors, dtypes kept, to one safetensors file. A TorchScript archive (torch.jit.save, e.g. "
    "OpenAI's CLIP .pt) gives its module's state dict.",
  )
  p.add_argument("src", metavar="SRC", help="the checkpoint to read")
  p.add_argument("dst", metavar="DST", help="the safetensors file to write (written atomically)")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  p.set_defaults(run=run_convert)


def run_convert(args) -> int:
  src, dst = Path(args.src), Path(args.dst)
  if dst.suffix != ".safetensors":
    raise UsageError(f"{dst}: DST must end in .safetensors")
  if not src.exists():
    raise UsageError(f"{src}: no such file")
  if dst.exists() and os.path.samefile(dst, src):
    raise UsageError(f"{dst}: DST is SRC; write to another file")
  if dst.exists() and not args.overwrite:
    raise UsageError(f"{dst}: exists (use --overwrite to replace it)")
  if dst.is_dir():
    raise UsageError(f"{dst}: is a directory")
  tensors = load_state_dict(src, keep_dtype=True)
  try:
    with files.atomic_path(dst, suffix=".safetensors") as tmp:
      save_safetensors(tensors, tmp)
  except Exception as e:  # an unwritable folder, a full disk, a dtype safetensors cannot hold: one line, exit 2
    raise UsageError(f"{dst}: cannot write ({type(e).__name__}: {e})") from e
  finally:
    if tmp.exists():
      tmp.unlink()
  print(f"wrote {len(tensors)} tensors to {dst}", file=sys.stderr)
  return 0
