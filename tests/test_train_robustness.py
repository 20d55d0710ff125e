"""Training survives what clusters do to it, through the real CLI in subprocesses: SIGTERM / SIGINT stop at a
checkpoint (exit 143 / 130) and the resumed run reproduces the uninterrupted one bit for bit; SIGKILL + resume logs
every step once; a second run on the same workdir is refused naming the first's pid (and a killed run's lock does
not block); resuming with a changed config is refused unless --allow-config-change (and recorded); bad config values
are one line, exit 2. Signals are sent only once the run has logged steps (the loop's handlers are installed)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import assert_same_trajectory, sigkill_after_checkpoint, train_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
  "train-preference": f"{ROOT}/configs/hps_classifier.py:tiny",
  "train-lora": f"{ROOT}/configs/lora_sd14.py:tiny",
}
# short runs: every step logged (the signal tests wait for logged steps); the preference set's evaluation is skipped
PREF = ["--config.num_steps=16", "--config.log_every=1", "--config.checkpoint_every=0", "--config.data.eval_split="]
LORA = ["--config.num_steps=30", "--config.log_every=1", "--config.checkpoint_every=0"]
TIMEOUT = 300


def _cmd(command, workdir, *overrides):
  return [
    sys.executable,
    "-m",
    "hps_jax.cli",
    command,
    "--config",
    CONFIGS[command],
    "--workdir",
    str(workdir),
    "--config.progress=False",
    *overrides,
  ]


@pytest.fixture(scope="module")
def env():
  e = dict(os.environ, JAX_PLATFORMS="cpu")  # with conftest's shared JAX_COMPILATION_CACHE_DIR
  e.pop("XLA_FLAGS", None)
  return e


def _run(cmd, env):
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def _train(cmd, env):
  res = _run(cmd, env)
  assert res.returncode == 0, res.stderr[-4000:]
  return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def _start(cmd, env):
  return subprocess.Popen(
    cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
  )


def _wait_until(proc, ready, timeout=TIMEOUT):
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"the run ended (exit {proc.returncode}) before the signal could be sent:\n{err[-4000:]}")
    if time.time() > deadline:
      proc.kill()
      pytest.fail("the run logged nothing in time")
    time.sleep(0.05)


def _logged_steps(workdir) -> list[int]:
  """The steps of metrics.jsonl's loss rows in file order, duplicates included."""
  path = Path(workdir) / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
  return [r["step"] for r in rows if "loss" in r]


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pref_reference(env, tmp_path_factory):
  wd = tmp_path_factory.mktemp("pref_straight")
  _train(_cmd("train-preference", wd, *PREF), env)
  return train_metrics(wd)


@pytest.fixture(scope="module")
def lora_reference(env, tmp_path_factory):
  wd = tmp_path_factory.mktemp("lora_straight")
  _train(_cmd("train-lora", wd, *LORA), env)
  return train_metrics(wd)


def _stop_and_resume(cmd, env, wd, signum, num_steps, reference):
  proc = _start(cmd, env)
  _wait_until(proc, lambda: len(train_metrics(wd)) >= 2)  # in the loop: its handlers are installed
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 128 + signum, err[-4000:]
  assert "Traceback" not in err
  stopped = max(train_metrics(wd))
  assert 2 <= stopped < num_steps
  # the stop step's checkpoint (checkpoint_every=0: the only one), named in the last line
  assert [p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()] == [str(stopped)]
  last = _error_lines(err)[-1]
  assert f"stopped by {signal.Signals(signum).name} at step {stopped}" in last, last
  assert str(wd / "checkpoints" / str(stopped)) in last

  summary, log = _train(cmd, env)
  assert f"resumed from {wd / 'checkpoints' / str(stopped)}" in log and summary["step"] == num_steps
  assert_same_trajectory(train_metrics(wd), reference, num_steps)
  assert _logged_steps(wd) == list(range(1, num_steps + 1))  # each step once, in order
  return stopped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preference_stops_on_a_signal_at_a_checkpoint_and_resumes_exactly(env, pref_reference, tmp_path, signum):
  wd = tmp_path / "wd"
  _stop_and_resume(_cmd("train-preference", wd, *PREF), env, wd, signum, 16, pref_reference)


