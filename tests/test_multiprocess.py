"""Multi-process training on localhost CPUs (`hps_jax.parallel.initialize` + gloo collectives): two processes with
one device each train the tiny preference model on one 2-device FSDP mesh and must reproduce, step for step, one
process training on 2 devices — while each reads only its own half of every global batch, only process 0 writes
metrics, logs and the export, and a restart resumes from the shared orbax checkpoint (per-process data iterator
state included). Every process runs `tests/mp_worker.py`, i.e. the real `hps-jax train-preference` entry point.

Also the launch-environment rules of `parallel.launch_settings` (pure functions, no processes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{ROOT}/configs/hps_classifier.py:tiny"
STEPS, BATCH, RECORDS = 6, 8, 48  # one epoch of 48 records = 6 global batches of 8
DEADLINE_S = 420  # every child is killed (its whole process group) past this

COMMON = [
  "train-preference",
  "--config",
  TINY,
  "--config.progress=False",
  f"--config.batch_size={BATCH}",
  f"--config.data.synthetic_train_size={RECORDS}",
  "--config.log_every=1",
  "--config.checkpoint_every=3",
  "--config.mesh.fsdp=2",
  "--config.data.synthetic_eval_size=16",
  "--config.eval_batch_size=8",
  # a learning rate that does not depend on num_steps, so a 3-step run resumed as a 6-step one is the same run
  "--config.optim.schedule=constant",
  "--config.optim.warmup_steps=0",
]
NO_EVAL = ["--config.data.eval_split="]
LOOP_LOG = ("distributed:", "parameters:", "compiled ahead of time", "resumed from", "exported the trained model")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(
      (
        "HPS_COORDINATOR",
        "HPS_NUM_PROCESSES",
        "HPS_PROCESS_ID",
        "HPS_DISTRIBUTED",
        "SLURM_",
        "JAX_COORDINATOR",
        "XLA_FLAGS",
      )
    )
  }
  # unoptimized XLA code halves the compile time, the bulk of this test's; both sides compile the same way
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    **extra,
  )
  return env


def _launch(name: str, tmp: Path, runs: list[list[str]], env: dict) -> subprocess.Popen:
  out, err = open(tmp / f"{name}.out", "w"), open(tmp / f"{name}.err", "w")
  proc = subprocess.Popen(
    [sys.executable, str(ROOT / "tests" / "mp_worker.py"), str(tmp / name), json.dumps(runs)],
    env=env,
    cwd=ROOT,
    stdout=out,
    stderr=err,
    start_new_session=True,
  )
  proc.name = name
  return proc


def _wait_all(procs, tmp: Path):
  """Waits for every process; on a failure or past the deadline kills every one still running (no orphans)."""
  deadline = time.time() + DEADLINE_S
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      assert not failed, f"{failed[0].name} exited {failed[0].returncode}: {_tail(tmp, failed[0].name)}"
      assert time.time() < deadline, f"timed out after {DEADLINE_S}s; " + "; ".join(
        f"{p.name}: {_tail(tmp, p.name)}" for p in procs if p.poll() is None
      )
      time.sleep(0.2)
    for p in procs:
      assert p.returncode == 0, f"{p.name} exited {p.returncode}: {_tail(tmp, p.name)}"
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _tail(tmp: Path, name: str) -> str:
  return (tmp / f"{name}.err").read_text()[-3000:]


def _metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _consumed(tmp: Path, name: str, process: int) -> list[list[int]]:
  return [json.loads(line) for line in (tmp / f"{name}.p{process}.jsonl").read_text().splitlines()]


def _summaries(tmp: Path, name: str) -> list[dict]:
  return [json.loads(line) for line in (tmp / f"{name}.out").read_text().splitlines() if line.startswith("{")]


def test_two_processes_train_like_one(tmp_path, parity):
  t0 = time.time()
  ref_wd, mp_wd = tmp_path / "ref_wd", tmp_path / "mp_wd"
  port = _free_port()
  # the reference: one process, 2 devices, 6 steps straight
  ref = _launch("ref", tmp_path, [COMMON + ["--workdir", str(ref_wd), f"--config.num_steps={STEPS}"]], _env(2))
  # two processes with one device each: 3 steps, then (same processes, same workdir) resumed up to 6 and evaluated
  runs = [
    COMMON + NO_EVAL + ["--workdir", str(mp_wd), "--config.num_steps=3"],
    COMMON + ["--workdir", str(mp_wd), f"--config.num_steps={STEPS}"],
  ]
  shared = dict(HPS_COORDINATOR=f"localhost:{port}", HPS_NUM_PROCESSES="2")
  workers = [_launch(f"mp{i}", tmp_path, runs, _env(1, HPS_PROCESS_ID=str(i), **shared)) for i in (0, 1)]
  _wait_all([ref, *workers], tmp_path)
  elapsed = time.time() - t0

  # --- the same losses, step for step, and the same global batches (the checksum weighs rows by position)
  ref_rows = {r["step"]: r for r in _metrics(ref_wd) if "loss" in r}
  mp_rows = [r for r in _metrics(mp_wd) if "loss" in r]
  assert [r["step"] for r in mp_rows] == list(range(1, STEPS + 1))  # one writer: no step logged twice
  assert [r["step"] for r in _metrics(mp_wd) if "eval/accuracy" in r] == [STEPS]
  ref_loss = np.array([ref_rows[s]["loss"] for s in range(1, STEPS + 1)])
  mp_loss = np.array([r["loss"] for r in mp_rows])
  assert np.isfinite(ref_loss).all() and ref_loss.std() > 0
  parity(
    "multiprocess: 2 processes x 1 device vs 1 x 2, per-step loss (max rel diff)",
    np.max(np.abs(mp_loss - ref_loss) / np.abs(ref_loss)),
    1e-5,
  )
  assert [r["data_checksum"] for r in mp_rows] == [ref_rows[s]["data_checksum"] for s in range(1, STEPS + 1)]

  # --- each process read its half of every global batch: disjoint, together the whole epoch, in the reference's
  # row order (process 0's rows first), across the restart (no batch repeated or skipped after resuming)
  ref_batches = _consumed(tmp_path, "ref", 0)
  p0, p1 = _consumed(tmp_path, "mp0", 0), _consumed(tmp_path, "mp1", 1)
  assert len(ref_batches) == len(p0) == len(p1) == STEPS
  assert all(len(b) == BATCH // 2 for b in p0 + p1)
  seen0, seen1 = {i for b in p0 for i in b}, {i for b in p1 for i in b}
  assert not seen0 & seen1
  assert seen0 | seen1 == set(range(RECORDS))
  assert [a + b for a, b in zip(p0, p1)] == ref_batches
  # the grain iterator state went into the checkpoint once per process
  assert {p.name for p in (mp_wd / "checkpoints" / "3" / "data").glob("process_*.json")} == {
    "process_0-of-2.json",
    "process_1-of-2.json",
  }

  # --- only process 0 logs and exports; both finish the same run
  err0, err1 = (tmp_path / "mp0.err").read_text(), (tmp_path / "mp1.err").read_text()
  for line in LOOP_LOG:
    assert line in err0 and line not in err1, line
  assert err0.count("resumed from") == 1 and "checkpoints/3 at step 3" in err0
  s0, s1 = _summaries(tmp_path, "mp0"), _summaries(tmp_path, "mp1")
  assert [s["step"] for s in s0] == [s["step"] for s in s1] == [3, STEPS]
  assert all(s["status"] == "done" for s in s0 + s1)
  # the final evaluation (the eval set sharded over both processes' devices) scores as the reference's does
  ref_eval = _summaries(tmp_path, "ref")[-1]["eval"]
  assert ref_eval["num_prompts"] == 16 and s0[-1]["eval"] == s1[-1]["eval"] == ref_eval
  assert s0[-1]["export"] == str(mp_wd / "export") and s1[-1]["export"] is None
  # the export (FSDP-sharded over both processes' devices, gathered for process 0) equals the reference's
  from safetensors.numpy import load_file

  ref_w, mp_w = load_file(ref_wd / "export" / "model.safetensors"), load_file(mp_wd / "export" / "model.safetensors")
  assert ref_w.keys() == mp_w.keys()
  parity(
    "multiprocess: exported weights after 6 steps (max abs diff)",
    max(float(np.max(np.abs(ref_w[k] - mp_w[k]))) for k in ref_w),
    1e-5,
  )
  print(f"3 processes (reference + 2 workers) finished in {elapsed:.0f}s")


# ------------------------------------------------------------------------------------------------------------
# launch-environment rules (no processes started)
# ------------------------------------------------------------------------------------------------------------
SLURM = {
  "SLURM_JOB_ID": "7",
  "SLURM_STEP_NODELIST": "node[01-02]",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "0",
}


@pytest.mark.parametrize(
  "kwargs, env, expected",
  [
    ({}, {}, None),  # a lone process: nothing
    (
      {},
      {"HPS_COORDINATOR": "h:1", "HPS_NUM_PROCESSES": "4", "HPS_PROCESS_ID": "3"},
      {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3},
    ),
    (
      {"coordinator": "a:2", "num_processes": 2, "process_id": 0},  # arguments win over env
      {"HPS_COORDINATOR": "h:1", "HPS_NUM_PROCESSES": "4", "HPS_PROCESS_ID": "3"},
      {"coordinator_address": "a:2", "num_processes": 2, "process_id": 0},
    ),
    ({}, {"HPS_NUM_PROCESSES": "1"}, None),  # one process in all
    ({}, SLURM, {}),  # srun -n 2: JAX detects
    ({}, {**SLURM, "HPS_COORDINATOR": "h:9"}, {"coordinator_address": "h:9"}),  # ... but given values win
    ({}, {**SLURM, "SLURM_NTASKS": "1"}, None),  # a one-task step
    ({}, {**SLURM, "SLURM_STEP_NUM_TASKS": "1"}, None),  # a batch script's own step
    ({}, {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}, None),  # not inside a job step
    ({}, {**SLURM, "HPS_DISTRIBUTED": "off"}, None),
    ({}, {"HPS_DISTRIBUTED": "auto"}, {}),
  ],
)
def test_launch_settings(kwargs, env, expected):
  from hps_jax.parallel import launch_settings

  assert launch_settings(**kwargs, environ={"JAX_PLATFORMS": "cpu", **env}) == expected


@pytest.mark.parametrize(
  "env, message",
  [
    ({"HPS_COORDINATOR": "h:1", "HPS_NUM_PROCESSES": "2"}, "HPS_PROCESS_ID not set"),
    ({"HPS_COORDINATOR": "h:1", "HPS_NUM_PROCESSES": "2", "HPS_PROCESS_ID": "2"}, "not in [0, 2)"),
    ({"HPS_COORDINATOR": "h", "HPS_NUM_PROCESSES": "2", "HPS_PROCESS_ID": "0"}, "HOST:PORT"),
    ({"HPS_COORDINATOR": "h:1", "HPS_NUM_PROCESSES": "two", "HPS_PROCESS_ID": "0"}, "HPS_NUM_PROCESSES='two'"),
  ],
)
def test_launch_settings_reject_incomplete_or_bad_values(env, message):
  from hps_jax.parallel import launch_settings

  with pytest.raises(ValueError) as e:
    launch_settings(environ={"JAX_PLATFORMS": "cpu", **env})
  assert message in str(e.value)


def test_initialize_is_a_no_op_for_a_lone_process(monkeypatch):
  import jax

  from hps_jax import parallel

  for k in list(os.environ):
    if k.startswith(("HPS_", "SLURM_")):
      monkeypatch.delenv(k)
  assert parallel.initialize() is False and parallel.initialize() is False
  assert not jax.distributed.is_initialized()
