"""`hps-jax label` on two processes on localhost (`hps_jax.parallel.initialize`, one CPU device each): each labels a
disjoint share of the synthetic DiffusionDB of tests/adapt/test_label_resume.py (parts 1 and 3 to process 0, parts 2
and 4 to process 1) into its own score log; process 0 merges them into THE SAME manifest, scores and extracted
images as the single-process reference run, byte for byte."""

import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.adapt.test_label_resume import (  # noqa: F401  (session fixtures)
  ROOT,
  expected_candidates,
  label_cmd,
  label_data,
  label_env,
  reference,
  summary_of,
  tree,
)

DEADLINE_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_label_like_one(reference, label_data, tmp_path):  # noqa: F811
  ref_files, ref_summary, ref_stderr = reference
  out = label_data["dir"] / "two_processes"
  port = _free_port()
  procs = []
  for i in (0, 1):
    env = label_env(HPS_COORDINATOR=f"127.0.0.1:{port}", HPS_NUM_PROCESSES="2", HPS_PROCESS_ID=str(i))
    log_out, log_err = open(tmp_path / f"p{i}.out", "w"), open(tmp_path / f"p{i}.err", "w")
    procs.append(
      subprocess.Popen(
        label_cmd(label_data, out), env=env, cwd=ROOT, stdout=log_out, stderr=log_err, start_new_session=True
      )
    )
  deadline = time.time() + DEADLINE_S
  try:
    while any(p.poll() is None for p in procs):
      assert time.time() < deadline, "timed out: " + (tmp_path / "p0.err").read_text()[-2000:]
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  err = [(tmp_path / f"p{i}.err").read_text() for i in (0, 1)]
  assert procs[0].returncode == 1, err[0][-3000:]  # the report (with the skips) is process 0's
  assert procs[1].returncode == 0, err[1][-3000:]

  # each process scored a disjoint share: the parts p with p % 2 == process index
  per_part = expected_candidates()
  shares = [sum(n for p, n in per_part.items() if p % 2 == i) for i in (0, 1)]
  assert shares == [1000, 900]  # parts 1, 3 and 2, 4 (the last holds the 100 never-scored images)
  summary = summary_of((tmp_path / "p0.out").read_text())
  worker = summary_of((tmp_path / "p1.out").read_text())
  assert summary["processes"] == 2 and summary["shares"] == shares  # merge_logs refuses an index met twice
  assert (worker["process"], worker["share"], worker["labelled"]) == (1, shares[1], shares[1])
  assert summary["labelled"] == shares[0]

  # the same outputs as one process, byte for byte, and the same report of skips
  files = tree(out)
  assert files.keys() == ref_files.keys()
  for name, data in ref_files.items():
    assert files[name] == data, name
  drop = ("manifest", "processes", "shares", "labelled")
  assert {k: v for k, v in summary.items() if k not in drop} == {k: v for k, v in ref_summary.items() if k not in drop}
  skipped = [line for line in err[0].splitlines() if line.startswith(("done:", "  skipped "))]
  assert skipped == [line for line in ref_stderr.splitlines() if line.startswith(("done:", "  skipped "))]
  assert json.dumps(summary["counts"]) == json.dumps(ref_summary["counts"])


# ------------------------------------------------------------------------------------------------------------
# webdataset tar shards as the input: the same contract, shard k to process k % 2
# ------------------------------------------------------------------------------------------------------------
def write_shards(d: Path, shards: int = 4, per_shard: int = 25) -> Path:
  """gen/0000K.tar: samples KEY.png + KEY.txt; prompt "gen N" for N = k % 20 (5 images each, across shards); one
  sample without its caption (skipped) and one .txt without an image (skipped)."""
  rng = np.random.default_rng(5)
  d.mkdir(parents=True, exist_ok=True)
  for s in range(shards):
    with tarfile.open(d / f"{s:05d}.tar", "w") as tf:

      def add(name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

      for k in range(s * per_shard, (s + 1) * per_shard):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        add(f"{k:06d}.png", buf.getvalue())
        if k != 37:
          add(f"{k:06d}.txt", f"gen {k % 20}".encode())
      if s == 2:
        add("orphan.txt", b"gen 1")
  return d


def _run(cmd, env, cwd=ROOT):
  return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=DEADLINE_S)


