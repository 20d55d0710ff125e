"""Peak memory of `hps-jax collect discord` on a large export: writes a synthetic DiscordChatExporter JSON of about
`--mb` megabytes (chatter and unanswered `!dream` requests around one answered session), collects it in a fresh
subprocess and prints one JSON line with the export size, the message count, the wall time and the peak RSS growth
over the process's resident set just before collecting.

  python -m bench.collect_memory --mb 200
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import emit

_CHILD = """
import json, sys, time
from hps_jax.collect import DiscordCollector, load_grammar
import ijson, PIL.Image, numpy  # imported before the baseline
def status_kib(key):  # VmRSS now / VmHWM this process's peak (ru_maxrss would include the forking parent's)
  return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
before = status_kib("VmRSS")
t = time.perf_counter()
c = DiscordCollector(load_grammar("dreambot"), sys.argv[2])
n = c.read_export(sys.argv[1])
c.finish()
print(json.dumps({"messages": n, "seconds": time.perf_counter() - t,
                  "growth_kib": status_kib("VmHWM") - before}))
"""


def write_export(folder: Path, megabytes: float) -> Path:
  media = folder / "big.json_Files"
  media.mkdir(parents=True)
  attachments = []
  for i in range(2):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (media / f"b{i}.png").write_bytes(buf.getvalue())
    attachments.append({"id": str(i), "url": f"big.json_Files/b{i}.png", "fileName": f"b{i}.png"})
  user = {"id": "111", "name": "alice", "isBot": False}
  bot = {"id": "999", "name": "DreamBot", "isBot": True}
  head = [
    {"id": "1", "type": "Default", "timestamp": "2022-10-01T00:00:00+00:00", "content": '!dream "big" -n 2',
     "author": user, "attachments": []},
    {"id": "2", "type": "Reply", "timestamp": "2022-10-01T00:00:05+00:00", "content": '<@111> "big"', "author": bot,
     "attachments": attachments, "reference": {"messageId": "1"}},
  ]  # fmt: skip
  text = "lorem ipsum dolor sit amet " * 12
  path = folder / "big.json"
  n = len(head)
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"guild": {"id": "7"}, "channel": {"id": "5"}, "messages": [\n')
    f.write(",\n".join(json.dumps(m) for m in head))
    while f.tell() < megabytes * 1e6:
      content = f'!dream "p{n}" {text}' if n % 100 == 0 else f"chat {n} {text}"
      m = dict(head[0], id=str(10**6 + n), content=content)
      f.write(",\n" + json.dumps(m))
      n += 1
    f.write(f'\n], "messageCount": {n}}}\n')
  return path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mb", type=float, default=200, help="export size in megabytes (default: 200)")
  ap.add_argument("--out", help="also write the JSON line to this file")
  args = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as d:
    path = write_export(Path(d), args.mb)
    t = time.perf_counter()
    run = subprocess.run(
      [sys.executable, "-c", _CHILD, str(path), str(Path(d) / "out")], capture_output=True, text=True
    )
    if run.returncode:
      print(run.stderr, file=sys.stderr)
      return run.returncode
    r = json.loads(run.stdout)
    emit(
      {
        "bench": "collect_memory",
        "export_mb": round(path.stat().st_size / 1e6, 1),
        "messages": r["messages"],
        "collect_seconds": round(r["seconds"], 1),
        "peak_rss_growth_mib": round(r["growth_kib"] / 1024, 1),
        "wall_seconds": round(time.perf_counter() - t, 1),
        "machine": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
      },
      args.out,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
