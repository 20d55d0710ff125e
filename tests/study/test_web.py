"""The study server: the store (SQLite in tmp_path) and the Flask app through its test client (join -> votes ->
done, the left / right -> system mapping, votes counted once on refresh / back / double submit / replay, the 4xx
answers that write nothing, admin token, image keys), the export read by `hps_jax.study.analysis`, and one real
`hps-jax study serve` process under waitress driven by 5 concurrent scripted participants, stopped by SIGTERM."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main
from hps_jax.study.analysis import Vote, as_votes, check_failures, win_rates
from hps_jax.study.create import load_study, verify_images

pytest.importorskip("flask")
pytest.importorskip("sqlalchemy")
from sqlalchemy import select  # noqa: E402

from hps_jax.study.store import (  # noqa: E402
  NotAssigned,
  Participant,
  UnknownParticipant,
  VoteRow,
  open_store,
  sqlite_url,
)
from hps_jax.study.web import COOKIE, make_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "secret-token"
PER, CHECKS = 3, 2  # test pairs per participant, checks (one identical, one broken)


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("study")
  rng = np.random.default_rng(0)
  for system in ("adapted", "base"):
    (d / system).mkdir()
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(d / system / f"{i}.png")
  out = d / "study.json"
  rc = main(
    ["study", "create", "--system", f"base={d / 'base'}", "--system", f"adapted={d / 'adapted'}", "--out", str(out),
     "--allow-tie", "--checks", str(CHECKS), "--broken-checks", "--pairs-per-participant", str(PER)]
  )  # fmt: skip
  assert rc == 0
  return out


@pytest.fixture
def study(study_file):
  s = load_study(study_file)
  assert verify_images(s) == []
  return s


@pytest.fixture
def store(study, tmp_path):
  st = open_store(sqlite_url(tmp_path / "votes.sqlite"), study)
  yield st
  st.close()


@pytest.fixture
def client(study, store):
  return make_app(study, store, TOKEN).test_client()


def _n_votes(store) -> int:
  return store.counts()["votes"]


def _system(study, url: str) -> str:
  key = url.rsplit("/", 1)[1]
  return next(img["system"] or "broken" for img in study.images.values() if img["sha256"].startswith(key))


def test_api_flow_maps_sides_to_systems_and_exports_votes(study, store, client):
  codes = [client.post("/api/join").get_json()["participant"] for _ in range(3)]
  expected = []
  for i, code in enumerate(codes):
    seen = 0
    while True:
      nxt = client.get(f"/api/next?participant={code}").get_json()
      if nxt.get("done"):
        break
      seen += 1
      assert (nxt["k"], nxt["total"]) == (seen, PER + CHECKS)  # progress k / N
      choice = ("left", "right", "tie")[(i + seen) % 3]
      r = client.post("/api/vote", json={"participant": code, "pair_id": nxt["pair_id"], "choice": choice})
      assert r.status_code == 200 and r.get_json()["recorded"] is True
      chosen = None if choice == "tie" else _system(study, nxt[f"{choice}_url"])
      expected.append((code, nxt["pair_id"], choice, chosen, _system(study, nxt["left_url"])))
    assert seen == PER + CHECKS and store.progress(code) == (seen, seen)
  # the stored chosen system is the system of the image shown on the chosen side
  with store.sessions() as s:
    rows = {(c, v.pair_id): v for v, c in s.execute(select(VoteRow, Participant.code).join(Participant)).all()}
  assert len(rows) == len(expected)
  for code, pair_id, choice, chosen, _ in expected:
    assert (rows[code, pair_id].choice, rows[code, pair_id].chosen_system) == (choice, chosen)

  exported = store.export_votes()
  assert len(exported) == len(expected)
  for row in exported:
    assert set(row) == {f for f in Vote.__dataclass_fields__} | {"response_ms", "created", "user_agent"}
    assert row["response_ms"] is not None and row["response_ms"] >= 0
  votes = as_votes(exported)
  for v in votes:
    if v.is_check and v.image_left != v.image_right:  # broken check: the intact side is expected
      assert "broken" in (v.system_left, v.system_right)
      assert v.expected == ("left" if v.system_right == "broken" else "right")
    elif v.is_check:
      assert v.expected == "tie"
  assert set(check_failures(votes)) == set(codes)
  (rate,) = win_rates(exported, n_boot=50).values()
  tests = [e for e in expected if not e[1].startswith("c")]
  assert rate.n_votes == len(tests) == 3 * PER
  assert rate.wins_a == sum(e[3] == "adapted" for e in tests)
  assert rate.wins_b == sum(e[3] == "base" for e in tests)
  assert rate.ties == sum(e[2] == "tie" for e in tests)
  # the admin export is the same
  r = client.get("/admin/export.jsonl", headers={"X-Admin-Token": TOKEN})
  assert [json.loads(line) for line in r.text.splitlines()] == exported
  assert client.get(f"/api/next?participant={codes[0]}").get_json() == {"done": True, "total": PER + CHECKS}


def test_replay_and_double_submit_count_once(store, client):
  code = client.post("/api/join").get_json()["participant"]
  nxt = client.get(f"/api/next?participant={code}").get_json()
  vote = {"participant": code, "pair_id": nxt["pair_id"], "choice": "left", "response_ms": 1234}
  assert client.post("/api/vote", json=vote).get_json()["recorded"] is True
  replay = client.post("/api/vote", json={**vote, "choice": "right"}).get_json()
  assert replay["duplicate"] is True and replay["choice"] == "left"  # the first vote wins
  assert _n_votes(store) == 1 and store.export_votes()[0]["response_ms"] == 1234
  # a later pair than the current one: 409, nothing written
  ahead = store._assignments(code)[2]["pair_id"]
  r = client.post("/api/vote", json={**vote, "pair_id": ahead})
  assert r.status_code == 409 and "current" in r.get_json()["error"]
  assert _n_votes(store) == 1 and store.progress(code) == (1, PER + CHECKS)


@pytest.mark.parametrize(
  "request_kw, status",
  [
    ({"json": {"participant": "nobody-here", "pair_id": "t0001", "choice": "left"}}, 404),
    ({"json": {"participant": "{code}", "pair_id": "t9999", "choice": "left"}}, 409),
    ({"json": {"participant": "{code}", "pair_id": "{pair}", "choice": "up"}}, 400),
    ({"json": {"participant": "{code}", "pair_id": "{pair}", "choice": "left", "response_ms": -5}}, 400),
    ({"data": "{not json", "content_type": "application/json"}, 400),
    ({"json": ["a list"]}, 400),
    ({"data": "x" * 100_000, "content_type": "application/json"}, 413),
  ],
)
def test_bad_votes_are_refused_and_write_nothing(store, client, request_kw, status):
  code = client.post("/api/join").get_json()["participant"]
  pair = client.get(f"/api/next?participant={code}").get_json()["pair_id"]
  if "json" in request_kw and isinstance(request_kw["json"], dict):
    request_kw = {"json": {k: v.format(code=code, pair=pair) if isinstance(v, str) else v
                           for k, v in request_kw["json"].items()}}  # fmt: skip
  r = client.post("/api/vote", **request_kw)
  assert r.status_code == status
  assert isinstance(r.get_json()["error"], str)
  assert _n_votes(store) == 0


def test_store_errors(store, study):
  with pytest.raises(UnknownParticipant):
    store.record_vote("nobody-here", "t0001", "left")
  code = store.join()
  with pytest.raises(NotAssigned):
    store.record_vote(code, "t9999", "left")
  assert store.join(code) == code  # joining again with a code resumes it
  assert store.counts()["participants"] == 1
  assert store._assignments(code) == store._assignments(code)  # seeded by the study seed and the code
  assert open_store(sqlite_url(store.engine.url.database), study).counts()["participants"] == 1


def test_html_pages_refresh_back_and_double_submit(study, store, client):
  assert b"Start" in client.get("/").data
  r = client.post("/join")
  assert r.status_code == 303 and r.headers["Location"].endswith("/pair")
  code = client.get_cookie(COOKIE).value
  page = client.get("/pair").text
  assert f"1 / {PER + CHECKS}" in page and code in page and "can't decide" in page and "ArrowLeft" in page
  assert "adapted" not in page and "base/" not in page  # the page never names a system
  assert client.get("/pair").text == page  # refresh: the same pair
  pair = store.next_assignment(code).pair_id
  r = client.post("/vote", data={"pair_id": pair, "choice": "right", "response_ms": "850"})
  assert r.status_code == 303 and _n_votes(store) == 1
  # back + resubmit of the old page, and a double click: counted once, the server shows the current pair
  client.post("/vote", data={"pair_id": pair, "choice": "left", "response_ms": "900"})
  assert _n_votes(store) == 1 and store.export_votes()[0]["choice"] == "right"
  assert f"2 / {PER + CHECKS}" in client.get("/pair").text
  while not store.next_assignment(code).done:
    client.post("/vote", data={"pair_id": store.next_assignment(code).pair_id, "choice": "tie"})
  r = client.get("/pair")
  assert r.status_code == 303 and r.headers["Location"].endswith("/thanks")
  assert "Thank you" in client.get("/thanks").text
  assert store.progress(code) == (PER + CHECKS, PER + CHECKS)


def test_images_by_key_only(study, client):
  code = client.post("/api/join").get_json()["participant"]
  nxt = client.get(f"/api/next?participant={code}").get_json()
  r = client.get(nxt["left_url"])
  assert r.status_code == 200 and r.data[:8] == b"\x89PNG\r\n\x1a\n"
  some_id = next(iter(study.images))
  for url in (f"/image/{some_id}", "/image/../study.json", "/image/..%2Fstudy.json", "/image/%2e%2e/x", "/image/0"):
    assert client.get(url).status_code == 404, url


def test_admin_needs_the_token(store, client):
  client.post("/api/join")
  for url in ("/admin", "/admin/export.jsonl", "/admin/counts.json"):
    assert client.get(url).status_code == 403
    assert client.get(url + "?token=wrong").status_code == 403
    assert client.get(url, headers={"X-Admin-Token": "wrong"}).status_code == 403
  assert client.get(f"/admin/counts.json?token={TOKEN}").get_json()["participants"] == 1
  assert "1 participants" in client.get("/admin", headers={"X-Admin-Token": TOKEN}).text


def test_serve_refuses_a_changed_image(study_file, tmp_path, capsys):
  copy = tmp_path / "s"
  shutil.copytree(study_file.parent, copy)
  victim = copy / "base" / "1.png"
  victim.write_bytes(victim.read_bytes() + b"x")
  assert main(["study", "serve", str(copy / "study.json"), "--db", str(tmp_path / "d.sqlite"), "--port", "0"]) == 2
  err = capsys.readouterr().err
  assert "base/1.png" in err and "Traceback" not in err
  assert not (tmp_path / "d.sqlite").exists()


def _start_server(study_file: Path, db: Path):
  httpx = pytest.importorskip("httpx")
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
    [sys.executable, "-m", "hps_jax.cli", "study", "serve", str(study_file), "--db", str(db), "--port", str(port),
     "--admin-token", TOKEN],
    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  base = f"http://127.0.0.1:{port}"
  for _ in range(300):
    try:
      httpx.get(base + "/", timeout=1)
      return proc, base
    except httpx.TransportError:
      if proc.poll() is not None:
        pytest.fail(proc.communicate()[1])
      time.sleep(0.1)
  proc.kill()
  pytest.fail("the server did not start")


def _stop(proc, signum) -> str:
  proc.send_signal(signum)
  try:
    return proc.communicate(timeout=30)[1]
  except subprocess.TimeoutExpired:
    proc.kill()
    raise


def test_sigint_stops_the_server_with_130(study_file, tmp_path):
  """waitress swallows KeyboardInterrupt and returns normally: the command must still exit 130."""
  proc, _ = _start_server(study_file, tmp_path / "i.sqlite")
  err = _stop(proc, signal.SIGINT)
  assert proc.returncode == 130, err
  assert "stopped by SIGINT" in err and "Traceback" not in err


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_served_study_under_load_and_sigterm(study_file, tmp_path):
  httpx = pytest.importorskip("httpx")
  db = tmp_path / "live.sqlite"
  proc, base = _start_server(study_file, db)
  try:
    truth: dict[tuple[str, str], tuple[str, str]] = {}
    lock, errors = threading.Lock(), []

    def participant(i: int):
      try:
        with httpx.Client(base_url=base, timeout=10) as c:
          code = c.post("/api/join", json={"code": f"scripted-{i}"}).json()["participant"]
          while not (nxt := c.get("/api/next", params={"participant": code}).json()).get("done"):
            choice = ("left", "right")[(i + nxt["k"]) % 2]
            body = {"participant": code, "pair_id": nxt["pair_id"], "choice": choice, "response_ms": 100 + i}
            assert c.post("/api/vote", json=body).json()["recorded"]
            assert c.post("/api/vote", json=body).json()["duplicate"]  # a replay counts once
            img = c.get(nxt[f"{choice}_url"])
            assert img.status_code == 200
            with lock:
              truth[code, nxt["pair_id"]] = (choice, nxt[f"{choice}_url"])
      except BaseException as e:  # noqa: BLE001
        errors.append(e)

    threads = [threading.Thread(target=participant, args=(i,)) for i in range(5)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    assert not errors, errors
    assert len(truth) == 5 * (PER + CHECKS)
  finally:
    err = _stop(proc, signal.SIGTERM)
  assert proc.returncode == 143, err
  assert "Traceback" not in err
  study = load_study(study_file)
  store = open_store(sqlite_url(db), create=False)
  try:
    rows = store.export_votes()
  finally:
    store.close()
  assert len(rows) == len(truth)
  for row in rows:
    choice, url = truth[row["participant"], row["pair_id"]]
    assert row["choice"] == choice and row["response_ms"] == 100 + int(row["participant"][-1])
    assert row[f"system_{choice}"] == _system(study, url)  # the side's system is the image shown there
  out = tmp_path / "votes.jsonl"
  assert main(["study", "export", "--db", str(db), "--out", str(out)]) == 0
  assert [json.loads(line) for line in out.read_text().splitlines()] == rows
  assert main(["study", "export", "--db", str(db), "--out", str(out)]) == 2  # exists, no --overwrite


def test_study_commands_without_the_study_extra(tmp_path):
  """Without Flask / SQLAlchemy / waitress, `study create` still imports and `study export` is exit 2 naming the
  extra (one line, no traceback)."""
  code = (
    "import sys; sys.modules.update(flask=None, sqlalchemy=None, waitress=None); from hps_jax.cli import main; "
    f"rc = main(['study', 'export', '--db', {str(tmp_path / 'x.sqlite')!r}, '--out', {str(tmp_path / 'v.jsonl')!r}]); "
    "import hps_jax.cli.study; print(rc)"
  )
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.stdout.strip() == "2", r.stderr
  assert "hps_jax[study]" in r.stderr and "Traceback" not in r.stderr