def test_lora_stops_on_sigterm_at_a_checkpoint_and_resumes_exactly(env, lora_reference, tmp_path):
  wd = tmp_path / "wd"
  _stop_and_resume(_cmd("train-lora", wd, *LORA), env, wd, signal.SIGTERM, 30, lora_reference)


def test_sigkill_and_resume_log_each_step_once(env, pref_reference, tmp_path):
  """The rows a killed run logged after its last checkpoint are dropped on resume; the killed run's lock file
  (flock released by the kernel) does not block the resumed run."""
  wd = tmp_path / "wd"
  cmd = _cmd("train-preference", wd, *PREF, "--config.checkpoint_every=4")
  killed_at = sigkill_after_checkpoint(cmd, env, wd, 4, lambda wd: len(train_metrics(wd)) >= 6)
  assert 4 < killed_at < 16
  assert _logged_steps(wd)[-1] > max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert json.loads((wd / ".lock").read_text())["pid"] > 0  # left behind by the killed run

  summary, log = _train(cmd, env)
  assert "resumed from" in log and summary["step"] == 16
  assert _logged_steps(wd) == list(range(1, 17))
  assert_same_trajectory(train_metrics(wd), pref_reference, 16)


def test_a_second_run_on_the_workdir_is_refused_naming_the_first(env, tmp_path):
  wd = tmp_path / "wd"
  first = _start(_cmd("train-preference", wd, "--config.num_steps=1000", "--config.log_every=1"), env)
  try:
    _wait_until(first, lambda: len(train_metrics(wd)) >= 1)
    second = _run(_cmd("train-preference", wd), env)
    assert second.returncode == 2, second.stderr[-4000:]
    lines = _error_lines(second.stderr)
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-4000:]
    assert f"is in use by another training run (pid {first.pid} on host " in lines[0]
    assert str(wd) in lines[0] and "--workdir" in lines[0]
  finally:
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=TIMEOUT)
  assert first.returncode == 143, err[-4000:]


