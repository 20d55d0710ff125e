"""The study's web pages in a real browser (Chromium driven by Playwright): a study of 10 test pairs served under
waitress on a loopback port; one participant answers every pair by clicking the buttons, another by the arrow keys.
Checks that the prompt and both images are shown (decoded: `naturalWidth` > 0), that the database ends with exactly
one vote per answered pair with the side clicked / pressed, that the chosen system is the system of the image that
was on that side (the left / right mapping), and that going back after a vote and submitting again writes nothing.

Skipped without Playwright (`pip install playwright`) or a system Chromium (`apt-get install chromium`); Playwright's
own browser download is never used. `HPS_JAX_UPDATE_SCREENSHOT=1` also writes the first pair page to
docs/study_pair_page.png (the README's screenshot)."""

import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("flask")
pytest.importorskip("sqlalchemy")
pytest.importorskip("waitress", reason="the study server runs under waitress")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")

import waitress.server  # noqa: E402
from sqlalchemy import select  # noqa: E402

from hps_jax.cli import main  # noqa: E402
from hps_jax.study import web  # noqa: E402
from hps_jax.study.create import load_study, verify_images  # noqa: E402
from hps_jax.study.store import Participant, VoteRow, open_store, sqlite_url  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "study_pair_page.png"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.path.exists(p)), None)
N_PAIRS = 10
TOKEN = "browser-test"
PROMPTS = [
  f"a {c} {s} on a plain background"
  for c, s in zip(
    ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "teal"),
    ("circle", "square", "triangle", "star", "ring", "cross", "heart", "moon", "diamond", "arrow"),
  )
]
CLICKS = ["left", "right", "left", "left", "right", "right", "left", "right", "left", "right"]  # by question k - 1
KEYS = ["right", "right", "left", "right", "left", "left", "right", "left", "left", "right"]

pytestmark = pytest.mark.skipif(
  CHROMIUM is None, reason="needs a system Chromium (/usr/bin/chromium): apt-get install chromium"
)


