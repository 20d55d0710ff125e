"""The votes of a running study, in a SQL database (SQLAlchemy 2): SQLite by default (`sqlite:///study.sqlite`),
PostgreSQL (`postgresql+psycopg://...`) or any database SQLAlchemy has a driver for, with the same code.

Tables:

* `meta`: key / value; `study_sha256` ties the database to one study file (a database holds the votes of one study).
* `participants`: the anonymous participant code (random unless given), when they joined, their user agent and
  whether they accepted the consent text.
* `assignments`: what each participant is shown, fixed when they join: position k (1..N), the pair, the image on
  the left and on the right (and those images' systems; a broken check image has the system `"broken"`), whether it
  is an attention check and its expected answer in left / right terms, and when the pair was first shown. The test
  pairs (`pairs_per_participant` of them), every check, their order and their sides are drawn from a
  `random.Random` seeded with the study seed and the participant code: the same participant always gets the same
  assignment.
* `votes`: one per (participant, pair) (UNIQUE): the choice (left / right / tie), the system chosen (None for a
  tie), the response time, when and from which user agent. The first vote for a pair wins: a replay or a double
  submit returns the stored vote and writes nothing.

Response time: `response_ms` is what the client measured (the page's script: from the pair being displayed to the
click), or, when the client sent none, the server's time from first serving the pair to receiving the vote;
`server_ms` is always the server's measure.

SQLite is opened in WAL mode with a busy timeout, and this process serializes its write transactions (a lock), so
concurrent requests never fail with "database is locked". Every write commits before the function returns.
"""

from __future__ import annotations

import datetime
import hashlib
import random
import re
import secrets
import threading
from dataclasses import dataclass