def test_resuming_with_a_changed_config_needs_allow_config_change(env, tmp_path):
  wd = tmp_path / "wd"
  base = ["--config.log_every=1", "--config.data.eval_split="]
  _train(_cmd("train-preference", wd, *base, "--config.num_steps=2"), env)
  lr = json.loads((wd / "config.json").read_text())["optim"]["lr"]

  refused = _run(_cmd("train-preference", wd, *base, "--config.num_steps=2", "--config.optim.lr=0.002"), env)
  assert refused.returncode == 2, refused.stderr[-4000:]
  lines = _error_lines(refused.stderr)
  assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr[-4000:]
  assert f"optim.lr: {lr} -> 0.002" in lines[0] and "--allow-config-change" in lines[0]
  assert not (wd / "config_history.jsonl").exists()

  changed = ["--config.num_steps=3", "--config.optim.lr=0.002", "--allow-config-change"]
  summary, _ = _train(_cmd("train-preference", wd, *base, *changed), env)
  assert summary["step"] == 3
  assert json.loads((wd / "config.json").read_text())["optim"]["lr"] == 0.002
  (record,) = [json.loads(line) for line in (wd / "config_history.jsonl").read_text().splitlines()]
  assert record["step"] == 2 and record["time"]
  assert record["changes"] == {"num_steps": [2, 3], "optim.lr": [lr, 0.002]}

  # extending num_steps alone is what resuming is for: no flag needed, still recorded
  summary, _ = _train(_cmd("train-preference", wd, *base, "--config.num_steps=4", "--config.optim.lr=0.002"), env)
  assert summary["step"] == 4
  records = [json.loads(line) for line in (wd / "config_history.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 3 and records[-1]["changes"] == {"num_steps": [3, 4]}
  assert _logged_steps(wd) == [1, 2, 3, 4]


@pytest.mark.parametrize(
  "command, override, key",
  [
    ("train-preference", "--config.batch_size=0", "batch_size"),
    ("train-preference", "--config.optim.lr=nan", "optim.lr"),
    ("train-lora", "--config.num_steps=0", "num_steps"),
  ],
)
def test_a_bad_config_value_is_one_line_naming_the_key(env, tmp_path, command, override, key):
  wd = tmp_path / "wd"
  res = _run(_cmd(command, wd, override), env)
  assert res.returncode == 2, res.stderr[-4000:]
  assert "Traceback" not in res.stderr
  lines = _error_lines(res.stderr)
  assert len(lines) == 1 and f"config: {key} must be " in lines[0], res.stderr
  assert not wd.exists()  # refused before anything was built or written


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_sigterm_to_one_process_of_a_multiprocess_run_stops_all_at_one_checkpoint(env, tmp_path):
  """Two processes (one CPU device each, gloo collectives): SIGTERM reaches process 1 only; the per-step agreement
  stops both after the same step, with one checkpoint holding both processes' data iterator states."""
  wd = tmp_path / "wd"
  cmd = _cmd("train-preference", wd, *PREF[1:], "--config.num_steps=200")
  env = {k: v for k, v in env.items() if not k.startswith(("HPS_", "SLURM_", "JAX_COORDINATOR"))}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  shared = dict(HPS_COORDINATOR=f"localhost:{_free_port()}", HPS_NUM_PROCESSES="2")
  procs = [_start(cmd, dict(env, HPS_PROCESS_ID=str(i), **shared)) for i in (0, 1)]
  try:
    _wait_until(procs[0], lambda: len(train_metrics(wd)) >= 2)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  assert [p.returncode for p in procs] == [143, 143], errs[0][-3000:] + errs[1][-3000:]
  stopped = max(train_metrics(wd))
  assert 2 <= stopped < 200
  assert [p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()] == [str(stopped)]
  data = wd / "checkpoints" / str(stopped) / "data"
  assert {p.name for p in data.glob("process_*.json")} == {"process_0-of-2.json", "process_1-of-2.json"}
  for err in errs:  # process 0 got no signal and stops with process 1, at the same step
    assert f"stopped by SIGTERM at step {stopped}" in _error_lines(err)[-1], err[-3000:]
  assert (wd / ".lock").exists() and (wd / ".lock.1").exists()  # one lock file per process


# ------------------------------------------------------------------------------------------------------------
# the pieces, in this process
# ------------------------------------------------------------------------------------------------------------
def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
  from hps_jax.train_loop import truncate_metrics

  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 5, "eval/accuracy": 0.5}]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  path.write_text(text + '{"step": 6, "lo')  # a line cut short by SIGKILL
  truncate_metrics(path, 3)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
  path.write_text(text)
  truncate_metrics(path, 5, finished=True)  # the final evaluation runs again: its row goes, the losses stay
  assert path.read_text().splitlines() == text.splitlines()[:5]
  truncate_metrics(path, 0)  # a fresh start: a run killed before its first checkpoint logged nothing that counts
  assert path.read_text() == ""


def test_workdir_lock_is_exclusive_reentrant_and_released(tmp_path):
  import fcntl

  from hps_jax.train_loop import workdir_lock

  def free(path) -> bool:
    with open(path) as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: conflicts with the held lock
      except BlockingIOError:
        return False
      return True

  with workdir_lock(tmp_path) as path:
    assert json.loads(path.read_text())["pid"] == os.getpid() and not free(path)
    with workdir_lock(tmp_path):  # the CLI locks, then `train` does again
      assert not free(path)
    assert not free(path)
  assert free(path) and path.read_text() == ""


def test_config_changes_name_dotted_keys_and_what_may_change():
  from hps_jax.train_loop import _resumable, config_changes

  old = {"optim": {"lr": 1e-3, "b1": 0.9}, "num_steps": 10, "progress": True, "data": {"eval_split": ""}}
  new = {"optim": {"lr": 2e-3, "b1": 0.9}, "num_steps": 20, "progress": False, "data": {"eval_split": "test"}, "x": 1}
  changes = config_changes(old, new)
  assert changes == {
    "data.eval_split": ("", "test"),
    "num_steps": (10, 20),
    "optim.lr": (1e-3, 2e-3),
    "x": ("(absent)", 1),
  }
  assert [k for k in changes if not _resumable(k)] == ["optim.lr", "x"]


def test_stop_signals_set_a_flag_once_and_restore_the_handlers():
  from hps_jax.train_loop import StopSignals

  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with StopSignals() as signals:
    assert signals.signum == 0
    os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: no exception, no exit
    time.sleep(0.01)
    assert signals.signum == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping changes nothing
    time.sleep(0.01)
    assert signals.signum == signal.SIGTERM
  assert {s: signal.getsignal(s) for s in before} == before
