"""The study store and server on SQLite and on PostgreSQL (`db_url`, tests/study/conftest.py): the vote semantics
through the store (a replay / double submit counted once, also raced from two processes' stores; unassigned,
not-current and unknown refused, writing nothing); a LOAD of 50 concurrent scripted participants (httpx.AsyncClient)
submitting 2,000 votes, each replayed once, to a real `hps-jax study serve --threads 8` process: none lost, none
doubled, each stored as sent (p50 / p95 vote latency printed and recorded as properties, never asserted); and a KILL:
the server SIGKILLed after about half the votes, every vote answered 200 "recorded" is in the database, the server
restarted on the same database and the participants finish with no duplicate.

Durability on a process kill: SQLite runs in WAL mode with synchronous=NORMAL (store.py). A commit appends to the
WAL file with write(); a killed process loses nothing the OS already has (only a power loss or an OS crash can lose
the last commits under NORMAL), and the next connection replays the WAL. PostgreSQL commits are the server's; killing
the app server drops only uncommitted transactions."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main
from hps_jax.study.create import load_study

pytest.importorskip("flask")
pytest.importorskip("sqlalchemy")
pytest.importorskip("waitress")
httpx = pytest.importorskip("httpx")

from hps_jax.study.store import BadVote, NotAssigned, UnknownParticipant, open_store  # noqa: E402
from tests.study.conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 40  # test pairs in the study, all of them shown to each participant
PARTICIPANTS = 50  # 50 x 40 = 2,000 votes
KILL_PARTICIPANTS = 20  # the kill test: 800 votes, the server killed after 400 (keeps the file near 90 s on 2 cores)
CONCURRENCY = 32  # requests in flight at once


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("load-study")
  rng = np.random.default_rng(1)
  for system in ("adapted", "base"):
    (d / system).mkdir()
    for i in range(PAIRS):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / system / f"{i:02d}.png")
  out = d / "study.json"
  rc = main(
    ["study", "create", "--system", f"base={d / 'base'}", "--system", f"adapted={d / 'adapted'}", "--out", str(out),
     "--allow-tie", "--pairs-per-participant", str(PAIRS)]
  )  # fmt: skip
  assert rc == 0
  return out


# ------------------------------------------------------------------------------------------- the store directly
def test_vote_semantics(study_file, db_url):
  study = load_study(study_file)
  store = open_store(db_url, study)
  try:
    code = store.join("alice-1")
    assert store.join("alice-1") == code and store.counts()["participants"] == 1  # joining again resumes
    assert store.progress(code) == (0, PAIRS)
    first = store.next_assignment(code)
    assert (first.k, first.total) == (1, PAIRS) and store.next_assignment(code) == first  # a refresh: the same pair
    r = store.record_vote(code, first.pair_id, "left", 1234)
    assert not r.duplicate and r.choice == "left" and r.chosen_system in ("base", "adapted")
    # replay and double submit (even with another choice): the first vote is returned, nothing written
    for choice in ("left", "right", "tie"):
      again = store.record_vote(code, first.pair_id, choice, 99)
      assert again.duplicate and (again.choice, again.chosen_system) == ("left", r.chosen_system)
    assert store.counts()["votes"] == 1
    # refused, nothing written: a pair not assigned, a pair ahead of the current one, an unknown participant, a
    # choice that is not one
    later = [a["pair_id"] for a in store._assignments(code)]
    with pytest.raises(NotAssigned):
      store.record_vote(code, "t9999", "left")
    with pytest.raises(NotAssigned, match="current"):
      store.record_vote(code, later[2], "left")
    with pytest.raises(UnknownParticipant):
      store.record_vote("nobody-here", later[1], "left")
    with pytest.raises(BadVote):
      store.record_vote(code, later[1], "up")
    assert store.counts()["votes"] == 1 and store.next_assignment(code).pair_id == later[1]
    # the same vote raced from two stores (two server processes on one database): one is recorded
    other = open_store(db_url, study)
    try:
      barrier, results = threading.Barrier(2), []

      def cast(st):
        barrier.wait()
        try:
          results.append(st.record_vote(code, later[1], "right", 10))
        except Exception as e:  # noqa: BLE001
          results.append(e)

      threads = [threading.Thread(target=cast, args=(st,)) for st in (store, other)]
      for t in threads:
        t.start()
      for t in threads:
        t.join(30)
      assert not [r for r in results if isinstance(r, Exception)], results
      assert sorted(r.duplicate for r in results) == [False, True]
      assert {r.choice for r in results} == {"right"}
    finally:
      other.close()
    rows = store.export_votes()
    assert [(v["participant"], v["pair_id"], v["choice"]) for v in rows] == [
      (code, first.pair_id, "left"),
      (code, later[1], "right"),
    ]
    assert rows[0]["response_ms"] == 1234
  finally:
    store.close()


# ------------------------------------------------------------------------------------------- the live server
class Server:
  """One `hps-jax study serve` process on `db_url` and a fixed port (a restart reuses it)."""

  def __init__(self, study_file: Path, db_url: str, log: Path):
    self.study_file, self.db_url, self.log = study_file, db_url, log
    self.port = free_port()
    self.base = f"http://127.0.0.1:{self.port}"
    self.proc = None

  def start(self) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(self.log, "a") as log:
      self.proc = subprocess.Popen(
        [sys.executable, "-m", "hps_jax.cli", "study", "serve", str(self.study_file), "--db-url", self.db_url,
         "--port", str(self.port), "--threads", "8", "--admin-token", "load-token"],
        cwd=ROOT, env=env, stdout=log, stderr=log,
      )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      try:
        httpx.get(self.base + "/", timeout=1)
        return
      except httpx.TransportError:
        if self.proc.poll() is not None:
          pytest.fail(f"the server exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        time.sleep(0.05)
    self.proc.kill()
    pytest.fail("the server did not start in 60 s")

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def server(study_file, db_url, tmp_path):
  s = Server(study_file, db_url, tmp_path / "server.log")
  s.start()
  yield s
  s.stop()


class Load:
  """50 scripted participants, each: join, then per pair GET /api/next, POST the vote, POST it again (a replay: must
  be "duplicate"). A request that fails in transport (the server is down) is retried until `deadline` with the same
  body; its vote may then come back "recorded" or "duplicate", both with the choice sent."""

  def __init__(self, base: str, participants: int = PARTICIPANTS, deadline: float = 120):
    self.base, self.participants, self.deadline = base, participants, time.monotonic() + deadline
    self.truth: dict[tuple[str, str], str] = {}  # (participant, pair) -> the choice sent
    self.acked: set[tuple[str, str]] = set()  # votes answered 200 "recorded"
    self.latencies: list[float] = []  # seconds, first submissions answered 200
    self.transport_errors = 0
    self.half = asyncio.Event()

  async def request(self, client, sem, method: str, url: str, **kw) -> dict:
    while True:
      try:
        async with sem:
          t0 = time.perf_counter()
          r = await client.request(method, url, **kw)
        assert r.status_code == 200, (method, url, kw, r.status_code, r.text[:300])
        return r.json() | {"_s": time.perf_counter() - t0}
      except httpx.TransportError:
        self.transport_errors += 1
        if time.monotonic() > self.deadline:
          raise
        await asyncio.sleep(0.05)

  async def participant(self, client, sem, i: int) -> None:
    code = (await self.request(client, sem, "POST", "/api/join", json={"code": f"load-{i:03d}"}))["participant"]
    while not (nxt := await self.request(client, sem, "GET", "/api/next", params={"participant": code})).get("done"):
      choice = ("left", "right", "tie")[(i + nxt["k"]) % 3]
      body = {"participant": code, "pair_id": nxt["pair_id"], "choice": choice, "response_ms": 100 + i}
      key = (code, nxt["pair_id"])
      assert self.truth.setdefault(key, choice) == choice  # a pair is served again only before its vote is stored
      r = await self.request(client, sem, "POST", "/api/vote", json=body)
      assert r["choice"] == choice and r["pair_id"] == nxt["pair_id"]
      if r.get("recorded"):
        self.acked.add(key)
        self.latencies.append(r["_s"])
      else:  # only after a transport error: the first try was stored, its answer lost
        assert r["duplicate"] and self.transport_errors
      replay = await self.request(client, sem, "POST", "/api/vote", json=body)
      assert replay.get("duplicate") is True and replay["choice"] == choice
      if len(self.acked) >= self.participants * PAIRS // 2:
        self.half.set()

  async def run(self, during=None) -> None:
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=self.base, timeout=30, limits=limits) as client:
      tasks = [self.participant(client, sem, i) for i in range(self.participants)]
      if during is not None:
        tasks.append(during(self))
      await asyncio.gather(*tasks)


def _check_stored(db_url: str, study_file: Path, load: Load) -> list[dict]:
  store = open_store(db_url, create=False)
  try:
    rows = store.export_votes()
  finally:
    store.close()
  keys = [(r["participant"], r["pair_id"]) for r in rows]
  assert len(set(keys)) == len(keys), "a vote is stored twice"
  assert len(rows) == len(load.truth) == load.participants * PAIRS, "votes lost"
  for r in rows:
    assert r["choice"] == load.truth[r["participant"], r["pair_id"]]
    assert r["response_ms"] == 100 + int(r["participant"].rsplit("-", 1)[1])
  return rows


def _report(record_property, name: str, load: Load, wall: float) -> None:
  lat = np.array(load.latencies) * 1000
  p50, p95 = np.percentile(lat, [50, 95])
  record_property(f"{name}_vote_p50_ms", round(float(p50), 2))
  record_property(f"{name}_vote_p95_ms", round(float(p95), 2))
  record_property(f"{name}_wall_s", round(wall, 2))
  print(
    f"\n{name}: {len(load.truth)} votes (+ as many replays) by {load.participants} participants in {wall:.1f} s; "
    f"POST /api/vote latency p50 {p50:.1f} ms, p95 {p95:.1f} ms ({len(lat)} first submissions)"
  )


def test_load_2000_votes(study_file, db_url, server, record_property):
  load = Load(server.base)
  t0 = time.perf_counter()
  asyncio.run(load.run())
  wall = time.perf_counter() - t0
  assert load.transport_errors == 0
  assert load.acked == set(load.truth)  # every first submission was answered "recorded", every replay "duplicate"
  _check_stored(db_url, study_file, load)
  server.stop()
  assert server.proc.returncode == 143
  _report(record_property, f"load[{db_url.split(':', 1)[0].split('+')[0]}]", load, wall)


def test_sigkill_mid_load_loses_no_recorded_vote(study_file, db_url, server, record_property):
  seen_at_kill: dict = {}

  async def killer(load: Load) -> None:
    await load.half.wait()
    server.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(server.proc.wait, 30)
    seen_at_kill["acked"] = set(load.acked)  # answered before the process died: committed
    # the server is down: every vote it answered "recorded" is in the database
    store = open_store(db_url, create=False)
    try:
      stored = {(r["participant"], r["pair_id"]): r["choice"] for r in store.export_votes()}
    finally:
      store.close()
    seen_at_kill["stored"] = len(stored)
    missing = seen_at_kill["acked"] - set(stored)
    assert not missing, f"{len(missing)} votes answered 'recorded' are not in the database"
    assert all(stored[k] == load.truth[k] for k in stored)
    await asyncio.to_thread(server.start)  # the participants' retries reach it again

  load = Load(server.base, KILL_PARTICIPANTS)
  t0 = time.perf_counter()
  asyncio.run(load.run(during=killer))
  wall = time.perf_counter() - t0
  assert server.proc.returncode is None and load.transport_errors > 0  # the kill was seen; the restart serves
  _check_stored(db_url, study_file, load)
  acked_at_kill = len(seen_at_kill["acked"])
  assert load.participants * PAIRS // 2 <= acked_at_kill <= seen_at_kill["stored"]
  record_property("acked_at_kill", acked_at_kill)
  _report(record_property, f"kill[{db_url.split(':', 1)[0].split('+')[0]}]", load, wall)
  print(f"killed after {acked_at_kill} recorded votes ({seen_at_kill['stored']} in the database at the kill)")