from sqlalchemy import (
  Boolean,
  ForeignKey,
  Integer,
  String,
  Text,
  UniqueConstraint,
  create_engine,
  event,
  func,
  select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hps_jax.errors import InputError
from hps_jax.study.create import Study

CHOICES = ("left", "right", "tie")
BROKEN = "broken"  # the system name of a broken check image in the votes
CODE = re.compile(r"[A-Za-z0-9_-]{4,64}")
MAX_USER_AGENT = 512
MAX_RESPONSE_MS = 24 * 3600 * 1000


class StoreError(InputError):
  """A request the store refuses; `status` is the HTTP status the web app answers with."""

  status = 400


class UnknownParticipant(StoreError):
  status = 404


class NotAssigned(StoreError):
  """A vote on a pair the participant was not assigned, or not the pair they are at."""

  status = 409


class BadVote(StoreError):
  status = 400


class Base(DeclarativeBase):
  pass


class Meta(Base):
  __tablename__ = "meta"
  key: Mapped[str] = mapped_column(String(64), primary_key=True)
  value: Mapped[str] = mapped_column(Text)


class Participant(Base):
  __tablename__ = "participants"
  id: Mapped[int] = mapped_column(Integer, primary_key=True)
  code: Mapped[str] = mapped_column(String(64), unique=True)
  created: Mapped[str] = mapped_column(String(40))
  user_agent: Mapped[str | None] = mapped_column(String(MAX_USER_AGENT))
  consent: Mapped[bool] = mapped_column(Boolean, default=False)


class Assignment(Base):
  __tablename__ = "assignments"
  __table_args__ = (UniqueConstraint("participant_id", "k"), UniqueConstraint("participant_id", "pair_id"))
  id: Mapped[int] = mapped_column(Integer, primary_key=True)
  participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
  k: Mapped[int] = mapped_column(Integer)
  pair_id: Mapped[str] = mapped_column(String(128))
  image_left: Mapped[str] = mapped_column(String(1024))
  image_right: Mapped[str] = mapped_column(String(1024))
  system_left: Mapped[str] = mapped_column(String(64))
  system_right: Mapped[str] = mapped_column(String(64))
  is_check: Mapped[bool] = mapped_column(Boolean, default=False)
  expected: Mapped[str | None] = mapped_column(String(8))
  prompt: Mapped[str | None] = mapped_column(Text)
  shown_at: Mapped[str | None] = mapped_column(String(40))


class VoteRow(Base):
  __tablename__ = "votes"
  __table_args__ = (UniqueConstraint("participant_id", "pair_id"),)
  id: Mapped[int] = mapped_column(Integer, primary_key=True)
  participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
  pair_id: Mapped[str] = mapped_column(String(128))
  choice: Mapped[str] = mapped_column(String(8))
  chosen_system: Mapped[str | None] = mapped_column(String(64))
  response_ms: Mapped[int | None] = mapped_column(Integer)
  server_ms: Mapped[int | None] = mapped_column(Integer)
  created: Mapped[str] = mapped_column(String(40))
  user_agent: Mapped[str | None] = mapped_column(String(MAX_USER_AGENT))


def now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def _iso(t: datetime.datetime) -> str:
  return t.isoformat(timespec="milliseconds")


def _ua(user_agent: str | None) -> str | None:
  return None if user_agent is None else str(user_agent)[:MAX_USER_AGENT]


def study_fingerprint(study: Study) -> str:
  """The sha256 of the study's content (its JSON re-serialized canonically): the database's study."""
  import json

  return hashlib.sha256(json.dumps(study.data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def sqlite_url(path) -> str:
  return f"sqlite:///{path}"


@dataclass(frozen=True)
class Next:
  """The pair a participant is at (k of total), or done."""

  k: int
  total: int
  pair_id: str | None = None
  prompt: str | None = None
  image_left: str | None = None
  image_right: str | None = None

  @property
  def done(self) -> bool:
    return self.pair_id is None


@dataclass(frozen=True)
class Recorded:
  """The outcome of `record_vote`: the stored vote's choice and system, and whether this call wrote it."""

  pair_id: str
  choice: str
  chosen_system: str | None
  duplicate: bool


class Store:
  """The study database (see the module docstring); `study` is needed to join participants, not to export."""

  def __init__(self, engine, study: Study | None = None):
    self.engine = engine
    self.study = study
    self.sessions = sessionmaker(engine, expire_on_commit=False)
    self._write = threading.Lock()

  def close(self) -> None:
    self.engine.dispose()

  # ---------------------------------------------------------------- participants and assignments
  def _participant(self, s: Session, code) -> Participant:
    if not isinstance(code, str) or not CODE.fullmatch(code):
      raise UnknownParticipant(f"unknown participant {str(code)[:80]!r}")
    p = s.scalar(select(Participant).where(Participant.code == code))
    if p is None:
      raise UnknownParticipant(f"unknown participant {code!r}")
    return p

  def _assignments(self, participant_code: str) -> list[dict]:
    """The participant's pairs in order, with sides: drawn from the study seed and the code."""
    study = self.study
    rng = random.Random(f"{study.settings['seed']}\x00{participant_code}")
    tests = rng.sample(study.test_pairs, study.settings["pairs_per_participant"])
    pairs = tests + study.check_pairs
    rng.shuffle(pairs)
    out = []
    for k, pair in enumerate(pairs, 1):
      first, second = pair["images"]
      left, right = (second, first) if rng.random() < 0.5 else (first, second)
      is_check = pair["kind"] == "check"
      expected = None
      if is_check:
        if pair["check"] == "identical":
          expected = "tie"
        else:
          intact = pair.get("expected_image", first)
          expected = "left" if left == intact else "right"
      out.append(
        {
          "k": k,
          "pair_id": pair["id"],
          "image_left": left,
          "image_right": right,
          "system_left": study.images[left]["system"] or BROKEN,
          "system_right": study.images[right]["system"] or BROKEN,
          "is_check": is_check,
          "expected": expected,
          "prompt": pair.get("prompt"),
        }
      )
    return out

  def join(self, code: str | None = None, *, user_agent: str | None = None, consent: bool = False) -> str:
    """A new participant with `code` (a random one when None) and their assignment; -> the code. Joining with the
    code of an existing participant returns it unchanged (they resume where they were)."""
    if self.study is None:
      raise InputError("joining a participant needs the study")
    if code is not None and (not isinstance(code, str) or not CODE.fullmatch(code)):
      raise BadVote("a participant code is 4 to 64 letters, digits, _ or -")
    with self._write, self.sessions() as s:
      if code is not None and s.scalar(select(Participant.id).where(Participant.code == code)) is not None:
        return code
      for _ in range(5):
        c = code or secrets.token_hex(6)
        p = Participant(code=c, created=_iso(now()), user_agent=_ua(user_agent), consent=bool(consent))
        s.add(p)
        try:
          s.flush()
        except IntegrityError:  # the code was taken meanwhile (another process)
          s.rollback()
          if code is not None:
            return code
          continue
        s.add_all(Assignment(participant_id=p.id, **a) for a in self._assignments(c))
        s.commit()
        return c
    raise InputError("could not draw a free participant code")  # pragma: no cover

  def next_assignment(self, code: str) -> Next:
    """The first pair the participant has not voted on (its first showing is recorded), or done."""
    with self._write, self.sessions() as s:
      p = self._participant(s, code)
      total = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.participant_id == p.id))
      voted = select(VoteRow.pair_id).where(VoteRow.participant_id == p.id)
      a = s.scalar(
        select(Assignment)
        .where(Assignment.participant_id == p.id, Assignment.pair_id.not_in(voted))
        .order_by(Assignment.k)
        .limit(1)
      )
      if a is None:
        return Next(k=total, total=total)
      if a.shown_at is None:
        a.shown_at = _iso(now())
        s.commit()
      return Next(a.k, total, a.pair_id, a.prompt, a.image_left, a.image_right)

  def record_vote(
    self, code: str, pair_id, choice, response_ms=None, user_agent: str | None = None, *, allow_tie: bool | None = None
  ) -> Recorded:
    """Stores the participant's vote on `pair_id`, which must be the pair they are at (`next_assignment`); a vote
    they already cast is returned as it was stored (`duplicate`), nothing written. Raises UnknownParticipant,
    NotAssigned (a pair not theirs, or not the current one) or BadVote (a choice that is not left / right / tie, a
    tie where the study does not allow one, a bad response time)."""
    if allow_tie is None:
      allow_tie = bool(self.study.settings["allow_tie"]) if self.study is not None else True
    if not isinstance(pair_id, str) or not pair_id or len(pair_id) > 128:
      raise BadVote("pair_id: expected a pair id string")
    if choice not in CHOICES or (choice == "tie" and not allow_tie):
      allowed = CHOICES if allow_tie else CHOICES[:2]
      raise BadVote(f"choice: expected one of {', '.join(allowed)}, got {str(choice)[:40]!r}")
    if response_ms is not None and (
      isinstance(response_ms, bool) or not isinstance(response_ms, int) or not 0 <= response_ms <= MAX_RESPONSE_MS
    ):
      raise BadVote(f"response_ms: expected an integer number of milliseconds in [0, {MAX_RESPONSE_MS}]")
    with self._write, self.sessions() as s:
      p = self._participant(s, code)
      old = s.scalar(select(VoteRow).where(VoteRow.participant_id == p.id, VoteRow.pair_id == pair_id))
      if old is not None:
        return Recorded(pair_id, old.choice, old.chosen_system, duplicate=True)
      a = s.scalar(select(Assignment).where(Assignment.participant_id == p.id, Assignment.pair_id == pair_id))
      if a is None:
        raise NotAssigned(f"pair {pair_id[:128]!r} is not assigned to participant {code!r}")
      voted = select(VoteRow.pair_id).where(VoteRow.participant_id == p.id)
      current = s.scalar(
        select(func.min(Assignment.k)).where(Assignment.participant_id == p.id, Assignment.pair_id.not_in(voted))
      )
      if a.k != current:
        # the same vote stored meanwhile by another process (a double submit raced across two servers): the current
        # pair moved past it, and it is a duplicate, not a pair out of turn
        old = s.scalar(select(VoteRow).where(VoteRow.participant_id == p.id, VoteRow.pair_id == pair_id))
        if old is not None:
          return Recorded(pair_id, old.choice, old.chosen_system, duplicate=True)
        raise NotAssigned(f"pair {pair_id!r} is not the current pair of participant {code!r} (that is {current})")
      t = now()
      shown = datetime.datetime.fromisoformat(a.shown_at) if a.shown_at else None
      server_ms = max(0, int((t - shown).total_seconds() * 1000)) if shown else None
      chosen = {"left": a.system_left, "right": a.system_right}.get(choice)
      row = VoteRow(
        participant_id=p.id,
        pair_id=pair_id,
        choice=choice,
        chosen_system=chosen,
        response_ms=response_ms if response_ms is not None else server_ms,
        server_ms=server_ms,
        created=_iso(t),
        user_agent=_ua(user_agent),
      )
      s.add(row)
      try:
        s.commit()
      except IntegrityError:  # the same vote from another process won the race: it is the stored one
        s.rollback()
        old = s.scalar(select(VoteRow).where(VoteRow.participant_id == p.id, VoteRow.pair_id == pair_id))
        return Recorded(pair_id, old.choice, old.chosen_system, duplicate=True)
      return Recorded(pair_id, choice, chosen, duplicate=False)

  # ---------------------------------------------------------------- reading
  def progress(self, code: str) -> tuple[int, int]:
    """(pairs voted, pairs assigned) of a participant."""
    with self.sessions() as s:
      p = self._participant(s, code)
      done = s.scalar(select(func.count()).select_from(VoteRow).where(VoteRow.participant_id == p.id))
      total = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.participant_id == p.id))
      return done, total

  def counts(self) -> dict:
    """{participants, finished, votes, per_participant: [{participant, created, done, total}]}."""
    with self.sessions() as s:
      voted = dict(s.execute(select(VoteRow.participant_id, func.count()).group_by(VoteRow.participant_id)).all())
      assigned = dict(
        s.execute(select(Assignment.participant_id, func.count()).group_by(Assignment.participant_id)).all()
      )
      rows = []
      for p in s.scalars(select(Participant).order_by(Participant.id)):
        rows.append(
          {"participant": p.code, "created": p.created, "done": voted.get(p.id, 0), "total": assigned.get(p.id, 0)}
        )
    return {
      "participants": len(rows),
      "finished": sum(1 for r in rows if r["total"] and r["done"] == r["total"]),
      "votes": sum(r["done"] for r in rows),
      "per_participant": rows,
    }

  def export_votes(self) -> list[dict]:
    """Every vote as a dict with the fields of `hps_jax.study.analysis.Vote` (participant, pair_id, system_left,
    system_right, image_left, image_right, choice, is_check, expected: left / right / tie for a check, None
    otherwise) plus response_ms, created and user_agent; in the order they were cast."""
    q = (
      select(VoteRow, Assignment, Participant.code)
      .join(Participant, Participant.id == VoteRow.participant_id)
      .join(Assignment, (Assignment.participant_id == VoteRow.participant_id) & (Assignment.pair_id == VoteRow.pair_id))
      .order_by(VoteRow.id)
    )
    with self.sessions() as s:
      return [
        {
          "participant": code,
          "pair_id": v.pair_id,
          "system_left": a.system_left,
          "system_right": a.system_right,
          "image_left": a.image_left,
          "image_right": a.image_right,
          "choice": v.choice,
          "is_check": bool(a.is_check),
          "expected": a.expected,
          "response_ms": v.response_ms,
          "created": v.created,
          "user_agent": v.user_agent,
        }
        for v, a, code in s.execute(q).all()
      ]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
  cur = dbapi_connection.cursor()
  cur.execute("PRAGMA journal_mode=WAL")
  cur.execute("PRAGMA busy_timeout=10000")
  cur.execute("PRAGMA foreign_keys=ON")
  cur.execute("PRAGMA synchronous=NORMAL")
  cur.close()


