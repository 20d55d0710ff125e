"""`hps-jax collect`: build a preference data set from chat logs. `collect discord` reads DiscordChatExporter JSON
exports (with local media, i.e. exported with --media) and writes DIR/preference.jsonl (the preference_jsonl
layout), DIR/images/ and DIR/report.json; the grammar of requests, replies and selections is documented in
`hps_jax.collect.discord`."""

from __future__ import annotations

import sys
from pathlib import Path

from hps_jax.cli.common import LIMIT, UsageError, add_parser, report_skips, say_wrote
from hps_jax.collect import BUILTIN_GRAMMARS, DiscordCollector, ExportError, load_grammar, require_ijson


def add_collect(sub):
  p = add_parser(
    sub,
    "collect",
    help="build a preference dataset from Discord chat exports (DiscordChatExporter JSON)",
    description="Build a preference data set (prompt, candidate images, the user's choice) from chat logs, as the "
    "paper's HPD was built from Discord. Output: DIR/preference.jsonl (loads as the preference_jsonl data set), "
    "DIR/images/ (content-addressed) and DIR/report.json (every excluded session counted by reason).",
  )
  sources = p.add_subparsers(dest="source", metavar="SOURCE", title="sources", required=True)
  d = add_parser(
    sources,
    "discord",
    help="DiscordChatExporter JSON exports (exported with --media, so attachments are local files)",
    description="Reads the exports' messages incrementally, pairs each request with the bot's reply (N images or a "
    "grid cut into N tiles) and the user's selection, and writes one record per selected session. Exit 1 when "
    "some messages or media were skipped (named in the summary), 2 when an export is unreadable.",
  )
  d.add_argument("exports", metavar="EXPORT", nargs="+", help="DiscordChatExporter JSON export files")
  d.add_argument("--out", required=True, metavar="DIR", help="output folder (preference.jsonl, images/, report.json)")
  d.add_argument(
    "--grammar",
    default="dreambot",
    metavar="NAME|FILE",
    help=f"how requests, replies and selections look: a built-in ({', '.join(BUILTIN_GRAMMARS)}) or a JSON file "
    "(keys in hps_jax.collect.discord)",
  )
  d.add_argument(
    "--max-per-user", type=LIMIT, default=0, metavar="N", help="at most this many records per user (0: no cap)"
  )
  d.add_argument("--overwrite", action="store_true", help="replace an existing DIR/preference.jsonl")
  p.set_defaults(run=run_collect)


def run_collect(args) -> int:
  out = Path(args.out)
  if (out / "preference.jsonl").exists() and not args.overwrite:
    raise UsageError(f"{out / 'preference.jsonl'} exists: pass --overwrite to replace it")
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is not a directory")
  if args.max_per_user < 0:
    raise UsageError(f"--max-per-user must be >= 0, got {args.max_per_user}")
  for e in args.exports:
    if not Path(e).is_file():
      raise UsageError(f"{e}: no such export file")
  try:
    require_ijson()
    collector = DiscordCollector(load_grammar(args.grammar), out, max_per_user=args.max_per_user)
  except ExportError as e:
    raise UsageError(str(e)) from None
  try:
    for e in args.exports:
      collector.read_export(e)
  except ExportError as e:
    collector.abort()  # an unreadable export: no partial output
    raise UsageError(str(e)) from None
  report = collector.finish()
  print(f"messages read: {report['messages']}, records: {report['records']}", file=sys.stderr)
  for reason, n in report["excluded"].items():
    print(f"  excluded {reason}: {n}", file=sys.stderr)
  say_wrote(out / "preference.jsonl", f"{report['records']} records")
  say_wrote(out / "report.json", "the collection report")
  return report_skips(collector.skips, report["records"], noun="records")