def _image(path: Path, system: str, i: int) -> None:
  """64x64, distinct per system (orange with a dark disc / blue with a white square) and per pair (position)."""
  bg, fg = ((235, 140, 40), (60, 30, 10)) if system == "adapted" else ((40, 90, 200), (245, 245, 245))
  img = Image.new("RGB", (64, 64), bg)
  x, y = 8 + 3 * i, 10 + 2 * i
  box = (x, y, x + 24, y + 24)
  (ImageDraw.Draw(img).ellipse if system == "adapted" else ImageDraw.Draw(img).rectangle)(box, fill=fg)
  img.save(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(base url, study, store) of a 10-pair study (forced choice, no checks) served in a thread."""
  d = tmp_path_factory.mktemp("browser_study")
  for system in ("adapted", "base"):
    (d / system).mkdir()
    rows = []
    for i, prompt in enumerate(PROMPTS):
      _image(d / system / f"{i}.png", system, i)
      rows.append({"file_name": f"{i}.png", "prompt": prompt})
    (d / system / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = d / "study.json"
  rc = main(["study", "create", "--system", f"base={d / 'base'}", "--system", f"adapted={d / 'adapted'}",
             "--out", str(out), "--title", "Which image is better?"])  # fmt: skip
  assert rc == 0
  study = load_study(out)
  assert verify_images(study) == [] and len(study.test_pairs) == N_PAIRS
  store = open_store(sqlite_url(d / "votes.sqlite"), study)
  server = waitress.server.create_server(web.make_app(study, store, TOKEN), host="127.0.0.1", port=0, threads=4)
  stop = threading.Event()
  thread = threading.Thread(target=web.run_until, args=(server, stop.is_set), daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.effective_port}", study, store
  finally:
    stop.set()
    thread.join(timeout=30)
    store.close()


def _pair_state(page) -> dict:
  """What the pair page shows: question k / N, pair id, prompt and the two image keys."""
  return page.evaluate(
    """() => {
      const m = document.body.innerText.match(/Question (\\d+) \\/ (\\d+)/);
      const imgs = Array.from(document.querySelectorAll('.pair img'));
      return {k: +m[1], total: +m[2], pair_id: document.querySelector('input[name=pair_id]').value,
              prompt: document.querySelector('.prompt b').innerText,
              keys: imgs.map(i => i.getAttribute('src').split('/').pop())};
    }"""
  )


def _check_shown(page) -> None:
  """The prompt and both images are visible, and both images decoded (naturalWidth > 0)."""
  sync_api.expect(page.locator(".prompt")).to_be_visible()
  imgs = page.locator(".pair img")
  assert imgs.count() == 2
  for i in range(2):
    sync_api.expect(imgs.nth(i)).to_be_visible()
  page.wait_for_function("() => Array.from(document.querySelectorAll('.pair img')).every(i => i.complete)")
  widths = page.evaluate("() => Array.from(document.querySelectorAll('.pair img')).map(i => i.naturalWidth)")
  assert widths == [64, 64], widths


def _answer(page, choice: str, by: str) -> None:
  with page.expect_navigation():
    if by == "click":
      page.locator(f'button[value="{choice}"]').click()
    else:
      page.keyboard.press({"left": "ArrowLeft", "right": "ArrowRight"}[choice])


def _participant(browser, url: str, study, by: str, pattern: list[str], shots: Path, readme_shot: bool) -> tuple:
  """Joins in a fresh context and answers every pair; returns (participant code, {pair_id: (choice, system)})."""
  system_of = {key: study.images[image_id]["system"] for key, image_id in web.image_keys(study).items()}
  prompt_of = {p["id"]: p["prompt"] for p in study.pairs}
  context = browser.new_context(viewport={"width": 900, "height": 560})
  page = context.new_page()
  posts: list[str] = []
  page.on("request", lambda r: posts.append(r.url) if r.method == "POST" and r.url.endswith("/vote") else None)
  branch = []
  try:
    page.goto(url + "/")
    with page.expect_navigation():
      page.get_by_role("button", name="Start").click()
    code = context.cookies()[0]["value"]
    answered: dict[str, tuple[str, str]] = {}
    while not page.url.endswith("/thanks"):
      s = _pair_state(page)
      assert s["total"] == N_PAIRS and s["k"] == len(answered) + 1 and s["pair_id"] not in answered
      assert s["prompt"] == prompt_of[s["pair_id"]] and len(set(s["keys"])) == 2
      if s["k"] == 1:
        _check_shown(page)
        page.screenshot(path=str(shots / f"pair_page_{by}.png"), full_page=True)
        if readme_shot and os.environ.get("HPS_JAX_UPDATE_SCREENSHOT") == "1":
          SCREENSHOT.parent.mkdir(exist_ok=True)
          page.screenshot(path=str(SCREENSHOT), full_page=True)
      choice = pattern[s["k"] - 1]
      _answer(page, choice, by)
      answered[s["pair_id"]] = (choice, system_of[s["keys"][0 if choice == "left" else 1]])
      if s["k"] == 3:  # back after a vote, then submit again: the first vote stays the only one for that pair
        other = "right" if choice == "left" else "left"
        page.go_back()
        page.wait_for_load_state()
        if "/pair" in page.url and _pair_state(page)["pair_id"] == s["pair_id"]:
          branch.append("stale page")
          _answer(page, other, "click")  # a stale page from the history: its vote must be ignored
        else:  # the server shows the current pair: post the stale pair's form as the old page would have
          branch.append("current pair")
          with page.expect_navigation():
            page.evaluate(
              """([pairId, choice]) => {
                const f = document.createElement('form'); f.method = 'post'; f.action = '/vote';
                for (const [n, v] of [['pair_id', pairId], ['choice', choice]]) {
                  const i = document.createElement('input'); i.type = 'hidden'; i.name = n; i.value = v;
                  f.appendChild(i);
                }
                document.body.appendChild(f); f.submit();
              }""",
              [s["pair_id"], other],
            )
        assert _pair_state(page)["k"] == 4  # still at the next pair
    sync_api.expect(page.get_by_role("heading", name="Thank you!")).to_be_visible()
    assert f"all {N_PAIRS} questions" in page.inner_text("body")
    assert len(posts) == N_PAIRS + 1 and len(branch) == 1  # every answer and the resubmission reached the server
    return code, answered
  finally:
    context.close()


def test_two_participants_vote_in_a_browser(served, tmp_path):
  url, study, store = served
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    try:
      runs = [
        _participant(browser, url, study, "click", CLICKS, tmp_path, readme_shot=True),
        _participant(browser, url, study, "keyboard", KEYS, tmp_path, readme_shot=False),
      ]
    finally:
      browser.close()
  assert (tmp_path / "pair_page_click.png").stat().st_size > 0 and (tmp_path / "pair_page_keyboard.png").exists()
  votes = store.export_votes()
  assert len(votes) == 2 * N_PAIRS
  assert votes == [json.loads(line) for line in _admin_export(url).splitlines()]
  got = {(v["participant"], v["pair_id"]): v for v in votes}
  assert len(got) == 2 * N_PAIRS  # one vote per (participant, pair)
  for code, answered in runs:
    assert len(answered) == N_PAIRS
    for pair_id, (choice, system) in answered.items():
      v = got[code, pair_id]
      assert v["choice"] == choice  # the side clicked / pressed (the first vote on pair 3, not the resubmitted one)
      assert v[f"system_{choice}"] == system  # the chosen system is that of the image shown on the chosen side
      assert {v["system_left"], v["system_right"]} == {"adapted", "base"} and not v["is_check"]
      assert v["response_ms"] is not None and v["response_ms"] >= 0
  assert store.counts()["finished"] == 2
  with store.sessions() as s:  # the stored chosen system, too
    chosen = {
      (c, v.pair_id): v.chosen_system for v, c in s.execute(select(VoteRow, Participant.code).join(Participant))
    }
  assert chosen == {(code, pair_id): system for code, answered in runs for pair_id, (_, system) in answered.items()}


def _admin_export(url: str) -> str:
  req = urllib.request.Request(url + "/admin/export.jsonl", headers={"X-Admin-Token": TOKEN})
  with urllib.request.urlopen(req, timeout=30) as r:
    return r.read().decode()
