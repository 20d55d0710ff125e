"""The study server's web app (Flask, server-rendered HTML; no CDN, no build step): `make_app(study, store,
admin_token)`. `hps-jax study serve` runs it under waitress.

Participants:

* `GET /` the title, the instructions, the consent text (when the study has one: a checkbox must be ticked) and a
  start button; `POST /join` creates an anonymous participant, keeps its code in a cookie and goes to the pairs.
* `GET /pair` the pair the participant is at (the server decides: a refresh shows the same pair, going back shows
  the current one): the prompt, the two images side by side, "left is better" / "right is better" (and "can't
  decide" when the study allows ties), keys Left / Right (Down or Space for a tie), progress "k / N" and the
  participant's code. `POST /vote` records the vote and redirects (303) to the next pair; a vote on a pair already
  answered counts once (the first one), a vote on another pair than the current one writes nothing.
* `GET /thanks` when every pair is answered.
* `GET /image/<key>` an image of the study, by its key: the first 20 hex digits of its sha256 (image ids name the
  systems, so they never appear in a page: the participant must not know which system made which image). Only
  images listed in the study are served; anything else is 404.

Response time: the page's script measures the milliseconds from the pair being displayed to the click and sends
them in the hidden field `response_ms`; without script, the server's time since it first served the pair is kept
(`hps_jax.study.store`).

JSON API (scripted participants, tests): `POST /api/join` [{"code"}] -> {participant, total}; `GET /api/next?
participant=CODE` -> {pair_id, prompt, left_url, right_url, k, total} or {done: true, total}; `POST /api/vote`
{participant, pair_id, choice, response_ms} -> {recorded: true} or {duplicate: true}, with the stored choice. Errors
are {"error": message}: 400 malformed body, 404 unknown participant, 409 a pair not assigned (or not the current
one), 413 a body over `MAX_BODY` bytes.

Admin (`?token=TOKEN` or the header `X-Admin-Token: TOKEN`; else 403): `GET /admin` live counts and per-participant
progress, `GET /admin/counts.json`, `GET /admin/export.jsonl` the votes (`Store.export_votes`).
"""

from __future__ import annotations

import hmac
import json

from flask import Flask, Response, abort, jsonify, make_response, redirect, render_template_string, request, send_file
from werkzeug.exceptions import HTTPException

from hps_jax.study.create import Study, image_path
from hps_jax.study.store import Store, StoreError

