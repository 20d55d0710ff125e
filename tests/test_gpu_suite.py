"""bench/gpu_suite.sh --cpu-smoke: the GPU benchmark suite, the same script end to end, on this CPU at tiny sizes.

Asserts: the suite exits 0; every bench wrote its JSON (tagged with this device, `cpu_smoke`) holding that bench's
expected keys with finite numbers (bench.gpu_suite_summary.EXPECTED_KEYS, plus a FLOP count > 0 where XLA gives
one and a null MFU off a GPU); the switches the GPU run relies on reached the scripts (attention 'auto' traced,
remat on the LoRA step, bf16 compute); the markdown summary lists every result as ok. bench/score_e2e.py is
another script: when it exists its result must be there too, else the summary names it as skipped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("pytorch_fid")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_suite_summary import EXPECTED_KEYS, NULLABLE  # noqa: E402

TAG = "cpu_smoke"
RESULTS = {  # result file stem -> bench kind
  "score_vit_l14_bf16": "score",
  "score_vit_l14_fp32": "score",
  "score_vit_h14_bf16": "score",
  "score_vit_h14_fp32": "score",
  "train_preference_bf16": "train_preference",
  "unet_step_bf16": "unet_step",
  "fid": "fid",
  "train_lora_bf16": "train_lora",
  "sample_bf16": "sample",
}
E2E = (ROOT / "bench" / "score_e2e.py").exists()


def _numbers(value):
  if isinstance(value, bool):
    return
  if isinstance(value, (int, float)):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _numbers(v)
  elif isinstance(value, list):
    for v in value:
      yield from _numbers(v)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_suite")
  env = {**os.environ, "PYTHON": sys.executable, "HPS_SITE": str(out / "site")}
  proc = subprocess.run(
    ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--cpu-smoke", "--outdir", str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  return out, proc


def test_suite_exits_zero(smoke):
  out, proc = smoke
  logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs").glob("*.log")))
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n{logs}"


@pytest.mark.parametrize("stem", sorted(RESULTS))
def test_result_json(smoke, stem):
  out, _ = smoke
  kind = RESULTS[stem]
  path = out / f"{stem}_{TAG}.json"
  assert path.is_file(), f"{path.name} not written; suite output: {sorted(p.name for p in out.iterdir())}"
  r = json.loads(path.read_text())
  assert r["bench"] == kind
  assert r["backend"] == "cpu"
  for key in EXPECTED_KEYS[kind]:
    assert key in r, f"{stem}: no {key}"
    if key in NULLABLE:
      assert r[key] is None, f"{stem}: {key} should be null on a CPU (no known peak), got {r[key]}"
    else:
      assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), f"{stem}: {key} = {r[key]!r}"
  bad = [v for v in _numbers(r) if not math.isfinite(v)]
  assert not bad, f"{stem}: non-finite numbers {bad}"
  if "step_flops" in EXPECTED_KEYS[kind]:
    assert r["step_flops"] > 0, f"{stem}: XLA reported no FLOP count"
  assert r.get("dtype", "float32") == ("float32" if stem.endswith("fp32") or kind == "fid" else "bfloat16")


def test_switches_reached_the_scripts(smoke):
  out, _ = smoke
  load = lambda stem: json.loads((out / f"{stem}_{TAG}.json").read_text())  # noqa: E731
  for stem in ("score_vit_l14_bf16", "train_preference_bf16", "unet_step_bf16", "train_lora_bf16"):
    r = load(stem)
    assert r["attention"] == "auto"
    assert r["attention_impls"].get("xla", 0) > 0 and "cudnn" not in r["attention_impls"], (stem, r)
  lora = load("train_lora_bf16")
  assert lora["remat"] is True and lora["remat_policy"] == "nothing_saveable"
  assert lora["jax_adapter_params"] == lora["torch_adapter_params"] > 0


def test_summary_lists_every_result(smoke):
  out, _ = smoke
  md = (out / f"gpu_suite_{TAG}.md").read_text()
  record = json.loads((out / f"gpu_suite_{TAG}.json").read_text())
  status = {r["name"]: r["status"] for r in record["results"]}
  for stem in RESULTS:
    assert status.get(stem) == "ok", (stem, status)
    line = next((ln for ln in md.splitlines() if ln.startswith(f"| {stem} |")), None)
    assert line is not None and line.rstrip().endswith("| ok |"), (stem, line)
  if E2E:
    assert status.get("score_e2e") == "ok", status
  else:
    assert status.get("score_e2e") == "skipped"
    assert "score_e2e" in md and "does not exist" in md
  assert (out / f"env_{TAG}.json").is_file()
  logs = {p.stem for p in (out / "logs").glob("*.log")}
  assert {"score_vit_l14", "score_vit_h14", "train_preference", "unet_step", "fid", "train_lora", "sample"} <= logs


def test_summary_records_failures(tmp_path):
  """Without running anything: a timed-out bench, a result with a NaN, a missing key and a skipped bench are each
  reported as such in the summary, and the summary's exit status says a bench failed."""
  from bench.gpu_suite_summary import main as summary_main

  good = {"bench": "fid", "jax_images_per_s": 5.0, "pytorch_fid_images_per_s": 2.0, "ratio_jax_over_torch": 2.5}
  (tmp_path / "fid_x.json").write_text(json.dumps({**good, "step_flops": 1e9, "mfu": 0.31, "jax_s_per_batch": 0.4}))
  (tmp_path / "unet_step_bf16_x.json").write_text('{"bench": "unet_step", "jax_step_s": NaN}')
  runs = tmp_path / "runs.jsonl"
  rec = ["record", str(runs)]
  assert (
    summary_main([*rec, "--name", "fid", "--kind", "fid", "--rc", "0", "--output", str(tmp_path / "fid_x.json")]) == 0
  )
  summary_main(
    [
      *rec,
      "--name",
      "unet_step",
      "--kind",
      "unet_step",
      "--rc",
      "0",
      "--output",
      str(tmp_path / "unet_step_bf16_x.json"),
    ]
  )
  summary_main(
    [*rec, "--name", "sample", "--kind", "sample", "--rc", "124", "--output", str(tmp_path / "sample_bf16_x.json")]
  )
  summary_main([*rec, "--name", "score_e2e", "--kind", "score_e2e", "--skipped", "suite budget spent (3s left)"])
  md, out = tmp_path / "s.md", tmp_path / "s.json"
  rc = summary_main(
    ["summarize", str(runs), "--env", str(tmp_path / "none.json"), "--tag", "x", "--md", str(md), "--json", str(out)]
  )
  assert rc == 1
  status = {r["name"]: r for r in json.loads(out.read_text())["results"]}
  assert status["fid"]["status"] == "ok"
  assert status["unet_step_bf16"]["status"] == "failed"
  assert any("not finite" in p for p in status["unet_step_bf16"]["problems"])
  assert any("missing key torch_step_s" in p for p in status["unet_step_bf16"]["problems"])
  assert status["sample_bf16"]["status"] == "failed" and status["score_e2e"]["status"] == "skipped"
  text = md.read_text()
  assert "| 31.0% |" in text  # fid's MFU
  assert "timed out" in text and "skipped: suite budget spent" in text
