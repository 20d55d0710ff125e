"""Fixtures of the study tests: a throwaway PostgreSQL server (`postgres_url`, one per test session / xdist worker)
and `db_url`, a test's database parametrized over SQLite (a file in tmp_path) and that PostgreSQL server (a fresh
database per test). PostgreSQL needs its server binaries (`apt-get install postgresql`: /usr/lib/postgresql/*/bin)
and the psycopg driver (`pip install "psycopg[binary]"`, in the `test` extra); without them, or when the server does
not start, the PostgreSQL parametrizations skip with the reason."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pg_bin() -> Path | None:
  """The newest PostgreSQL server binaries directory (Debian layout, or initdb on the PATH)."""
  found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
  if found:
    return Path(found[-1]).parent
  initdb = shutil.which("initdb")
  return Path(initdb).parent if initdb else None


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
  """`cmd` run as `owner` (PostgreSQL refuses to run as root), or as is."""
  if owner is None:
    return cmd
  if shutil.which("runuser"):
    return ["runuser", "-u", owner, "--", *cmd]
  import shlex

  return ["su", owner, "-s", "/bin/sh", "-c", shlex.join(cmd)]


def _run(cmd: list[str], timeout: float = 60) -> None:
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  if r.returncode != 0:
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"{' '.join(cmd[-3:])!s}: exit {r.returncode}: {' | '.join(tail)}")


@pytest.fixture(scope="session")
def postgres_url():
  """`postgresql+psycopg://postgres@127.0.0.1:PORT/study`: a PostgreSQL cluster of its own in a temporary
  directory (trust authentication, loopback only, its socket in that directory), stopped and removed at the end."""
  pytest.importorskip("psycopg", reason="PostgreSQL needs the psycopg driver: pip install 'psycopg[binary]'")
  pg_bin = _pg_bin()
  if pg_bin is None:
    pytest.skip("no PostgreSQL server binaries (initdb): apt-get install postgresql")
  owner = None
  if os.geteuid() == 0:
    import pwd

    try:
      pwd.getpwnam("postgres")
    except KeyError:
      pytest.skip("running as root and there is no user postgres to run the PostgreSQL server as")
    owner = "postgres"
  root = Path(tempfile.mkdtemp(prefix="hps-pg-"))
  data, log = root / "data", root / "server.log"
  if owner is not None:
    shutil.chown(root, owner)
  os.chmod(root, 0o755)
  port = free_port()
  started = False
  try:
    _run(_as_owner([str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"], owner))
    opts = f"-k {root} -p {port} -h 127.0.0.1 -c fsync=off -c full_page_writes=off"
    _run(_as_owner([str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
                   owner))  # fmt: skip
    started = True
    _run([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "study"])
  except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
    if started:
      subprocess.run(_as_owner([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], owner),
                     capture_output=True, timeout=60)  # fmt: skip
    server_log = log.read_text(errors="replace").strip().splitlines()[-2:] if log.exists() else []
    shutil.rmtree(root, ignore_errors=True)
    pytest.skip(f"the PostgreSQL server did not start: {e} {' | '.join(server_log)}".strip())
  try:
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/study"
  finally:
    subprocess.run(_as_owner([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], owner),
                   capture_output=True, timeout=60)  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


_databases = itertools.count()


def _fresh_postgres_database(url: str) -> str:
  """A new empty database on the server of `url` (each test gets its own); -> its URL."""
  import psycopg
  from sqlalchemy.engine import make_url

  u = make_url(url)
  name = f"t{os.getpid()}_{next(_databases)}_{int(time.time() * 1000) % 10**8}"
  with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True) as c:
    c.execute(f'CREATE DATABASE "{name}"')
  return u.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
  """An SQLAlchemy URL of an empty database: an SQLite file in tmp_path, or a fresh database on `postgres_url`."""
  if request.param == "sqlite":
    return f"sqlite:///{tmp_path / 'votes.sqlite'}"
  return _fresh_postgres_database(request.getfixturevalue("postgres_url"))
