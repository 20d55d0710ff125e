"""`hps-jax collect discord`: the collector recovers exactly the true (prompt, images, chosen) records from synthetic
DiscordChatExporter exports, counts every excluded session under its reason, writes data the preference_jsonl
builder loads, fails cleanly on broken exports and reads large exports in bounded memory."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ijson")

from hps_jax.cli import main  # noqa: E402
from hps_jax.collect import DiscordCollector, ExportError, load_grammar  # noqa: E402
from tests.collect.synthetic_export import (  # noqa: E402
  BOT,
  A,
  ExportWriter,
  dreambot_exports,
  encode,
  image,
  upscale_export,
)

ROOT = Path(__file__).resolve().parents[2]


def _records(out: Path) -> list[dict]:
  return [json.loads(line) for line in (out / "preference.jsonl").read_text(encoding="utf-8").splitlines()]


def _assert_truth(out: Path, records: list[dict], truth: list[dict]) -> None:
  assert len(records) == len(truth)
  for rec, want in zip(records, truth):
    assert rec["prompt"] == want["prompt"]
    assert rec["chosen"] == want["chosen"]
    assert len(rec["images"]) == len(want["images"])
    for rel, arr in zip(rec["images"], want["images"]):
      data = (out / rel).read_bytes()
      sha = hashlib.sha256(data).hexdigest()
      assert rel == f"images/{sha[:2]}/{sha}{Path(rel).suffix}"
      np.testing.assert_array_equal(np.asarray(Image.open(out / rel).convert("RGB")), arr)
    if "seeds" in want:
      assert rec["seeds"] == want["seeds"]
    assert set(rec) >= {"id", "prompt", "images", "chosen", "user", "timestamp", "source_message_ids"}


def test_dreambot_recovers_the_true_records(tmp_path, capsys):
  exports, truth, expected = dreambot_exports(tmp_path / "exports")
  out = tmp_path / "out"
  code = main(["collect", "discord", *map(str, exports), "--out", str(out)])
  err = capsys.readouterr().err
  assert code == 1, err  # the path outside the export's folder is a skipped input
  assert "unsafe_path" in err and "resolves outside" in err and "Traceback" not in err
  records = _records(out)
  _assert_truth(out, records, truth)
  assert [r["user"] for r in records] == ["111", "222", "111", "333", "333"]
  fox = records[0]
  assert len(fox["source_message_ids"]) == 3 and fox["timestamp"].startswith("2022-08-10T12:")
  report = json.loads((out / "report.json").read_text())
  assert report["excluded"] == expected
  assert report["records"] == len(truth)
  # only the records' images are kept (no user upload, no unselected candidate)
  kept = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
  assert kept == {rel for r in records for rel in r["images"]}
  # a second run needs --overwrite
  assert main(["collect", "discord", str(exports[0]), "--out", str(out)]) == 2
  assert "--overwrite" in capsys.readouterr().err


def test_per_user_cap_and_record_dedupe(tmp_path):
  exports, truth, expected = dreambot_exports(tmp_path / "exports")
  c = DiscordCollector(load_grammar("dreambot"), tmp_path / "out", max_per_user=1)
  for e in exports:
    c.read_export(e)
  report = c.finish()
  assert [r["prompt"] for r in c.records] == ["a red fox in snow", "castle on a hill", "sunset over sea"]
  assert report["excluded"]["user_cap"] == 2  # alice's lagoon, carol's robot


def test_upscale_grammar(tmp_path, capsys):
  export, truth, expected = upscale_export(tmp_path / "mj")
  out = tmp_path / "out"
  assert main(["collect", "discord", str(export), "--out", str(out), "--grammar", "upscale"]) == 0
  _assert_truth(out, _records(out), truth)
  assert json.loads((out / "report.json").read_text())["excluded"] == expected


def test_grammar_file_and_errors(tmp_path, capsys):
  export, truth, _ = upscale_export(tmp_path / "mj")
  g = tmp_path / "g.json"
  g.write_text(json.dumps({"base": "upscale", "bot_name": "^Nobody$"}))
  out = tmp_path / "out"
  assert main(["collect", "discord", str(export), "--out", str(out), "--grammar", str(g)]) == 0
  assert _records(out) == []  # no bot matches: nothing collected
  g.write_text(json.dumps({"request": "("}))
  assert main(["collect", "discord", str(export), "--out", str(tmp_path / "o2"), "--grammar", str(g)]) == 2
  assert "bad regex" in capsys.readouterr().err
  with pytest.raises(ExportError, match="unknown keys"):
    load_grammar({"nope": 1})


def test_output_loads_through_the_preference_jsonl_builder(tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  from hps_jax.data import datasets as D

  exports, truth, _ = dreambot_exports(tmp_path / "exports")
  out = tmp_path / "out"
  main(["collect", "discord", *map(str, exports), "--out", str(out)])
  records = _records(out)
  src = D.data_source("preference_jsonl", "preference", out, tmp_path / "tfds")
  assert len(src) == len(records)
  for i, rec in enumerate(records):
    got = src[i]
    assert got["id"] == rec["id"] and got["prompt"] == rec["prompt"] and got["chosen"] == rec["chosen"]
    assert got["images"] == [(out / p).read_bytes() for p in rec["images"]]
  # and trains with the tiny preset unchanged (only the data source is overridden)
  wd = tmp_path / "train"
  argv = ["train-preference", "--config", "hps_classifier:tiny", "--workdir", str(wd)]
  argv += ["--config.data.dataset=preference_jsonl", f"--config.data.manual_dir={out}"]
  argv += [f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.train_split=preference"]
  argv += ["--config.data.eval_split=", "--config.batch_size=2", "--config.num_steps=2", "--config.log_every=1"]
  argv += ["--config.progress=False"]
  assert main(argv) == 0
  losses = [json.loads(line)["loss"] for line in (wd / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
  assert len(losses) == 2 and all(np.isfinite(losses))


def _one_error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err and len(lines) == 1, err
  assert lines[0].startswith("hps-jax collect: error: "), err
  return lines[0]


def test_truncated_and_non_utf8_exports_are_one_line_errors(tmp_path, capsys):
  exports, _, _ = dreambot_exports(tmp_path / "exports")
  data = exports[0].read_bytes()
  cut = tmp_path / "exports" / "cut.json"
  cut.write_bytes(data[: len(data) // 2])
  assert main(["collect", "discord", str(cut), "--out", str(tmp_path / "o1")]) == 2
  assert "truncated or invalid JSON" in _one_error_line(capsys.readouterr().err)
  assert not (tmp_path / "o1" / "preference.jsonl").exists()
  assert not [p for p in (tmp_path / "o1").rglob("*") if p.is_file()]  # no partial output
  bad = tmp_path / "exports" / "latin1.json"
  bad.write_bytes(data.replace(b"hello everyone", b"h\xe9llo everyone"))
  assert main(["collect", "discord", str(bad), "--out", str(tmp_path / "o2")]) == 2
  assert "not UTF-8" in _one_error_line(capsys.readouterr().err)
  assert main(["collect", "discord", str(tmp_path / "none.json"), "--out", str(tmp_path / "o3")]) == 2
  assert "no such export" in _one_error_line(capsys.readouterr().err)


def test_missing_keys_and_bad_messages_are_counted(tmp_path, capsys):
  w = ExportWriter(tmp_path, "e.json")
  r = w.message(A, '!dream "p" -n 2')
  w.message(BOT, '<@111> "p"', [w.attach(f"p{i}.png", encode(image(i))) for i in range(2)], r)
  w.messages.append({"content": "no id"})
  w.messages.append({"id": "1", "author": {"id": "111"}, "content": '!dream "q"'})  # no timestamp
  w.messages.append({"id": "2"})  # nothing but an id: ignored like chatter
  w.messages.append({"id": "3", "author": "x"})
  path = w.write()
  out = tmp_path / "out"
  assert main(["collect", "discord", str(path), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.count("bad_message") >= 3
  assert json.loads((out / "report.json").read_text())["excluded"] == {"bad_message": 3, "no_selection": 1}


def test_missing_ijson_is_a_one_line_usage_error(tmp_path, monkeypatch, capsys):
  exports, _, _ = dreambot_exports(tmp_path / "exports")
  monkeypatch.setitem(sys.modules, "ijson", None)
  assert main(["collect", "discord", str(exports[0]), "--out", str(tmp_path / "o")]) == 2
  assert "pip install 'hps_jax[collect]'" in _one_error_line(capsys.readouterr().err)


_MEMORY_SCRIPT = textwrap.dedent(
  """
  import json, sys
  from pathlib import Path
  from hps_jax.collect import DiscordCollector, load_grammar
  import ijson, PIL.Image, numpy  # imported before the baseline
  def status_kib(key):  # this process's own counters: VmRSS now, VmHWM its peak (ru_maxrss would include the
    # parent's resident set inherited at fork, which execve carries over on Linux)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
  before = status_kib("VmRSS")
  c = DiscordCollector(load_grammar("dreambot"), sys.argv[2])
  n = c.read_export(sys.argv[1])
  c.finish()
  after = status_kib("VmHWM")
  print(json.dumps({"messages": n, "growth_kib": after - before, "excluded": c.excluded}))
  """
)


def test_large_export_in_bounded_memory(tmp_path):
  """A ~20 MB export (chatter, unanswered requests, a few real sessions) is read with a small peak RSS growth."""
  w = ExportWriter(tmp_path, "big.json")
  r = w.message(A, '!dream "big" -n 2')
  w.message(BOT, '<@111> "big"', [w.attach(f"b{i}.png", encode(image(i))) for i in range(2)], r)
  text = "lorem ipsum dolor sit amet " * 12
  template = w.messages[0]
  path = tmp_path / "big.json"
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"guild": {"id": "7"}, "channel": {"id": "5"}, "messages": [\n')
    f.write(",\n".join(json.dumps(m) for m in w.messages))
    for i in range(27_000):
      m = dict(template, id=str(10**6 + i), content=f'!dream "p{i}" {text}' if i % 100 == 0 else f"chat {i} {text}")
      f.write(",\n" + json.dumps(m))
    f.write('\n], "messageCount": 27002}\n')
  size = path.stat().st_size
  assert 15e6 < size < 30e6
  run = subprocess.run(
    [sys.executable, "-c", _MEMORY_SCRIPT, str(path), str(tmp_path / "out")],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout)
  growth_mib = result["growth_kib"] / 1024
  print(f"export {size / 1e6:.1f} MB, {result['messages']} messages: peak RSS growth {growth_mib:.1f} MiB")
  assert result["messages"] == 27_002
  assert result["excluded"] == {"no_selection": 1, "no_reply": 270}
  assert growth_mib < 200


def test_dataset_stats_of_the_collected_jsonl_counts_users(tmp_path, capsys):
  """`hps-jax dataset stats OUT/preference.jsonl` reads the collector's rows as they are, users included."""
  exports, _, _ = dreambot_exports(tmp_path / "exports")
  out = tmp_path / "out"
  main(["collect", "discord", *map(str, exports), "--out", str(out)])
  records = _records(out)
  capsys.readouterr()
  assert main(["dataset", "stats", str(out / "preference.jsonl"), "--output", str(tmp_path / "stats.json")]) == 0
  report = json.loads((tmp_path / "stats.json").read_text())
  users = {r["user"] for r in records}
  assert report["users"]["users"] == len(users) and report["users"]["choices_per_user"]["max"] == max(
    sum(r["user"] == u for r in records) for u in users
  )
  # the same through the prepared preference_jsonl dataset: the TFDS records keep `user` too
  pytest.importorskip("tensorflow_datasets")
  argv = ["dataset", "stats", "preference_jsonl", "--manual-dir", str(out), "--split", "preference"]
  argv += ["--data-dir", str(tmp_path / "tfds"), "--output", str(tmp_path / "stats_tfds.json")]
  assert main(argv) == 0
  assert json.loads((tmp_path / "stats_tfds.json").read_text())["users"] == report["users"]
