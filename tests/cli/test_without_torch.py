"""The real checkpoint formats without PyTorch: in a process where `import torch` fails, `hps-jax score` on an
OpenAI-layout `hpc.pt` (fp16 storages, `module.` prefix) and an open_clip `{'state_dict': ...}` .pt (bf16 storages),
`hps-jax aesthetic` on the real LAION head `.pth`, and `hps-jax fid` with a torch-saved FID Inception `.pth` give the
numbers of the same weights read by `torch.load` (written as safetensors by this process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hps_jax.cli import main
from hps_jax.convert.clip import save_hf
from hps_jax.convert.inception import save_inception_torch
from hps_jax.convert.io import save_safetensors
from hps_jax.models.clip import CLIP, CLIPConfig
from hps_jax.models.inception import FIDInception

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
from hps_jax.cli import main
print(json.dumps([main(argv) for argv in json.loads(sys.argv[1])]))
"""


def _without_torch(runs: list[list[str]]) -> list[int]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run(
    [sys.executable, "-c", _CHILD, json.dumps(runs)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


def _rows(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Each checkpoint twice: as torch.save wrote it, and its torch.load-ed tensors as safetensors (the reference)."""
  from tests.refs import open_clip_model

  pytest.importorskip("open_clip")
  d = tmp_path_factory.mktemp("no_torch")
  sd = open_clip_model(CLIPConfig.tiny(), seed=5).state_dict()
  torch.save({"state_dict": {"module." + k: v.half() for k, v in sd.items()}, "epoch": 1}, d / "hpc.pt")
  torch.save({"state_dict": {k: v.bfloat16() for k, v in sd.items()}}, d / "HPS_v2_tiny.pt")
  for name, key in (("hpc", "state_dict"), ("HPS_v2_tiny", "state_dict")):
    loaded = torch.load(d / f"{name}.pt", map_location="cpu", weights_only=True)[key]
    save_safetensors(
      {k.removeprefix("module."): v.float().numpy() for k, v in loaded.items()}, d / f"{name}.safetensors"
    )
  inception = FIDInception(rngs=nnx.Rngs(0))
  save_inception_torch(inception, d / "inception.pth")
  ref = torch.load(d / "inception.pth", map_location="cpu", weights_only=True)
  save_safetensors({k: v.numpy() for k, v in ref.items()}, d / "inception.safetensors")
  save_hf(CLIP(CLIPConfig.tiny().replace(embed_dim=768), rngs=nnx.Rngs(1)), d / "clip768")
  rng = np.random.default_rng(0)
  for s in ("a", "b"):
    (d / s).mkdir()
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(d / s / f"{i}.png")
  return d


def test_score_reads_hpc_pt_and_open_clip_pt_without_torch(files, tmp_path):
  d = files
  runs, refs = [], []
  for name, fmt in (("hpc", "openai"), ("HPS_v2_tiny", "open_clip")):
    common = ["score", "--format", fmt, "--prompt", "a red circle", str(d / "a")]
    runs.append([*common, "--checkpoint", str(d / f"{name}.pt"), "--output", str(tmp_path / f"{name}_pt.jsonl")])
    refs.append([*common, "--checkpoint", str(d / f"{name}.safetensors"), "--output", str(tmp_path / f"{name}.jsonl")])
  assert _without_torch(runs) == [0, 0]
  for argv in refs:
    assert main(argv) == 0
  for name in ("hpc", "HPS_v2_tiny"):
    got, want = _rows(tmp_path / f"{name}_pt.jsonl"), _rows(tmp_path / f"{name}.jsonl")
    assert [r["image"] for r in got] == [r["image"] for r in want] and len(got) == 3
    # the same float32 weights in the same program: equal up to float32 resolution at HPS scale
    np.testing.assert_allclose([r["hps"] for r in got], [r["hps"] for r in want], rtol=0, atol=1e-4)


def test_aesthetic_and_fid_weights_without_torch(files, tmp_path, aesthetic_weights):
  d = files
  head = aesthetic_weights / "sac+logos+ava1-l14-linearMSE.pth"
  ref_head = tmp_path / "head.safetensors"
  save_safetensors({k: v.numpy() for k, v in torch.load(head, map_location="cpu", weights_only=True).items()}, ref_head)
  aesthetic = ["aesthetic", "--clip-checkpoint", str(d / "clip768"), str(d / "a")]
  fid = ["fid", str(d / "a"), str(d / "b"), "--batch-size", "3"]
  codes = _without_torch(
    [
      [*aesthetic, "--aesthetic-mlp", str(head), "--output", str(tmp_path / "aes_pth.jsonl")],
      [*fid, "--inception-weights", str(d / "inception.pth"), "--save-stats", str(tmp_path / "a_pth.npz")],
    ]
  )
  assert codes == [0, 0]
  assert main([*aesthetic, "--aesthetic-mlp", str(ref_head), "--output", str(tmp_path / "aes.jsonl")]) == 0
  got, want = _rows(tmp_path / "aes_pth.jsonl"), _rows(tmp_path / "aes.jsonl")
  np.testing.assert_allclose([r["aesthetic"] for r in got], [r["aesthetic"] for r in want], rtol=0, atol=1e-5)
  assert (
    main([*fid, "--inception-weights", str(d / "inception.safetensors"), "--save-stats", str(tmp_path / "a.npz")]) == 0
  )
  with np.load(tmp_path / "a_pth.npz") as a_pth, np.load(tmp_path / "a.npz") as a:
    np.testing.assert_allclose(a_pth["mu"], a["mu"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a_pth["sigma"], a["sigma"], rtol=0, atol=1e-6)
