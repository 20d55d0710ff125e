"""`hps-jax study`: human A/B preference studies (the paper's user study, Fig. 8 / Table 3). `study create` builds a
study file from two or more systems' images; the file's format and the alignment rules are documented in
`hps_jax.study.create`. Each action registers itself under `study` with `add_<action>(actions)` (`serve` and
`report` are added the same way). `serve` and `export` import Flask / SQLAlchemy / waitress (the `study` extra) only
when they run."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from pathlib import Path

from hps_jax import files
from hps_jax.cli.common import (
  LIMIT,
  SEED,
  UsageError,
  add_parser,
  add_paths_arg,
  check_output,
  named_specs,
  progress,
  report_skips,
  say_wrote,
)
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError, Interrupted, pending_stop
from hps_jax.study.create import (
  CHECKS_DIR,
  DEFAULT_INSTRUCTIONS,
  DEFAULT_TITLE,
  FOLDER_MANIFESTS,
  MAX_TEXT_CHARS,
  Options,
  ab_sources,
  build_study,
  check_kinds,
  check_name,
  load_study,
  system_source,
  verify_images,
  write_study,
)

STUDY_EXTRA = "pip install 'hps_jax[study]'"


def add_study(sub):
  p = add_parser(
    sub,
    "study",
    help="human A/B preference studies: create, serve (web app), export the votes, report",
    description="A human A/B preference study, as in the paper's user study (base vs HPS-adapted Stable Diffusion): "
    "`study create` pairs the images of two or more systems by prompt (and seed) into a study file that a study "
    "server shows to participants, one pair at a time, sides randomized.",
  )
  actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions", required=True)
  add_create(actions)
  add_report(actions)
  add_serve(actions)
  add_export(actions)


def add_create(actions):
  c = add_parser(
    actions,
    "create",
    help="a study file (JSON) from `sample --ab` output or two or more systems' image folders / manifests",
    description="Writes STUDY.json (format hps-jax-study/1, described in hps_jax.study.create): every image with its "
    "sha256 and size (each is fully decoded first), the test pairs (two systems' images of one prompt, in system-name "
    "order: sides are randomized per participant when served), the attention checks with their expected answers, "
    "and the settings. Sources: --ab OUTDIR pairs OUTDIR/base and OUTDIR/adapted by prompt and seed; --system "
    "NAME=PATH (two or more) takes an image folder (matched by file name across systems), a folder with "
    "samples.jsonl / metadata.jsonl, or a JSONL manifest of {image, prompt[, seed]} rows (matched by prompt: equal "
    "seeds first, the rest drawn with --seed, each image in at most one pair per pair of systems). With 3+ systems "
    "every pair of systems is compared on each prompt (--pairs-per-prompt caps that). Exit 1 when some images or "
    "prompts could not be paired (each named in the summary; the study holds the rest), 2 when nothing can be.",
  )
  src = c.add_argument_group("images (--ab, or two or more --system)")
  src.add_argument("--ab", metavar="OUTDIR", help="the --outdir of `hps-jax sample --ab` (base/ and adapted/)")
  src.add_argument(
    "--names",
    nargs=2,
    metavar=("BASE", "ADAPTED"),
    help="with --ab: the names of the two systems (base and adapted unless given)",
  )
  src.add_argument(
    "--system",
    action="append",
    metavar="NAME=PATH",
    help="a system's images: an image folder, a folder with samples.jsonl / metadata.jsonl, or a JSONL manifest of "
    "{image, prompt} rows; repeat for each system. NAME: letters, digits, _ . + - (not 'tie')",
  )
  add_paths_arg(src)
  c.add_argument("--out", required=True, metavar="STUDY.json", help="the study file (check images go next to it)")
  c.add_argument("--overwrite", action="store_true", help="replace an existing study file and its check images")
  c.add_argument(
    "--pairs-per-participant",
    type=LIMIT,
    default=0,
    metavar="N",
    help="test pairs each participant answers, drawn at random per participant when served (0: all test pairs)",
  )
  c.add_argument(
    "--pairs-per-prompt",
    type=LIMIT,
    default=0,
    metavar="N",
    help="at most N test pairs per prompt, drawn with --seed in turn over the pairs of systems (0: every pair that "
    "can be formed: all pairs of systems, every image once per pair of systems)",
  )
  answer = c.add_mutually_exclusive_group()
  answer.add_argument(
    "--forced-choice",
    dest="allow_tie",
    action="store_false",
    help="participants must pick one image of each pair (the default)",
  )
  answer.add_argument(
    "--allow-tie", dest="allow_tie", action="store_true", help='participants may also answer "can\'t decide"'
  )
  c.set_defaults(allow_tie=False)
  c.add_argument(
    "--checks",
    type=LIMIT,
    default=0,
    metavar="N",
    help="N attention checks shown to every participant besides the test pairs: the same image twice (expected "
    "answer: tie; needs --allow-tie), or with --broken-checks an image next to a heavily blurred and noised copy "
    "(expected: the intact image's system)",
  )
  c.add_argument(
    "--broken-checks",
    action="store_true",
    help="make the checks broken-image checks (with --allow-tie: identical and broken checks alternate); the broken "
    f"copies are written to {CHECKS_DIR}/ next to the study file",
  )
  c.add_argument("--seed", type=SEED, default=0, help="seeds the pairing of multi-image prompts and the checks")
  c.add_argument("--title", default=DEFAULT_TITLE, help="the study's title, shown to participants")
  c.add_argument("--instructions", default=DEFAULT_INSTRUCTIONS, help="shown to participants before the first pair")
  c.add_argument("--consent", metavar="FILE", help="a UTF-8 text file: the consent text participants must accept")
  c.set_defaults(run=run_create)


def _named_specs(specs: list[str] | None, flag: str, value: str) -> list[tuple[str, str]]:
  """`flag NAME=VALUE` options -> [(name, value)]: a valid study name (`check_name`), each name once."""

  def study_name(name: str) -> None:
    try:
      check_name(name, f"{flag} name")
    except InputError as e:
      raise UsageError(str(e)) from None

  return named_specs(specs, flag, value, check=study_name)


def _system_specs(specs: list[str]) -> list[tuple[str, str]]:
  """--system NAME=PATH: also distinct, existing image sources."""
  out = _named_specs(specs, "--system", "PATH")
  seen_paths: dict[str, str] = {}
  for name, path in out:
    real = os.path.realpath(path)
    if real in seen_paths:
      raise UsageError(f"--system {name}={path}: the same images as --system {seen_paths[real]}")
    if not os.path.exists(path):
      raise UsageError(f"--system {name}={path}: no such file or folder")
    seen_paths[real] = name
  return out


def _read_consent(path: str | None) -> str | None:
  if path is None:
    return None
  p = Path(path)
  try:
    if p.stat().st_size > 4 * MAX_TEXT_CHARS:
      raise UsageError(f"--consent {path}: larger than a consent text may be ({MAX_TEXT_CHARS} characters)")
    text = p.read_bytes().decode("utf-8-sig")
  except OSError as e:
    raise UsageError(f"--consent {path}: cannot read it ({e.strerror or e})") from e
  except UnicodeDecodeError as e:
    raise UsageError(f"--consent {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
  text = text.strip()
  if not text or len(text) > MAX_TEXT_CHARS or "\x00" in text:
    raise UsageError(f"--consent {path}: expected a non-empty text of at most {MAX_TEXT_CHARS} characters")
  return text


def _inputs(args, systems: list[tuple[str, str]]) -> list[str]:
  """The files the command reads that --out must not replace."""
  found = [args.consent]
  if args.ab:
    found += [os.path.join(args.ab, sub, "samples.jsonl") for sub in ("base", "adapted")]
  for _, path in systems:
    found += [path] if os.path.isfile(path) else [os.path.join(path, m) for m in FOLDER_MANIFESTS]
  return found


def run_create(args) -> int:
  if bool(args.ab) == bool(args.system):
    raise UsageError("give the images: --ab OUTDIR, or two or more --system NAME=PATH")
  if args.names and not args.ab:
    raise UsageError("--names names the two systems of --ab; --system gives each name with its images")
  systems = _system_specs(args.system or [])
  if args.system and len(systems) < 2:
    raise UsageError(f"a study compares two or more systems: got one (--system {args.system[0]})")
  names = tuple(args.names or ("base", "adapted"))
  try:
    for name in names:
      check_name(name, "--names")
  except InputError as e:
    raise UsageError(str(e)) from None
  if names[0] == names[1]:
    raise UsageError(f"--names: the two systems need different names, got {names[0]} twice")
  check_output(args.out, overwrite=args.overwrite, inputs=_inputs(args, systems), flag="--out", formats=(".json",))
  if args.broken_checks and not args.checks:
    raise UsageError("--broken-checks sets the kind of the attention checks: give their number with --checks N")
  try:
    kinds = check_kinds(args.checks, allow_tie=args.allow_tie, broken=args.broken_checks)
  except InputError as e:
    raise UsageError(str(e)) from None
  out = Path(args.out)
  for i in range(1, kinds.count("broken") + 1):
    check_file = out.parent / CHECKS_DIR / f"broken-{i:03d}.png"
    if check_file.exists() and not args.overwrite:
      raise UsageError(f"{check_file} exists (a check image of an earlier study): pass --overwrite to replace it")
  options = Options(
    pairs_per_participant=args.pairs_per_participant,
    pairs_per_prompt=args.pairs_per_prompt,
    allow_tie=args.allow_tie,
    checks=args.checks,
    broken_checks=args.broken_checks,
    seed=args.seed,
    title=args.title,
    instructions=args.instructions,
    consent=_read_consent(args.consent),
  )

  skips = Skips()
  allow = args.allow_outside_paths
  if args.ab:
    sources = ab_sources(args.ab, names, skips=skips, allow_outside=allow)
  else:
    exclude = str(out.parent / CHECKS_DIR)
    sources = [system_source(n, p, skips=skips, allow_outside=allow, exclude=exclude) for n, p in systems]
  with progress(sum(len(s.entries) for s in sources), "checking images") as bar:
    study, check_files = build_study(sources, out, options, skips, bar.update)
  write_study(out, study, check_files)

  s, counts = study["settings"], study["counts"]
  answer = "ties allowed" if s["allow_tie"] else "forced choice"
  print(
    f"study: {len(study['systems'])} systems ({', '.join(study['systems'])}), {len(study['images'])} images, "
    f"{counts['test_pairs']} test pairs, {counts['checks']} checks; each participant answers "
    f"{s['pairs_per_participant']} test pairs and every check ({answer})",
    file=sys.stderr,
  )
  if counts["left_out_by_pairs_per_prompt"]:
    print(f"  {counts['left_out_by_pairs_per_prompt']} pairs left out by --pairs-per-prompt", file=sys.stderr)
  say_wrote(out, f"the study ({counts['test_pairs']} test pairs, {counts['checks']} checks)")
  return report_skips(skips, counts["test_pairs"], noun="test pairs")


# ------------------------------------------------------------------------------------------------------------
# serve / export
# ------------------------------------------------------------------------------------------------------------
def _add_db(p, *, default: str | None) -> None:
  g = p.add_mutually_exclusive_group()
  g.add_argument(
    "--db",
    default=default,
    metavar="PATH",
    help="the SQLite database of the votes (created when missing; WAL mode)",
  )
  g.add_argument(
    "--db-url",
    metavar="URL",
    help="an SQLAlchemy database URL instead of --db, e.g. postgresql+psycopg://user@host/study (needs the driver)",
  )


def add_serve(actions):
  s = add_parser(
    actions,
    "serve",
    help="run the study: participants vote in their browser, one pair at a time, sides randomized",
    description="Serves STUDY.json to participants under waitress: a join page (with the consent text, if any), "
    "one pair per page (keys Left / Right, Down for a tie when allowed), a thank-you page; the votes go to the "
    "database (--db or --db-url), each committed before the next page. Every image is checked against its sha256 "
    "first (a changed or missing image is exit 2 naming it). Admin pages (/admin, /admin/export.jsonl) need the admin "
    "token. A JSON API (/api/join, /api/next, /api/vote) serves scripted participants. Stop with SIGINT / SIGTERM "
    "(exit 130 / 143; requests in flight finish first).",
  )
  s.add_argument("study", metavar="STUDY", help="the study file (`hps-jax study create`)")
  _add_db(s, default="study.sqlite")
  s.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
  s.add_argument("--port", type=_port, default=8000, help="the port to listen on (0: any free port)")
  s.add_argument("--threads", type=_threads, default=8, help="waitress worker threads")
  s.add_argument(
    "--admin-token",
    metavar="TOKEN",
    help="the token of the admin pages (?token=TOKEN); a random one is printed when not given",
  )
  s.set_defaults(run=run_serve)


def add_export(actions):
  e = add_parser(
    actions,
    "export",
    help="the votes of a study database as JSONL (the fields of hps_jax.study.analysis.Vote)",
    description="Writes every vote of the database as one JSON object per line (written atomically): participant, "
    "pair_id, system_left, system_right, image_left, image_right, choice, is_check, expected (a check's right "
    "answer, left / right / tie; a broken check image has the system 'broken'), response_ms, created, user_agent.",
  )
  _add_db(e, default=None)
  e.add_argument("--out", required=True, metavar="VOTES.jsonl", help="the JSONL file to write")
  e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  e.set_defaults(run=run_export)


def _int_in(lo: int, hi: int, what: str):
  def parse(text: str) -> int:
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not lo <= v <= hi:
      raise argparse.ArgumentTypeError(f"{what} must be in [{lo}, {hi}], got {v}")
    return v

  return parse


_port = _int_in(0, 65535, "a port")
_threads = _int_in(1, 256, "threads")


def _db_url(args) -> str:
  if args.db_url:
    return args.db_url
  if not args.db:
    raise UsageError("give the database: --db PATH or --db-url URL")
  from hps_jax.study.store import sqlite_url

  return sqlite_url(os.path.abspath(args.db))


def _study_modules():
  try:
    from hps_jax.study import store, web
  except ImportError as e:
    raise UsageError(f"the study server needs Flask, SQLAlchemy and waitress ({e}): {STUDY_EXTRA}") from None
  return store, web


def run_serve(args) -> int:
  store_mod, web = _study_modules()
  try:
    import waitress.server
  except ImportError as e:
    raise UsageError(f"the study server needs waitress ({e}): {STUDY_EXTRA}") from None
  if args.db and not args.db_url and os.path.abspath(args.db) == os.path.abspath(args.study):
    raise UsageError(f"--db {args.db} is the study file: choose another file")
  study = load_study(args.study)
  problems = verify_images(study)
  if problems:
    image_id, why = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise InputError(f"{args.study}: image {image_id!r} changed since the study was created: {why}{more}")
  store = store_mod.open_store(_db_url(args), study)
  token = args.admin_token or secrets.token_urlsafe(16)
  try:
    app = web.make_app(study, store, token)
    try:
      server = waitress.server.create_server(app, host=args.host, port=args.port, threads=args.threads)
    except OSError as e:
      raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    host, port = server.effective_host, server.effective_port
    shown_host = f"[{host}]" if ":" in str(host) else host
    print(f"serving the study {args.study} on http://{shown_host}:{port}/", file=sys.stderr)
    if not args.admin_token:
      print(f"admin: http://{shown_host}:{port}/admin?token={token}", file=sys.stderr)
    sys.stderr.flush()
    _serve_until_signal(server)
  finally:
    store.close()
  return 0  # pragma: no cover (the server only stops on a signal)


def _serve_until_signal(server) -> None:
  """Runs the waitress server until SIGINT / SIGTERM (`web.run_until`: requests in flight finish, their votes
  commit), then raises Interrupted. The signal handlers only record the signal (waitress returns normally on a
  KeyboardInterrupt and swallows exceptions raised inside its loop)."""
  _, web = _study_modules()

  def on_signal(signum, frame):
    pending_stop.append(signum)

  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    web.run_until(server, lambda: bool(pending_stop))
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  raise Interrupted(pending_stop[0])


def run_export(args) -> int:
  store_mod, _ = _study_modules()
  inputs = [args.db] if args.db and not args.db_url else []
  check_output(args.out, overwrite=args.overwrite, inputs=inputs, flag="--out", formats=(".jsonl",))
  store = store_mod.open_store(_db_url(args), create=False)
  try:
    votes = store.export_votes()
  finally:
    store.close()
  with files.atomic_write(args.out) as f:
    for v in votes:
      f.write(json.dumps(v, ensure_ascii=False) + "\n")
  say_wrote(args.out, f"{len(votes)} votes")
  return 0


# ------------------------------------------------------------------------------------------------------ report
def add_report(actions):
  from hps_jax.cli.common import COUNT

  r = add_parser(
    actions,
    "report",
    help="the study's statistics: win rates, Fig. 8, Bradley-Terry, agreement (Table 3), attention checks",
    description="Reads the votes (a votes JSONL export, `study export`) of a study and writes DIR/report.json (every "
    "number), DIR/report.md (tables), DIR/report.html (self-contained: plots embedded) and the plots: "
    "fig8_votes_per_pair.png, and with 3+ systems win_matrix.png and bradley_terry.png. Every vote is checked "
    "against STUDY.json (its pair, images and systems); a bad line is skipped and named (exit 1). A statistic that "
    "cannot be computed (no votes, nobody sharing a pair, ...) is reported with the reason, never as NaN. The "
    "headline goes to stdout. Definitions of every number are written in the report (hps_jax.study.analysis).",
  )
  r.add_argument(
    "votes",
    metavar="VOTES",
    help="the votes: the study database (the --db file of `study serve`, or a database URL) or a .jsonl export",
  )
  r.add_argument("--study", required=True, metavar="STUDY.json", help="the study file the votes were collected on")
  r.add_argument("--out", required=True, metavar="DIR", help="the report's folder (created if missing)")
  r.add_argument(
    "--scorer",
    action="append",
    metavar="NAME=CKPT",
    help="a preference model to compare with the participants (Table 3: model vs human): CKPT is a checkpoint path "
    "or a published model's name (hps-v2.1, clip-vit-l-14, ...); it scores every pair image against its prompt in "
    "the study file; repeat for each model",
  )
  r.add_argument(
    "--exclude-failed-checks",
    action="store_true",
    help="leave out of every statistic the participants who failed any attention check (they are listed)",
  )
  r.add_argument(
    "--bootstrap", type=COUNT, default=2000, metavar="N", help="bootstrap replicates (resampling image pairs)"
  )
  r.add_argument("--seed", type=SEED, default=0, help="seeds the bootstrap")
  r.set_defaults(run=run_report)


def _scorer_specs(specs: list[str] | None) -> list[tuple[str, str]]:
  return _named_specs(specs, "--scorer", "CKPT")


def run_report(args) -> int:
  from hps_jax import files
  from hps_jax.cli.common import check_outdir, report_skips, require_finite
  from hps_jax.study import report as sr  # numpy / scipy: only when the report runs
  from hps_jax.study.create import load_study

  scorers = _scorer_specs(args.scorer)
  try:
    sr.check_matplotlib()
  except InputError as e:
    raise UsageError(str(e)) from None
  study = load_study(args.study)
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {args.out} is a file, expected a folder")
  inputs = {Path(p).resolve() for p in (args.votes, args.study)}
  for name in sr.OUTPUTS:
    if (out / name).resolve() in inputs:
      raise UsageError(f"--out {args.out}: its {name} would replace an input: choose another folder")
  skips = Skips()
  votes, lines = sr.load_votes(args.votes, skips.add, study)
  scores = {}
  for name, ckpt in scorers:
    print(f"scoring the study's images with {name} ({ckpt})", file=sys.stderr)
    scores[name] = (ckpt, sr.model_scores(study, votes, ckpt))
  report = sr.build_report(
    votes,
    study=study,
    votes_source=str(args.votes),
    scores=scores,
    n_boot=args.bootstrap,
    seed=args.seed,
    exclude_failed_checks=args.exclude_failed_checks,
    lines_read=lines,
    lines_skipped=len(skips.items),
  )
  rendered = sr.render(report)
  require_finite(report, "the study report")
  check_outdir(args.out, "--out")
  for name in sr.OUTPUTS:  # a plot of an earlier report that this one has not (fewer systems now)
    if name not in rendered and (out / name).is_file():
      (out / name).unlink()
  for name, data in rendered.items():
    with files.atomic_write(out / name, "wb") as f:
      f.write(data)
  print(report["headline"])
  code = report_skips(skips, len(votes), noun="votes")
  n_plots = len(report["plots"])
  say_wrote(out / "report.html", f"the report (report.json, report.md, {n_plots} plot{'s' * (n_plots != 1)})")
  return code
