"""hps_jax.files.JsonlAppender: the resumable output of long jobs."""

import json

import pytest

from hps_jax.files import JsonlAppender, ResumeError


def test_append_resume_finish(tmp_path):
  out = tmp_path / "scores.jsonl"
  with JsonlAppender(out, {"checkpoint": "a"}) as w:
    w.write([{"i": 0}, {"i": 1}])
    w.write([{"i": 2}])
  assert not out.exists() and w.partial.exists()  # a killed / unfinished run leaves only the partial file
  with open(w.partial, "ab") as f:  # a kill in the middle of a line
    f.write(b'{"i": 3')
  r = JsonlAppender(out, {"checkpoint": "a"}, resume=True)
  assert r.rows == [{"i": 0}, {"i": 1}, {"i": 2}]  # the torn line is cut off
  r.write([{"i": 3}])
  assert r.rows_written == 1
  r.finish()
  assert [json.loads(x) for x in out.read_text().splitlines()] == [{"i": k} for k in range(4)]
  assert not r.partial.exists() and not r.meta.exists()


def test_other_settings_or_no_resume(tmp_path):
  out = tmp_path / "s.jsonl"
  JsonlAppender(out, {"checkpoint": "a", "batch": 4}).write([{"i": 0}])
  with pytest.raises(ResumeError, match="checkpoint differ"):
    JsonlAppender(out, {"checkpoint": "b", "batch": 4}, resume=True)
  fresh = JsonlAppender(out, {"checkpoint": "b", "batch": 4})  # without --resume: start over
  assert fresh.rows == [] and fresh.partial.read_bytes() == b""
  (tmp_path / "s.jsonl.partial").write_text('{"i": 0}\nnot json\n')
  with pytest.raises(ResumeError, match=":2: cannot resume"):
    JsonlAppender(out, {"checkpoint": "b", "batch": 4}, resume=True)