COOKIE = "hps_study_participant"
MAX_BODY = 16 * 1024
KEY_CHARS = 20

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1rem; color: #222; }
.pair { display: flex; gap: 1rem; justify-content: center; }
.pair figure { margin: 0; flex: 1 1 0; text-align: center; }
.pair img { width: 100%; max-width: 640px; max-height: 70vh; object-fit: contain; background: #eee; }
.buttons { display: flex; gap: 1rem; justify-content: center; margin: 1rem 0; }
button { font-size: 1.1rem; padding: .6rem 1.4rem; cursor: pointer; }
.prompt { font-size: 1.2rem; text-align: center; margin: .5rem 0 1rem; }
.small { color: #666; font-size: .9rem; }
.consent { white-space: pre-wrap; border: 1px solid #ccc; padding: 1rem; max-height: 40vh; overflow: auto; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2rem .6rem; }
</style></head><body>
"""

JOIN = (
  _BASE
  + """<h1>{{ title }}</h1>
<p>{{ instructions }}</p>
<form method="post" action="{{ url_for('join_page') }}">
{% if consent %}<div class="consent">{{ consent }}</div>
<p><label><input type="checkbox" name="consent" value="yes" required> I have read and accept the text above.</label></p>
{% endif %}<button type="submit">Start</button>
</form></body></html>
"""
)

PAIR = (
  _BASE
  + """<p class="small">Question {{ k }} / {{ total }} &middot; your participant code: <b>{{ code }}</b></p>
<p class="prompt">Prompt: <b>{{ prompt }}</b></p>
<form method="post" action="{{ url_for('vote_page') }}" id="vote">
<input type="hidden" name="pair_id" value="{{ pair_id }}">
<input type="hidden" name="response_ms" id="response_ms" value="">
<div class="pair">
<figure><img src="{{ left_url }}" alt="left image"><figcaption>left</figcaption></figure>
<figure><img src="{{ right_url }}" alt="right image"><figcaption>right</figcaption></figure>
</div>
<div class="buttons">
<button type="submit" name="choice" value="left">&larr; left is better</button>
{% if allow_tie %}<button type="submit" name="choice" value="tie">can't decide (&darr;)</button>{% endif %}
<button type="submit" name="choice" value="right">right is better &rarr;</button>
</div></form>
<p class="small">Keys: &larr; left, &rarr; right{% if allow_tie %}, &darr; or space: can't decide{% endif %}.</p>
<script>
(function () {
  var start = performance.now(), sent = false, form = document.getElementById("vote");
  form.addEventListener("submit", function (e) {
    if (sent) { e.preventDefault(); return; }
    sent = true;
    document.getElementById("response_ms").value = Math.round(performance.now() - start);
  });
  document.addEventListener("keydown", function (e) {
    var keys = {ArrowLeft: "left", ArrowRight: "right"{% if allow_tie %}, ArrowDown: "tie", " ": "tie"{% endif %}};
    var choice = keys[e.key];
    if (!choice || sent) return;
    e.preventDefault();
    form.querySelector('button[value="' + choice + '"]').click();
  });
})();
</script></body></html>
"""
)

THANKS = (
  _BASE
  + """<h1>Thank you!</h1><p>You answered all {{ total }} questions. Your participant code: <b>{{ code }}</b></p>
</body></html>
"""
)

ADMIN = (
  _BASE
  + """<h1>{{ title }}: admin</h1>
<p>{{ counts.participants }} participants, {{ counts.finished }} finished, {{ counts.votes }} votes.
<a href="{{ url_for('admin_export', token=token) }}">export.jsonl</a></p>
<table><tr><th>participant</th><th>joined</th><th>progress</th></tr>
{% for p in counts.per_participant %}<tr><td>{{ p.participant }}</td><td>{{ p.created }}</td>
<td>{{ p.done }} / {{ p.total }}</td></tr>
{% endfor %}</table></body></html>
"""
)


def run_until(server, stop) -> None:
  """Runs a waitress `server` (from `waitress.server.create_server`) one poll at a time (at most its
  `asyncore_loop_timeout`) until `stop()` is true, then lets the requests in flight finish (their votes commit)
  and closes it. Polling, rather than `server.run()`, keeps the stop decision outside waitress' event loop: an
  exception raised inside it would be logged and swallowed by the dispatcher it hit."""
  from waitress import wasyncore

  try:
    while not stop():
      wasyncore.loop(
        timeout=server.adj.asyncore_loop_timeout, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1
      )
  finally:
    try:
      server.task_dispatcher.shutdown(cancel_pending=False, timeout=10)
    finally:
      server.close()


def image_keys(study: Study) -> dict[str, str]:
  """{key: image id}: the key of an image is the first 20 hex digits of its sha256 (identical files share one)."""
  keys: dict[str, str] = {}
  for image_id in sorted(study.images):
    keys.setdefault(study.images[image_id]["sha256"][:KEY_CHARS], image_id)
  return keys


def make_app(study: Study, store: Store, admin_token: str) -> Flask:
  """The study's web app (module docstring). The images should be checked first (`verify_images`)."""
  if not admin_token:
    raise ValueError("an admin token is required")
  app = Flask(__name__)
  app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
  settings = study.settings
  allow_tie = bool(settings["allow_tie"])
  keys = image_keys(study)
  paths = {key: image_path(study, image_id) for key, image_id in keys.items()}

  def url(image_id: str) -> str:
    return f"/image/{study.images[image_id]['sha256'][:KEY_CHARS]}"

  def is_api() -> bool:
    return request.path.startswith("/api/")

  @app.errorhandler(HTTPException)
  def http_error(e: HTTPException):
    if is_api() or request.path.startswith("/admin/"):
      return jsonify(error=e.description or e.name), e.code
    return e

  @app.errorhandler(StoreError)
  def store_error(e: StoreError):
    return jsonify(error=str(e)), e.status

  def user_agent() -> str | None:
    return request.headers.get("User-Agent")

  # ------------------------------------------------------------------ participants (HTML)
  def cookie_code() -> str | None:
    code = request.cookies.get(COOKIE)
    if not code:
      return None
    try:
      store.progress(code)
    except StoreError:
      return None
    return code

  @app.get("/")
  def index():
    if cookie_code():
      return redirect("/pair", 303)
    return render_template_string(
      JOIN, title=settings["title"], instructions=settings["instructions"], consent=settings.get("consent")
    )

  @app.post("/join")
  def join_page():
    code = cookie_code()
    if code is None:
      if settings.get("consent") and request.form.get("consent") != "yes":
        return redirect("/", 303)
      code = store.join(user_agent=user_agent(), consent=bool(settings.get("consent")))
    resp = redirect("/pair", 303)
    resp.set_cookie(COOKIE, code, max_age=90 * 24 * 3600, httponly=True, samesite="Lax")
    return resp

  @app.get("/pair")
  def pair_page():
    code = cookie_code()
    if code is None:
      return redirect("/", 303)
    nxt = store.next_assignment(code)
    if nxt.done:
      return redirect("/thanks", 303)
    resp = make_response(
      render_template_string(
        PAIR,
        title=settings["title"],
        k=nxt.k,
        total=nxt.total,
        code=code,
        prompt=nxt.prompt or "",
        pair_id=nxt.pair_id,
        left_url=url(nxt.image_left),
        right_url=url(nxt.image_right),
        allow_tie=allow_tie,
      )
    )
    resp.headers["Cache-Control"] = "no-store"  # back / refresh ask the server for the current pair
    return resp

  @app.post("/vote")
  def vote_page():
    code = cookie_code()
    if code is None:
      return redirect("/", 303)
    ms = request.form.get("response_ms", "")
    response_ms = int(ms) if ms.isdigit() and len(ms) < 10 else None
    try:
      store.record_vote(code, request.form.get("pair_id"), request.form.get("choice"), response_ms, user_agent())
    except StoreError as e:
      if e.status == 400:
        abort(400, str(e))
      # a stale page (another pair than the current one): nothing written, show the current pair
    return redirect("/pair", 303)

  @app.get("/thanks")
  def thanks():
    code = cookie_code()
    if code is None:
      return redirect("/", 303)
    done, total = store.progress(code)
    if done < total:
      return redirect("/pair", 303)
    return render_template_string(THANKS, title=settings["title"], total=total, code=code)

  @app.get("/image/<key>")
  def image(key: str):
    path = paths.get(key)
    if path is None:
      abort(404)
    resp = send_file(path, max_age=24 * 3600, etag=key, conditional=True)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp

  # ------------------------------------------------------------------ JSON API
  def body() -> dict:
    data = request.get_json(silent=True)  # an oversize body is a 413 here (MAX_CONTENT_LENGTH)
    if not isinstance(data, dict):
      abort(400, "expected a JSON object body")
    return data

  @app.post("/api/join")
  def api_join():
    data = body() if request.content_length else {}
    code = store.join(data.get("code"), user_agent=user_agent(), consent=bool(data.get("consent", False)))
    return jsonify(participant=code, total=store.progress(code)[1])

  @app.get("/api/next")
  def api_next():
    nxt = store.next_assignment(request.args.get("participant", ""))
    if nxt.done:
      return jsonify(done=True, total=nxt.total)
    return jsonify(
      pair_id=nxt.pair_id,
      prompt=nxt.prompt,
      left_url=url(nxt.image_left),
      right_url=url(nxt.image_right),
      k=nxt.k,
      total=nxt.total,
      allow_tie=allow_tie,
    )

  @app.post("/api/vote")
  def api_vote():
    data = body()
    r = store.record_vote(
      data.get("participant"), data.get("pair_id"), data.get("choice"), data.get("response_ms"), user_agent()
    )
    outcome = {"duplicate": True} if r.duplicate else {"recorded": True}
    return jsonify(**outcome, pair_id=r.pair_id, choice=r.choice)

  # ------------------------------------------------------------------ admin
  def check_admin() -> str:
    given = request.args.get("token") or request.headers.get("X-Admin-Token") or ""
    if not hmac.compare_digest(given.encode(), admin_token.encode()):
      abort(403, "admin pages need the admin token (?token= or the X-Admin-Token header)")
    return given

  @app.get("/admin")
  def admin():
    token = check_admin()
    return render_template_string(ADMIN, title=settings["title"], counts=store.counts(), token=token)

  @app.get("/admin/counts.json")
  def admin_counts():
    check_admin()
    return jsonify(store.counts())

  @app.get("/admin/export.jsonl")
  def admin_export():
    check_admin()
    text = "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in store.export_votes())
    return Response(text, mimetype="application/x-ndjson")

  return app
