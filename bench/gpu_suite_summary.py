"""Helpers of bench/gpu_suite.sh (standard library only, so they run before anything is installed):

  python -m bench.gpu_suite_summary missing-wheels .whl     # the wheels whose distribution is not importable here
  python -m bench.gpu_suite_summary env OUT.json            # versions and devices; prints the device tag
  python -m bench.gpu_suite_summary record RUNS.jsonl ...   # appends one bench run (name, rc, seconds, outputs)
  python -m bench.gpu_suite_summary summarize RUNS.jsonl --env ENV.json --md OUT.md --json OUT.json

`summarize` checks every expected result file (it exists, holds the bench's expected keys, every number in it is
finite), and writes the suite's markdown table: throughput of both sides, their ratio, XLA's FLOP count of one step,
the achieved FLOP/s and MFU (FLOPs / step time / the device's dense peak, bench/common.py), compile time, status.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import re
import sys
import time
from pathlib import Path

# keys every result of a bench must hold (numbers: finite; mfu / peak_flops may be null off a known GPU)
EXPECTED_KEYS = {
  "score": ["jax_images_per_s", "torch_images_per_s", "ratio_jax_over_torch", "step_flops", "max_abs_diff_hps", "mfu"],
  "train_preference": ["jax_step_s", "jax_images_per_s", "torch_step_s", "speedup_jax_over_torch", "step_flops", "mfu"],
  "unet_step": ["jax_step_s", "jax_samples_per_s", "torch_step_s", "speedup_jax_over_torch", "step_flops", "mfu"],
  "train_lora": ["jax_step_s", "jax_images_per_s", "torch_step_s", "speedup_jax_over_torch", "step_flops", "mfu"],
  "sample": ["jax_s_per_call", "jax_images_per_s", "torch_images_per_s", "speedup_jax_over_torch"],
  "fid": ["jax_images_per_s", "pytorch_fid_images_per_s", "ratio_jax_over_torch", "step_flops", "mfu"],
  "score_e2e": [],  # written by another script; any finite numbers
}
NULLABLE = {"mfu", "peak_flops", "jax_flops_per_s"}

# (JAX throughput key, PyTorch throughput key, ratio key, unit, step-seconds key, compile-seconds key)
COLUMNS = {
  "score": ("jax_images_per_s", "torch_images_per_s", "ratio_jax_over_torch", "img/s", "jax_s_per_batch", None),
  "train_preference": (
    "jax_images_per_s",
    None,
    "speedup_jax_over_torch",
    "img/s",
    "jax_step_s",
    None,
  ),
  "unet_step": (
    "jax_samples_per_s",
    "torch_samples_per_s",
    "speedup_jax_over_torch",
    "img/s",
    "jax_step_s",
    "jax_compile_s",
  ),
  "train_lora": (
    "jax_images_per_s",
    "torch_images_per_s",
    "speedup_jax_over_torch",
    "img/s",
    "jax_step_s",
    "jax_compile_s",
  ),
  "sample": (
    "jax_images_per_s",
    "torch_images_per_s",
    "speedup_jax_over_torch",
    "img/s",
    "jax_s_per_call",
    "jax_compile_s",
  ),
  "fid": ("jax_images_per_s", "pytorch_fid_images_per_s", "ratio_jax_over_torch", "img/s", "jax_s_per_batch", None),
}


# ------------------------------------------------------------------------------------------------------------
# wheels
# ------------------------------------------------------------------------------------------------------------
def dist_name(wheel: Path) -> str:
  """The distribution name of a wheel file (PEP 427: name-version-...whl), normalized (PEP 503)."""
  return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def installed(name: str) -> bool:
  try:
    importlib.metadata.distribution(name)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def missing_wheels(folder: Path) -> list[Path]:
  """The wheels in `folder` whose distribution is not installed in this interpreter (PYTHONPATH included)."""
  return [w for w in sorted(folder.glob("*.whl")) if not installed(dist_name(w))]


# ------------------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------------------
def environment() -> dict:
  """Versions and the device, read once before the benches (jax and torch imported here)."""
  import platform
  import subprocess

  env = {"python": sys.version.split()[0], "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "transformers", "diffusers", "peft", "numpy"):
    try:
      env[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      env[name] = None
  import jax

  from bench.common import device_name, device_tag

  env["device"] = device_name()
  env["device_tag"] = device_tag()
  env["jax_backend"] = jax.default_backend()
  env["jax_devices"] = [str(d) for d in jax.devices()]
  env["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
  try:
    import torch

    env["torch_cuda"] = torch.cuda.is_available()
    env["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env["torch_allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
  except ImportError:
    env["torch_cuda"] = None
  try:
    q = "name,driver_version,memory.total,clocks.max.sm"
    out = subprocess.run(
      ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
    )
    env["nvidia_smi"] = out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
  return env


# ------------------------------------------------------------------------------------------------------------
# checking results
# ------------------------------------------------------------------------------------------------------------
def _numbers(value, path=""):
  """(path, number) of every int / float inside a JSON value (bools excluded)."""
  if isinstance(value, bool):
    return
  if isinstance(value, (int, float)):
    yield path, value
  elif isinstance(value, dict):
    for k, v in value.items():
      yield from _numbers(v, f"{path}.{k}" if path else str(k))
  elif isinstance(value, list):
    for i, v in enumerate(value):
      yield from _numbers(v, f"{path}[{i}]")


def check_result(kind: str, path: Path) -> tuple[dict | None, list[str]]:
  """(the result, problems) of one result file: it exists and parses, holds the expected keys of `kind`, and
  every number in it is finite (NaN / inf are problems; null is allowed only for the nullable keys)."""
  if not path.is_file():
    return None, [f"{path.name}: not written"]
  try:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    result = json.loads(lines[-1])
  except (OSError, ValueError, IndexError) as e:
    return None, [f"{path.name}: unreadable ({type(e).__name__}: {e})"]
  if not isinstance(result, dict):
    return None, [f"{path.name}: not a JSON object"]
  problems = []
  for key in EXPECTED_KEYS.get(kind, []):
    if key not in result:
      problems.append(f"missing key {key}")
    elif result[key] is None and key not in NULLABLE:
      problems.append(f"{key} is null")
  problems += [f"{p} = {v} is not finite" for p, v in _numbers(result) if not math.isfinite(v)]
  if not any(True for _ in _numbers(result)):
    problems.append("no numbers")
  return result, problems


# ------------------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------------------
def _fmt(x, digits=3) -> str:
  if x is None:
    return "–"
  if isinstance(x, str):
    return x
  if x == 0:
    return "0"
  if abs(x) >= 1e4 or abs(x) < 1e-2:
    return f"{x:.2e}"
  return f"{x:.{digits}g}"


def _setting(kind: str, r: dict) -> str:
  keys = {
    "score": ["model", "batch", "dtype", "attention"],
    "train_preference": ["model", "batch_prompts", "images_per_prompt", "dtype", "attention", "remat"],
    "unet_step": ["preset", "batch", "latent_size", "dtype", "attention", "remat"],
    "train_lora": ["preset", "batch", "latent_size", "rank", "dtype", "attention", "remat"],
    "sample": ["preset", "batch", "resolution", "steps", "scheduler", "guidance", "dtype"],
    "fid": ["batch", "input_size", "resize"],
    "score_e2e": ["model", "batch", "dtype", "n_images", "jpeg"],
  }.get(kind, [k for k in ("model", "preset", "batch", "dtype") if k in r])
  parts = [f"{k}={r[k]}" for k in keys if k in r and r[k] not in (None, False)]
  if r.get("attention_impls"):
    parts.append("impl=" + "+".join(f"{k}:{v}" for k, v in sorted(r["attention_impls"].items())))
  return ", ".join(parts)


def row(name: str, kind: str, result: dict | None, status: str) -> str:
  r = result or {}
  jk, tk, rk, unit, sk, ck = COLUMNS.get(kind, (None, None, None, "", None, None))
  if kind == "train_preference" and "torch_step_s" in r:  # images per second of the torch step
    r = {**r, "_torch_images_per_s": r["batch_prompts"] * r["images_per_prompt"] / r["torch_step_s"]}
    tk = "_torch_images_per_s"
  if kind == "score_e2e" and r.get("runs"):  # from files: the best end-to-end rate of its worker settings
    best = max(r["runs"], key=lambda x: x.get("e2e_images_per_s") or 0)
    r = {**r, "_e2e": best.get("e2e_images_per_s"), "_vs_bound": best.get("e2e_over_bound")}
    jk, tk, rk, unit = "_e2e", None, "_vs_bound", "img/s"
  if jk is None:  # a bench without a column spec: its first *_per_s keys
    per_s = [k for k, v in r.items() if k.endswith("_per_s") and isinstance(v, (int, float))]
    jk = next((k for k in per_s if k.startswith("jax")), None)
    tk = next((k for k in per_s if k.startswith("torch")), None)
    rk = next((k for k in r if k.startswith(("speedup", "ratio"))), None)
  flops = r.get("step_flops")
  step = r.get(sk) if sk else None
  fps = flops / step if flops and step else None
  cells = [
    name,
    _setting(kind, r),
    f"{_fmt(r.get(jk))} {unit}".strip() if jk and r.get(jk) is not None else "–",
    f"{_fmt(r.get(tk))} {unit}".strip() if tk and r.get(tk) is not None else "–",
    _fmt(r.get(rk)) if rk else "–",
    _fmt(flops) if flops else "–",
    f"{fps / 1e12:.1f} T" if fps else "–",
    f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–",
    _fmt(r.get(ck)) if ck else "–",
    status,
  ]
  return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


HEADER = (
  "| bench | setting | JAX | PyTorch | JAX/PyTorch | FLOPs/step (XLA) | FLOP/s | MFU | compile s | status |\n"
  "|---|---|---|---|---|---|---|---|---|---|"
)


def summarize(runs: list[dict], env: dict, mode: str, budget: float, wall: float, tag: str) -> tuple[str, dict]:
  """The markdown summary and the suite's JSON record (every run, every result file with its problems)."""
  rows, files, n_ok = [], [], 0
  for run in runs:
    outs = run.get("outputs") or []
    if run.get("skipped"):
      rows.append(row(run["name"], run["kind"], None, f"skipped: {run['skipped']}"))
      files.append({"name": run["name"], "kind": run["kind"], "status": "skipped", "reason": run["skipped"]})
      continue
    for out in outs:
      result, problems = check_result(run["kind"], Path(out))
      if result is not None and not problems:
        status, n_ok = "ok", n_ok + 1
      else:
        why = "timed out" if run.get("rc") in (124, 137) else f"exit {run.get('rc')}"
        status = f"FAILED ({why}; {'; '.join(problems)[:200]})"
        if run.get("error"):
          status += f" — {run['error'][:200]}"
      label = Path(out).stem.removesuffix(f"_{tag}")
      rows.append(row(label, run["kind"], result, status))
      files.append(
        {
          "name": label,
          "kind": run["kind"],
          "file": Path(out).name,
          "status": "ok" if status == "ok" else "failed",
          "problems": problems,
          "rc": run.get("rc"),
          "seconds": run.get("seconds"),
        }
      )
  title = "GPU suite" if mode == "gpu" else "GPU suite, CPU smoke run (tiny presets, 1 iteration: numbers mean nothing)"
  md = [
    f"# {title}: {env.get('device', '?')}",
    "",
    f"{env.get('time', '')}; jax {env.get('jax')} ({env.get('jax_backend')}), torch {env.get('torch')}, "
    f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}; python {env.get('python')}. "
    f"Suite wall time {wall:.0f} s of a {budget:.0f} s budget; {n_ok} of {len(files)} results ok"
    f"{'' if n_ok == len(files) else ' (the others: see status)'}.",
    "",
    HEADER,
    *rows,
    "",
    "JAX and PyTorch run in the same process on the same device with the same random weights and inputs; "
    "throughput is the median of the timed iterations after warm-up. FLOPs/step is XLA's `cost_analysis` of the "
    "compiled (or lowered) JAX step; FLOP/s = FLOPs / the JAX step time; MFU = FLOP/s / the device's dense peak "
    "for the compute dtype (bench/common.py PEAK_FLOPS: bf16 tensor-core, fp32 without TF32 — XLA may use TF32 for "
    "fp32 matmuls while PyTorch's default does not, so fp32 ratios and MFU are upper bounds). `impl` counts the "
    "traced attention calls per implementation (cudnn = cuDNN flash attention). sample has no MFU: its timed "
    "region is the whole pipeline (text encoder, 50 UNet steps, VAE decode). score_e2e (scoring JPEG files: decode "
    "workers + the model) has no PyTorch side: its JAX column is the best end-to-end rate over its worker settings "
    "and its ratio column that rate over the decode/compute bound.",
    "",
    "Per-bench logs: `logs/`; raw results: the JSON files beside this one.",
  ]
  record = {
    "mode": mode,
    "tag": tag,
    "env": env,
    "budget_s": budget,
    "wall_s": wall,
    "ok": n_ok,
    "results": files,
    "runs": runs,
  }
  return "\n".join(md) + "\n", record


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("missing-wheels")
  p.add_argument("folder")
  p = sub.add_parser("env")
  p.add_argument("out")
  p = sub.add_parser("record")
  p.add_argument("runs")
  p.add_argument("--name", required=True)
  p.add_argument("--kind", required=True)
  p.add_argument("--rc", type=int)
  p.add_argument("--seconds", type=float)
  p.add_argument("--timeout", type=float)
  p.add_argument("--output", action="append", default=[])
  p.add_argument("--log")
  p.add_argument("--skipped")
  p = sub.add_parser("summarize")
  p.add_argument("runs")
  p.add_argument("--env", required=True)
  p.add_argument("--md", required=True)
  p.add_argument("--json", required=True)
  p.add_argument("--mode", default="gpu")
  p.add_argument("--tag", default="")
  p.add_argument("--budget", type=float, default=0.0)
  p.add_argument("--wall", type=float, default=0.0)
  argv = list(sys.argv[1:] if argv is None else argv)
  cmd = argv[argv.index("--") + 1 :] if "--" in argv else []  # record ... -- COMMAND: the bench's command line
  args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

  if args.cmd == "missing-wheels":
    print(" ".join(str(w) for w in missing_wheels(Path(args.folder))))
  elif args.cmd == "env":
    env = environment()
    Path(args.out).write_text(json.dumps(env, indent=1) + "\n")
    print(env["device_tag"])
  elif args.cmd == "record":
    run = {"name": args.name, "kind": args.kind, "rc": args.rc, "seconds": args.seconds, "timeout_s": args.timeout}
    run["outputs"] = args.output
    run["command"] = " ".join(cmd)
    if args.skipped:
      run["skipped"] = args.skipped
    if args.log and Path(args.log).is_file() and args.rc:
      tail = [ln for ln in Path(args.log).read_text(errors="replace").splitlines() if ln.strip()][-3:]
      run["error"] = " / ".join(tail)
    with open(args.runs, "a") as f:
      f.write(json.dumps(run) + "\n")
  elif args.cmd == "summarize":
    runs = [json.loads(ln) for ln in Path(args.runs).read_text().splitlines() if ln.strip()]
    env = json.loads(Path(args.env).read_text()) if Path(args.env).is_file() else {}
    md, record = summarize(runs, env, args.mode, args.budget, args.wall, args.tag)
    Path(args.md).write_text(md)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(md)
    return 1 if any(f["status"] == "failed" for f in record["results"]) else 0
  return 0


if __name__ == "__main__":
  sys.exit(main())