def test_shards_two_processes_label_like_one(label_data, tmp_path):  # noqa: F811
  pytest.importorskip("webdataset")
  gen = write_shards(tmp_path / "gen")
  spec = f"{gen}/{{00000..00003}}.tar"

  def cmd(out):
    c = label_cmd(label_data, out)
    i = c.index("--images")
    return c[:i] + ["--shards", spec] + c[i + 2 :]

  one = _run(cmd(tmp_path / "one"), label_env())
  assert one.returncode == 1, one.stderr[-3000:]
  assert f"skipped {gen / '00001.tar'}:000037.png: no caption" in one.stderr
  assert "orphan" in one.stderr
  port = _free_port()
  procs = [
    subprocess.Popen(
      cmd(tmp_path / "two"),
      env=label_env(HPS_COORDINATOR=f"127.0.0.1:{port}", HPS_NUM_PROCESSES="2", HPS_PROCESS_ID=str(i)),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
    )
    for i in (0, 1)
  ]
  try:
    outs = [p.communicate(timeout=DEADLINE_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  assert [p.returncode for p in procs] == [1, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
  ref, got = summary_of(one.stdout), summary_of(outs[0][0])
  # 99 captioned samples, 20 prompts of 4-5 images; shards 0, 2 -> process 0 (25 + 25), 1, 3 -> process 1 (24 + 25)
  assert ref["images"] == 99 and ref["prompts"] == 20 and ref["shares"] == [99]
  assert got["shares"] == [50, 49] and summary_of(outs[1][0])["labelled"] == 49
  a, b = tree(tmp_path / "one"), tree(tmp_path / "two")
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
  manifest = [json.loads(line) for line in a["manifest.jsonl"].decode().splitlines()]
  selected = [r for r in manifest if r["kind"] != "regularization"]
  assert selected and all(r["image"].startswith("images/0000") for r in selected)
  with tarfile.open(gen / "00000.tar") as tf:
    first = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".png")}
  for r in selected:  # extracted from the shard, original bytes
    shard, name = r["image"].split("/")[1:]
    if shard == "00000":
      assert a[r["image"]] == first[name]


# ------------------------------------------------------------------------------------------------------------
# the share rule and the merge, without processes
# ------------------------------------------------------------------------------------------------------------
def test_shares_are_disjoint_and_cover_the_candidates(tmp_path):
  from hps_jax.adapt.label import LabelConfig, merge_logs, share, survey
  from hps_jax.data.diffusiondb import Record
  from hps_jax.errors import InputError

  def units():  # 3 parts of 5, 4 and 0 records; prompts p0..p3 twice each (index k -> p{k % 4}), "solo" once
    k = 0
    for n in (5, 4, 0):
      recs = []
      for _ in range(n):
        recs.append(Record(name=f"{k}.png", prompt=f"p{k % 4}" if k < 8 else "solo", archive=f"part{n}.zip"))
        k += 1
      yield recs

  config = LabelConfig(alpha=2.0)
  for by_index in (False, True):
    s = survey(units(), by_index=by_index)
    assert s.images == 9 and s.counts == [2, 2, 2, 2, 1]  # p0: 0, 4; p1: 1, 5; p2: 2, 6; p3: 3, 7; solo: 8
    assert s.share_size(config) == 0  # n = 2 <= alpha: nothing is scored
    loose = LabelConfig(alpha=1.5)
    got = [[i for i, _ in share(units(), s, loose, j, 2)] for j in (0, 1)]
    assert sorted(got[0] + got[1]) == list(range(8)) and not set(got[0]) & set(got[1])
    # parts go whole to process (part index % 2); JSONL rows by index % 2
    assert got == ([[0, 1, 2, 3, 4], [5, 6, 7]] if not by_index else [[0, 2, 4, 6], [1, 3, 5, 7]])
    assert [s.share_size(loose, j, 2) for j in (0, 1)] == [len(g) for g in got]
    assert [i for i, _ in share(units(), s, loose, 0, 1, done={0, 1, 2})] == [3, 4, 5, 6, 7]  # a resume
  # two logs holding the same image: refused, naming both
  a, b = tmp_path / "a.partial", tmp_path / "b.partial"
  a.write_text(json.dumps({"i": 0, "hps": 1.0, "prompt": "p", "name": "0.png", "archive": None}) + "\n")
  b.write_text(json.dumps({"i": 0, "blurry": True}) + "\n")
  with pytest.raises(InputError, match=r"b\.partial: image 0 is also in .*a\.partial"):
    merge_logs([a, b])
  b.write_text(json.dumps({"i": 1, "where": "x", "skip": "bad"}) + "\n" + json.dumps({"i": 2, "blurry": True}) + "\n")
  m = merge_logs([b, a])
  assert (m.scored, m.skipped, m.blurry, m.rows) == ([(0, "p", 1.0)], [("x", "bad")], 1, [2, 1])
  b.write_text("not json\n")
  with pytest.raises(InputError, match=r"b\.partial:1: not a score-log row"):
    merge_logs([b])


def test_resume_with_another_process_count_is_refused(label_data, tmp_path, capsys):  # noqa: F811
  from hps_jax.cli import main

  out = tmp_path / "run"
  out.mkdir()
  (out / "manifest.jsonl.scores.1-of-2.partial").write_text("")
  assert main(label_cmd(label_data, out, "--resume")[3:]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "written by 2 process(es) and this run has 1" in err, err


def test_shards_label_like_the_same_images_from_a_folder(label_data, tmp_path):  # noqa: F811
  """`label --shards` scores and selects exactly as `label --images` on the same images written out as files with a
  JSONL of {image, prompt} rows: the same HPS per image (bit for bit) and the same preferred / non-preferred picks."""
  pytest.importorskip("webdataset")
  gen = write_shards(tmp_path / "gen")
  folder = tmp_path / "files"
  folder.mkdir()
  rows = []
  for shard in sorted(gen.glob("*.tar")):
    with tarfile.open(shard) as tf:
      members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    for name, data in members.items():
      key = name.rsplit(".", 1)[0]
      if name.endswith(".png") and f"{key}.txt" in members:
        (folder / name).write_bytes(data)
        rows.append({"image": name, "prompt": members[f"{key}.txt"].decode()})
  (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  def cmd(out, source):
    c = label_cmd(label_data, out)
    i = c.index("--images")
    return c[:i] + source + c[i + 2 :]

  shards = _run(cmd(tmp_path / "a", ["--shards", f"{gen}/{{00000..00003}}.tar"]), label_env())
  files = _run(cmd(tmp_path / "b", ["--images", str(folder / "pairs.jsonl")]), label_env())
  assert shards.returncode == 1 and files.returncode == 0, shards.stderr[-2000:] + files.stderr[-2000:]

  def by_key(out):
    got = {}
    for line in (out / "scores.jsonl").read_text().splitlines():
      r = json.loads(line)
      got[r["image"].replace(":", "/").rsplit("/", 1)[-1]] = (r["prompt"], r["hps"], r["kind"])
    return got

  a, b = by_key(tmp_path / "a"), by_key(tmp_path / "b")
  assert len(a) == len(rows) == 99 and a == b
  assert any(kind == "preferred" for _, _, kind in a.values())