def open_store(url: str, study: Study | None = None, *, create: bool = True) -> Store:
  """The study database at `url` (an SQLAlchemy URL). With `create`, missing tables are created and the database
  is tied to `study` (a database of another study is an InputError); without it (export), the tables must exist.
  A bad URL, a missing driver or an unreachable database is an InputError naming the URL (password hidden)."""
  try:
    parsed = make_url(url)
  except ArgumentError as e:
    raise InputError(f"database URL {url!r}: not a database URL ({e})") from None
  shown = parsed.render_as_string(hide_password=True)
  sqlite = parsed.get_backend_name() == "sqlite"
  if sqlite and (parsed.database in (None, "", ":memory:")):
    raise InputError(f"database {shown}: give a file (sqlite:///PATH); an in-memory database would lose the votes")
  if sqlite and not create:
    from pathlib import Path

    if not Path(parsed.database).is_file():
      raise InputError(f"database {parsed.database}: no such file")
  try:
    engine = create_engine(parsed, pool_pre_ping=not sqlite)
  except (NoSuchModuleError, ImportError, ArgumentError) as e:
    raise InputError(f"database {shown}: no driver for it ({e}); install one (e.g. psycopg for PostgreSQL)") from None
  if sqlite:
    event.listen(engine, "connect", _sqlite_pragmas)
  store = Store(engine, study)
  try:
    if create:
      Base.metadata.create_all(engine)
      if study is not None:
        _tie_to_study(store, study)
    else:
      with engine.connect() as c:
        missing = {"participants", "assignments", "votes"} - set(engine.dialect.get_table_names(c))
      if missing:
        raise InputError(f"database {shown}: not a study database (no table {', '.join(sorted(missing))})")
  except OperationalError as e:
    engine.dispose()
    raise InputError(f"database {shown}: cannot open it ({str(e.orig).strip().splitlines()[0]})") from None
  except BaseException:
    engine.dispose()
    raise
  return store


def _tie_to_study(store: Store, study: Study) -> None:
  fp = study_fingerprint(study)
  with store._write, store.sessions() as s:
    row = s.get(Meta, "study_sha256")
    if row is None:
      s.add(Meta(key="study_sha256", value=fp))
      s.add(Meta(key="study_path", value=str(study.path)))
      s.commit()
    elif row.value != fp:
      path = s.get(Meta, "study_path")
      raise InputError(
        f"the database holds the votes of another study ({path.value if path else 'unknown file'}): give another "
        "--db for this study"
      )
