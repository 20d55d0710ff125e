"""Preference records from DiscordChatExporter JSON exports (`hps-jax collect discord`).

A *session* is a user's generation request, the bot's reply with the candidate images (N attachments, or one grid
collage cut into N tiles) and the user's *selection* of one candidate. Each selected session becomes one record of
``DIR/preference.jsonl`` in the ``preference_jsonl`` layout::

    {"id": "discord-<reply id>", "prompt": str, "images": ["images/ab/ab12...png", ...], "chosen": int,
     "user": "<author id>", "timestamp": "<request time>", "source_message_ids": [request, reply, selection],
     "seeds": [int, ...] (when the bot's text names them)}

with the candidates stored content-addressed under ``DIR/images/<sha256[:2]>/<sha256>.<ext>`` (grid tiles as PNG).

Reading is incremental (``ijson`` over the ``messages`` array): memory grows with the number of open sessions, not
with the size of the export. Attachments must be local files (DiscordChatExporter ``--media``: the ``url`` is a path
relative to the export file); http(s) URLs cannot be fetched and count as missing media; a path that resolves outside
the export's folder is refused.

Grammar
-------
How requests, replies and selections look is data: a dict (or a JSON file) with these keys (the built-ins
``dreambot`` and ``upscale`` are in `BUILTIN_GRAMMARS`; a JSON file only needs the keys it changes from
``"base"``, a built-in name, default ``dreambot``):

``selection``
    ``"resubmit"``: the user selects by sending one of the bot's candidate images back with a new request for the
    same prompt (the 2022 Stable Foundation ``!dream`` bot, DiffusionDB); ``"button"``: a later bot message that
    references the grid message names the chosen tile (Midjourney-style ``U1``..``U4`` / ``Image #k``).
``request``
    regex over a user's message text; group ``prompt`` is the prompt.
``count`` / ``default_count``
    regex with group ``n`` over the request (e.g. ``-n 4``) / the count when it does not match.
``bot_name``
    regex the bot author's name must match (``author.isBot`` must be true as well).
``reply``
    regex over a bot reply's text with groups ``prompt`` and (optionally) ``user`` (an author id): links a reply that
    has no ``reference`` to the same user's latest open request with the same prompt within ``window_seconds``.
``implicit_request``
    true: a reply with no request found still opens a session from its ``reply`` groups (slash commands, whose
    request is not a message); the user may come from ``interaction.user.id`` or the first mention.
``seeds``
    regex with group ``seeds`` (integers separated by spaces or commas) over the reply text.
``button``
    ``{"content": regex, "interaction": regex}``, each with group ``k`` (1-based tile): a bot message referencing a
    grid whose text (or ``interaction.name``) matches selects tile k.
``layouts`` / ``tile_aspect``
    grid geometry: ``{"4": [[2, 2]], "2": [[1, 2], [2, 1]], ...}`` maps a candidate count to the allowed
    [rows, cols]; among them the one whose tiles' width/height is nearest ``tile_aspect`` is used.
``nsfw_filename`` / ``nsfw_text``
    regexes: an attachment file name (``SPOILER_``) or bot text marking a reply as NSFW excludes the session.
``window_seconds``
    how long after its reply a session can be selected (and how far a reference-less reply may follow its request).
``phash_threshold`` / ``hash_size``
    a returned image matches a candidate by exact bytes (sha256) first, then by a difference hash of a
    ``hash_size`` x ``hash_size`` grayscale downscale within this many differing bits; two candidates within the
    threshold make the selection ambiguous (counted, never guessed).

Counted exclusions (``report.json`` ``excluded``): ``user_upload`` (a request conditioned on an image that is not
one of the bot's: user uploads are never stored), ``nsfw``, ``missing_media``, ``unsafe_path``, ``corrupt_image``,
``duplicate_session``, ``too_few_candidates``, ``user_cap``, ``duplicate_record``, ``ambiguous_selection``,
``unmatched_selection``, ``repeat_selection``, ``no_selection``, ``no_reply``, ``orphan_reply``, ``bad_message``.
``bad_message``, ``unsafe_path`` and ``corrupt_image`` are also *skipped inputs* (named in ``report.json``
``skipped`` and in `skips`; the command line exits 1). An export that is not complete UTF-8 JSON raises
`ExportError`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

from hps_jax import files
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}

_LAYOUTS = {
  "2": [[1, 2], [2, 1]],
  "3": [[1, 3], [3, 1]],
  "4": [[2, 2], [1, 4], [4, 1]],
  "6": [[2, 3], [3, 2]],
  "8": [[2, 4], [4, 2]],
  "9": [[3, 3]],
}

# what both built-in grammars share: grid layouts, NSFW markers, the session window and image matching
_SHARED = {
  "layouts": _LAYOUTS,
  "tile_aspect": 1.0,
  "nsfw_filename": r"^SPOILER_",
  "nsfw_text": r"(?i)\bnsfw\b",
  "window_seconds": 3600,
  "phash_threshold": 24,
  "hash_size": 16,
}

BUILTIN_GRAMMARS: dict[str, dict] = {
  "dreambot": {
    **_SHARED,
    "selection": "resubmit",
    "request": r'^\s*!dream\s+"(?P<prompt>[^"]+)"',
    "count": r"(?:^|\s)-n\s*(?P<n>\d+)",
    "default_count": 1,
    "bot_name": r"(?i)dream\s*bot",
    "reply": r'<@!?(?P<user>\d+)>.*?"(?P<prompt>[^"]+)"',
    "implicit_request": False,
    "seeds": r"(?:-S|[Ss]eeds?:?)\s*(?P<seeds>\d+(?:[ ,]+\d+)*)",
    "button": None,
  },
  "upscale": {
    **_SHARED,
    "selection": "button",
    "request": r"^\s*/imagine\s+(?:prompt:\s*)?(?P<prompt>.+?)\s*$",
    "count": None,
    "default_count": 4,
    "bot_name": r"(?i)journey|bot",
    "reply": r"\*\*(?P<prompt>.+?)\*\*(?:.*?<@!?(?P<user>\d+)>)?",
    "implicit_request": True,
    "seeds": r"--seed\s+(?P<seeds>\d+)",
    "button": {"content": r"Image #(?P<k>\d+)", "interaction": r"^(?:upscale[_ ]?|U)(?P<k>\d+)$"},
  },
}


class ExportError(InputError):
  """An export (or grammar) that cannot be read at all; the message is one line naming the file."""


def require_ijson():
  """The incremental JSON parser (the ``collect`` extra); ExportError with the install hint when it is missing."""
  try:
    import ijson  # optional: the [collect] extra
  except ImportError:
    raise ExportError("reading Discord exports needs ijson: pip install 'hps_jax[collect]'") from None
  return ijson


def load_grammar(spec) -> dict:
  """A grammar from a built-in name, a JSON file path or a dict (missing keys come from ``base``, default
  dreambot); regexes are checked here."""
  if isinstance(spec, dict):
    over = dict(spec)
  elif spec in BUILTIN_GRAMMARS:
    over = {"base": spec}
  else:
    path = Path(spec)
    if not path.is_file():
      raise ExportError(f"grammar {spec!r}: neither a built-in ({', '.join(BUILTIN_GRAMMARS)}) nor a JSON file")
    try:
      over = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ExportError(f"grammar {spec}: not readable JSON ({e})") from None
    if not isinstance(over, dict):
      raise ExportError(f"grammar {spec}: expected a JSON object")
  base = over.pop("base", "dreambot")
  if base not in BUILTIN_GRAMMARS:
    raise ExportError(f"grammar: unknown base {base!r}; choose from {', '.join(BUILTIN_GRAMMARS)}")
  g = copy.deepcopy(BUILTIN_GRAMMARS[base])
  unknown = set(over) - set(g)
  if unknown:
    raise ExportError(f"grammar: unknown keys {', '.join(sorted(unknown))}")
  g.update(over)
  if g["selection"] not in ("resubmit", "button"):
    raise ExportError(f"grammar: selection must be 'resubmit' or 'button', got {g['selection']!r}")
  if g["selection"] == "button" and not g.get("button"):
    raise ExportError("grammar: selection 'button' needs a 'button' entry")
  try:
    g["_re"] = {
      k: re.compile(g[k]) if g.get(k) else None
      for k in ("request", "count", "bot_name", "reply", "seeds", "nsfw_filename", "nsfw_text")
    }
    g["_re"]["button"] = {k: re.compile(v) for k, v in (g.get("button") or {}).items() if v}
  except re.error as e:
    raise ExportError(f"grammar: bad regex ({e})") from None
  if g["_re"]["request"] is None or g["_re"]["bot_name"] is None:
    raise ExportError("grammar: 'request' and 'bot_name' are required")
  return g


# ------------------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------------------
def dhash(im: Image.Image, size: int = 16) -> int:
  """Difference hash: size*size bits, each whether a pixel of the size x (size+1) grayscale downscale is brighter
  than its right neighbour."""
  a = np.asarray(im.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
  return int.from_bytes(np.packbits(a[:, 1:] > a[:, :-1]).tobytes(), "big")


def hamming(a: int, b: int) -> int:
  return (a ^ b).bit_count()


def _decode(data: bytes) -> Image.Image:
  im = Image.open(io.BytesIO(data))
  im.load()
  return im


def _png(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def _layout(grammar: dict, n: int, w: int, h: int) -> tuple[int, int] | None:
  options = grammar["layouts"].get(str(n)) or []
  if not options:
    return None
  target = math.log(grammar["tile_aspect"])
  rows, cols = min(options, key=lambda rc: abs(math.log((w / rc[1]) / (h / rc[0])) - target))
  return int(rows), int(cols)


# ------------------------------------------------------------------------------------------------------------
# the collector
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Request:
  id: str | None
  user: str
  prompt: str
  ts: datetime
  stamp: str
  n: int
  excluded: str | None = None
  answered: bool = False


@dataclass
class _Candidate:
  sha: str
  phash: int
  path: str  # relative to the output folder


@dataclass
class _Session:
  reply_id: str
  request: _Request
  ts: datetime
  candidates: list[_Candidate]
  seeds: list[int] = field(default_factory=list)
  selected: bool = False


class _Skip(Exception):
  def __init__(self, reason: str, detail: str = ""):
    super().__init__(detail or reason)
    self.reason, self.detail = reason, detail


def _norm(prompt: str) -> str:
  return " ".join(prompt.split())


def _when(value) -> datetime:
  if not isinstance(value, str):
    raise _Skip("bad_message", "no timestamp")
  try:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
  except ValueError:
    raise _Skip("bad_message", f"bad timestamp {value!r:.40}") from None


class DiscordCollector:
  """Feed it exports (`read_export`), then `finish()` writes ``preference.jsonl`` and returns the report.

  Images are written content-addressed into ``out/images`` as the bot's replies are read; those of sessions that end
  up without a record are removed again by `finish`."""

  def __init__(self, grammar, out, *, max_per_user: int = 0):
    self.g = grammar if isinstance(grammar, dict) and "_re" in grammar else load_grammar(grammar)
    self.re = self.g["_re"]
    self.out = Path(out)
    self.max_per_user = max_per_user
    self.skips = Skips()
    self.excluded: Counter = Counter()
    self.messages = 0
    self.records: list[dict] = []
    self._seen_ids: set[str] = set()
    self._requests: dict[str, _Request] = {}
    self._open_requests: dict[str, list[_Request]] = defaultdict(list)  # user -> unanswered requests
    self._sessions: dict[str, _Session] = {}
    self._user_sessions: dict[str, list[_Session]] = defaultdict(list)
    self._session_keys: set[tuple] = set()
    self._record_keys: set[tuple] = set()
    self._bot_shas: set[str] = set()
    self._per_user: Counter = Counter()
    self._written: set[str] = set()
    self._window = float(self.g["window_seconds"])

  # -- reading ------------------------------------------------------------------------------------------------
  def read_export(self, path) -> int:
    """Reads one export's messages incrementally; ExportError (one line) when the file is not a readable,
    complete JSON export. Returns the number of messages read."""
    ijson = require_ijson()
    path = Path(path)
    folder = path.resolve().parent
    n = 0
    try:
      with open(path, "rb") as f:
        for msg in ijson.items(f, "messages.item", use_float=True):
          n += 1
          self._feed(msg, path, folder)
    except OSError as e:
      raise ExportError(f"{path}: cannot read ({e.strerror or e})") from None
    except ijson.JSONError as e:
      text = str(e)
      if "UTF8" in text or "utf-8" in text.lower():
        raise ExportError(f"{path}: not UTF-8 text (invalid bytes after message {n})") from None
      first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
      raise ExportError(f"{path}: truncated or invalid JSON after message {n} ({first})") from None
    if n == 0:
      self.skips.add(str(path), "no messages (not a DiscordChatExporter JSON export?)")
    self.messages += n
    return n

  def _count(self, reason: str, what: str = "", detail: str = "", skip: bool = False) -> None:
    self.excluded[reason] += 1
    if skip:
      self.skips.add(what, f"{reason}: {detail}" if detail else reason)

  def _feed(self, msg, path: Path, folder: Path) -> None:
    mid = msg.get("id") if isinstance(msg, dict) else None
    where = f"{path.name}: message {mid}"
    try:
      if mid is None:
        raise _Skip("bad_message", "not a message object with an id")
      mid = str(mid)
      author = msg.get("author") or {}
      if not isinstance(author, dict):
        raise _Skip("bad_message", "author is not an object")
      is_bot = bool(author.get("isBot")) and bool(self.re["bot_name"].search(str(author.get("name") or "")))
      if mid in self._seen_ids:
        if is_bot and _images(msg):
          self._count("duplicate_session")
        return
      self._seen_ids.add(mid)
      content = msg.get("content") or ""
      if not isinstance(content, str):
        raise _Skip("bad_message", "content is not text")
      if is_bot:
        self._bot_message(mid, msg, content, folder, where)
      elif not author.get("isBot"):
        m = self.re["request"].search(content)
        if m:
          self._request(mid, msg, author, m, content, folder, where)
    except _Skip as e:
      self._count(e.reason, where, e.detail, skip=e.reason in ("bad_message", "unsafe_path", "corrupt_image"))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
      self._count("bad_message", where, f"{type(e).__name__}: {e}", skip=True)

  def _request(self, mid, msg, author, m, content, folder, where) -> None:
    user = str(author.get("id") or "")
    if not user:
      raise _Skip("bad_message", "request without author id")
    ts = _when(msg.get("timestamp"))
    n = self.g["default_count"]
    if self.re["count"] is not None:
      c = self.re["count"].search(content)
      if c:
        n = int(c.group("n"))
    req = _Request(mid, user, _norm(m.group("prompt")), ts, msg["timestamp"], n)
    atts = _images(msg)
    if atts:  # an image-conditioned request: a selection when the image is one of the bot's candidates
      try:
        data = _load(atts[0], folder)
      except _Skip as e:
        req.excluded = e.reason
        if e.reason == "unsafe_path":
          self.skips.add(where, f"{e.reason}: {e.detail}")
      else:
        req.excluded = self._selection_by_image(req, data, where)
    self._requests[mid] = req
    self._open_requests[user].append(req)

  def _selection_by_image(self, req: _Request, data: bytes, where: str) -> str | None:
    """Matches a returned image to the user's open sessions for the same prompt; -> an exclusion reason for the
    request's own session (user_upload) or None."""
    sha = hashlib.sha256(data).hexdigest()
    pool = [
      (s, k, c)
      for s in self._user_sessions.get(req.user, ())
      if s.request.prompt == req.prompt and 0 <= (req.ts - s.ts).total_seconds() <= self._window
      for k, c in enumerate(s.candidates)
    ]
    exact = [(s, k) for s, k, c in pool if c.sha == sha]
    if len(exact) == 1:
      self._select(exact[0][0], exact[0][1], req.id)
      return None
    try:
      ph = dhash(_decode(data), self.g["hash_size"])
    except Exception:  # noqa: BLE001  (any decoder failure: the upload is unusable)
      self.skips.add(where, "corrupt_image: the request's image does not decode")
      return "corrupt_image"
    near = [(s, k) for s, k, c in pool if hamming(c.phash, ph) <= self.g["phash_threshold"]]
    if len(exact) > 1 or len(near) > 1:
      self._count("ambiguous_selection")
      return None
    if len(near) == 1:
      self._select(near[0][0], near[0][1], req.id)
      return None
    if sha in self._bot_shas:
      self._count("unmatched_selection")
      return None
    return "user_upload"

  def _bot_message(self, mid, msg, content, folder, where) -> None:
    ref = str((msg.get("reference") or {}).get("messageId") or "")
    if self.g["selection"] == "button":
      k = self._button(msg, content)
      if k is not None:
        session = self._sessions.get(ref)
        if session is None:
          r = self.re["reply"].search(content) if self.re["reply"] else None
          session = self._find_session(r, msg) if r else None
        if session is None:
          self._count("unmatched_selection")
        elif not 1 <= k <= len(session.candidates):
          self._count("unmatched_selection")
        else:
          self._select(session, k - 1, mid)
        return
    atts = _images(msg)
    if not atts:
      return
    ts = _when(msg.get("timestamp"))
    req = self._requests.get(ref) if ref else None
    if req is None or req.answered:
      req = self._match_request(msg, content, ts)
    if req is None:
      self._count("orphan_reply")
      return
    req.answered = True
    self._open_requests[req.user] = [r for r in self._open_requests[req.user] if r is not req]
    if req.excluded:
      self._count(req.excluded)
      return
    nsfw_name = self.re["nsfw_filename"]
    if (nsfw_name and any(nsfw_name.search(str(a.get("fileName") or "")) for a in atts)) or (
      self.re["nsfw_text"] and self.re["nsfw_text"].search(content)
    ):
      self._count("nsfw")
      return
    candidates = self._candidates(atts, req.n, folder)
    if len(candidates) < 2:
      self._count("too_few_candidates")
      return
    key = tuple(c.sha for c in candidates)
    if key in self._session_keys:
      self._count("duplicate_session")
      return
    self._session_keys.add(key)
    self._bot_shas.update(key)
    seeds = []
    if self.re["seeds"]:
      s = self.re["seeds"].search(content)
      if s:
        seeds = [int(x) for x in re.findall(r"\d+", s.group("seeds"))]
    session = _Session(mid, req, ts, candidates, seeds)
    self._sessions[mid] = session
    self._user_sessions[req.user].append(session)

  def _button(self, msg, content) -> int | None:
    pats = self.re["button"]
    inter = msg.get("interaction") or {}
    name = str(inter.get("name") or "") if isinstance(inter, dict) else ""
    for text, pat in ((name, pats.get("interaction")), (content, pats.get("content"))):
      m = pat.search(text) if pat and text else None
      if m:
        return int(m.group("k"))
    return None

  def _reply_user(self, r, msg) -> str:
    if r and r.groupdict().get("user"):
      return r.group("user")
    inter = msg.get("interaction") or {}
    user = (inter.get("user") or {}).get("id") if isinstance(inter, dict) else None
    if user:
      return str(user)
    mentions = msg.get("mentions") or []
    return str(mentions[0].get("id") or "") if mentions and isinstance(mentions[0], dict) else ""

  def _match_request(self, msg, content, ts) -> _Request | None:
    """A reply without a (known) reference: the same user's latest open request for the same prompt within the
    window, or (implicit_request) a session opened from the reply itself."""
    r = self.re["reply"].search(content) if self.re["reply"] else None
    if not r:
      return None
    prompt, user = _norm(r.group("prompt")), self._reply_user(r, msg)
    for req in reversed(self._open_requests.get(user, ())):
      if req.prompt == prompt and 0 <= (ts - req.ts).total_seconds() <= self._window:
        return req
    if self.g["implicit_request"] and user:
      req = _Request(None, user, prompt, ts, msg["timestamp"], self.g["default_count"])
      return req
    return None

  def _find_session(self, r, msg) -> _Session | None:
    prompt, user = _norm(r.group("prompt")), self._reply_user(r, msg)
    ts = _when(msg.get("timestamp"))
    for s in reversed(self._user_sessions.get(user, ())):
      if s.request.prompt == prompt and 0 <= (ts - s.ts).total_seconds() <= self._window:
        return s
    return None

  def _candidates(self, atts, n: int, folder: Path) -> list[_Candidate]:
    loaded = [(a, _load(a, folder)) for a in atts]  # _Skip (missing_media / unsafe_path) excludes the session
    out = []
    try:
      if len(loaded) == 1 and n >= 2:
        im = _decode(loaded[0][1])
        layout = _layout(self.g, n, *im.size)
        if layout is None:
          raise _Skip("too_few_candidates", f"no grid layout for {n} images")
        rows, cols = layout
        tw, th = im.size[0] // cols, im.size[1] // rows
        for i in range(n):
          r, c = divmod(i, cols)
          tile = im.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
          out.append(self._store(_png(tile), ".png", tile))
      else:
        for a, data in loaded:
          ext = Path(str(a.get("fileName") or a.get("url") or "")).suffix.lower() or ".png"
          out.append(self._store(data, ext, _decode(data)))
    except _Skip:
      raise
    except Exception as e:  # noqa: BLE001  (any decoder failure: the reply is unusable)
      raise _Skip("corrupt_image", f"an attachment does not decode ({type(e).__name__})") from None
    return out

  def _store(self, data: bytes, ext: str, im: Image.Image) -> _Candidate:
    sha = hashlib.sha256(data).hexdigest()
    rel = f"images/{sha[:2]}/{sha}{ext}"
    target = self.out / rel
    if not target.exists():
      with files.atomic_write(target, "wb") as f:
        f.write(data)
      self._written.add(rel)
    return _Candidate(sha, dhash(im, self.g["hash_size"]), rel)

  def _select(self, session: _Session, k: int, selection_id) -> None:
    if session.selected:
      self._count("repeat_selection")
      return
    session.selected = True
    req = session.request
    if self.max_per_user and self._per_user[req.user] >= self.max_per_user:
      self._count("user_cap")
      return
    key = (req.prompt, tuple(c.sha for c in session.candidates), k)
    if key in self._record_keys:
      self._count("duplicate_record")
      return
    self._record_keys.add(key)
    self._per_user[req.user] += 1
    rec = {
      "id": f"discord-{session.reply_id}",
      "prompt": req.prompt,
      "images": [c.path for c in session.candidates],
      "chosen": k,
      "user": req.user,
      "timestamp": req.stamp,
      "source_message_ids": [i for i in (req.id, session.reply_id, selection_id) if i is not None],
    }
    if session.seeds:
      rec["seeds"] = session.seeds
    self.records.append(rec)

  # -- writing ------------------------------------------------------------------------------------------------
  def abort(self) -> None:
    """Removes the images this collector wrote (after an unreadable export: no partial output is left)."""
    for rel in self._written:
      self._remove(rel)
    self._written.clear()

  def _remove(self, rel: str) -> None:
    (self.out / rel).unlink(missing_ok=True)
    try:
      (self.out / rel).parent.rmdir()
    except OSError:
      pass

  def finish(self) -> dict:
    """Counts the sessions left open, writes ``preference.jsonl`` and ``report.json``, removes the images no
    record uses; -> the report."""
    for s in self._sessions.values():
      if not s.selected:
        self._count("no_selection")
    for reqs in self._open_requests.values():
      for r in reqs:
        self._count(r.excluded or "no_reply")
    used = {p for r in self.records for p in r["images"]}
    for rel in self._written - used:
      self._remove(rel)
    self.out.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(self.out / "preference.jsonl") as f:
      for r in self.records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    report = {
      "messages": self.messages,
      "records": len(self.records),
      "images": len(used),
      "excluded": dict(sorted(self.excluded.items())),
      "skipped": [{"what": w, "why": y} for w, y in self.skips.items],
    }
    files.write_text(self.out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _images(msg) -> list[dict]:
  atts = msg.get("attachments") or []
  if not isinstance(atts, list):
    raise _Skip("bad_message", "attachments is not a list")
  return [
    a
    for a in atts
    if isinstance(a, dict) and Path(str(a.get("fileName") or a.get("url") or "")).suffix.lower() in IMAGE_EXTENSIONS
  ]


def _load(att: dict, folder: Path) -> bytes:
  """An attachment's bytes from the export's media folder; _Skip(missing_media | unsafe_path)."""
  url = str(att.get("url") or "")
  if not url or re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I):
    raise _Skip("missing_media", f"not a local file: {url:.80}")
  for candidate in dict.fromkeys((url, unquote(url))):
    p = Path(candidate)
    resolved = (p if p.is_absolute() else folder / p).resolve()
    if not resolved.is_relative_to(folder):
      raise _Skip("unsafe_path", f"{url:.80} resolves outside the export's folder")
    if resolved.is_file():
      try:
        return resolved.read_bytes()
      except OSError:
        break
  raise _Skip("missing_media", f"{url:.80} is missing")
