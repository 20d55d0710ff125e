"""The Colab notebooks in notebooks/ run top to bottom on the offline tiny path (HPS_NOTEBOOK_FAST=1), in a kernel
of this interpreter, and produce what they claim: scores, a trained preference classifier, an HPS-labelled manifest,
a LoRA adapter, an A/B grid and the generator metrics.

The three run in order in one working folder, as a reader would run them: adapt_sd.ipynb labels with the classifier
train_preference.ipynb exported (it falls back to a random scorer when that is absent)."""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hps_jax.diffusion.render import GridLayout

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("score_images", "train_preference", "adapt_sd")
# Real-weight switches of the notebooks: unset, so that the tested path is the offline one.
REAL_WEIGHT_VARS = (
  "HPS_CHECKPOINT",
  "SD_MODEL_DIR",
  "CLIP_CHECKPOINT",
  "HPD_V1_DIR",
  "HPS_GENERATED_IMAGES",
  "HPS_REGULARIZATION",
  "HPS_JAX_INCEPTION_WEIGHTS",
  "AESTHETIC_MLP",
  "FID_REFERENCE",
)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
  """nbformat v4, a python3 kernel, no outputs or execution counts stored."""
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.fixture(scope="module")
def run_notebook(tmp_path_factory):
  """Executes a notebook with nbclient in a python3 kernel of sys.executable; returns (executed nb, seconds)."""
  from ipykernel.kernelspec import install
  from jupyter_client.kernelspec import KernelSpecManager

  prefix = tmp_path_factory.mktemp("kernelspec")
  install(prefix=str(prefix), kernel_name="python3")  # argv[0] = sys.executable
  workdir = tmp_path_factory.mktemp("notebook_out")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    mp.setenv("HPS_NOTEBOOK_FAST", "1")
    mp.setenv("HPS_NOTEBOOK_WORKDIR", str(workdir))
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("MPLBACKEND", "Agg")
    for var in REAL_WEIGHT_VARS:
      mp.delenv(var, raising=False)
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve(), spec.argv

    def run(name: str):
      nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
      client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(NOTEBOOKS)}}
      )
      t0 = time.time()
      client.execute()  # raises CellExecutionError on the first failing cell
      seconds = time.time() - t0
      print(f"{name}.ipynb executed in {seconds:.1f}s")
      errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
      assert not errors, errors
      return nb, workdir / name, seconds

    yield run


def _text(nb) -> str:
  """Everything the executed notebook printed (stdout streams and text/plain results)."""
  parts = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.output_type == "stream":
        parts.append(o.text)
      elif "data" in o and "text/plain" in o.data:
        parts.append(o.data["text/plain"])
  return "".join(parts)


def _jsonl(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_score_images(run_notebook):
  nb, out, _ = run_notebook("score_images")
  s = json.loads((out / "summary.json").read_text())
  assert s["random_weights"] is True and "RANDOM WEIGHTS" in _text(nb)
  n = len(s["images"])
  matrix = np.asarray(s["hps_matrix"])
  assert n == len(s["prompts"]) >= 3 and matrix.shape == (n, n) and np.isfinite(matrix).all()
  assert np.abs(matrix).max() <= 100.0 and np.ptp(matrix) > 0  # 100 * cosine, and not constant
  rows = _jsonl(out / "scores.jsonl")
  assert [r["prompt"] for r in rows] == s["prompts"]
  for i, r in enumerate(rows):  # the command line gives the API's numbers
    assert set(r) >= {"image", "prompt", "hps", "cosine"}
    assert r["hps"] == pytest.approx(matrix[i, i], abs=1e-3)
    assert r["hps"] == pytest.approx(100 * r["cosine"], abs=1e-3)


def test_train_preference(run_notebook):
  nb, out, _ = run_notebook("train_preference")
  s = json.loads((out / "summary.json").read_text())
  chance = s["random_expectation"]
  assert 0.25 < chance < 0.5
  assert abs(s["accuracy"]["untrained"] - chance) < 0.15  # random init: about chance
  assert s["accuracy"]["trained"] > max(0.55, s["accuracy"]["untrained"] + 0.15)
  assert s["accuracy"]["trained"] == pytest.approx(s["training_eval_accuracy"], abs=0.02)
  losses = [r["loss"] for r in _jsonl(out / "run" / "metrics.jsonl") if "loss" in r]
  assert len(losses) == s["num_steps"] and all(math.isfinite(v) for v in losses)
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  assert (out / "run" / "export" / "config.json").is_file()


def test_adapt_sd(run_notebook):
  from PIL import Image

  nb, out, _ = run_notebook("adapt_sd")
  s = json.loads((out / "summary.json").read_text())
  assert s["random_sd"] is True and s["scorer_kind"] in ("trained-tiny", "random-tiny")
  # the HPS-labelled manifest
  rows = _jsonl(s["manifest"])
  kinds = {r["kind"] for r in rows}
  assert kinds <= {"preferred", "non_preferred", "regularization"} and "regularization" in kinds
  if s["scorer_kind"] == "trained-tiny":  # a random scorer's HPS barely differ: it may select nothing
    assert kinds & {"preferred", "non_preferred"}, "the trained scorer selected no generated image"
  for r in rows:
    assert (Path(s["manifest"]).parent / r["image"]).is_file()
    if r["kind"] == "non_preferred":
      assert r["caption"].startswith("Weird image. ")
  assert s["label_counts"] == {
    k: sum(r["kind"] == k for r in rows) for k in ("preferred", "non_preferred", "regularization")
  }
  # the LoRA run
  assert Path(s["lora"]).is_file() and s["lora"].endswith(".safetensors")
  losses = [r["loss"] for r in _jsonl(out / "lora_run" / "metrics.jsonl") if "loss" in r]
  assert losses and all(math.isfinite(v) for v in losses)
  # the A/B grid: one row per image, base | adapted, 32x32 tiles on the tiny path
  samples = _jsonl(out / "samples" / "adapted" / "samples.jsonl")
  assert {r["negative_prompt"] for r in samples} == {"Weird image."}
  grid = np.asarray(Image.open(out / "samples" / "ab_grid.png"))
  h, w = s["sample_size"]
  scale = -(-256 // h)  # small tiles are enlarged (nearest) to >= 256 px
  layout = GridLayout(tile_h=h * scale, tile_w=w * scale, scale=scale)
  assert grid.shape == (
    layout.header + len(samples) * (layout.tile_h + layout.caption),
    2 * layout.tile_w + layout.gap,
    3,
  )
  t, l0, b, r0 = layout.box(0, 0)
  _, l1, _, r1 = layout.box(0, 1)
  assert np.abs(grid[t:b, l0:r0].astype(int) - grid[t:b, l1:r1]).max() > 0  # the adapted side differs from the base
  # eval-generator: base vs adapted, CLIP score and HPS at least
  table = json.loads((out / "eval" / "table4.json").read_text())
  assert set(table["results"]) == {"base", "adapted"}
  for r in table["results"].values():
    assert r["num_generated"] == len(s["eval_prompts"]) * s["eval_images_per_prompt"]
    assert math.isfinite(r["clip_score"]) and math.isfinite(r["hps_mean"])
  assert (out / "eval" / "table4.md").read_text().startswith("| model |")
