"""`hps_jax.data.stats` and `hps-jax dataset stats`: the Sec. 3 numbers of a hand-written preference_jsonl fixture
equal the values computed by hand."""

import json

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main
from hps_jax.data.stats import dataset_stats, markdown

# prompt, number of images, chosen: 5 records, 2 + 3 + 4 + 4 + 2 = 15 images
FIXTURE = [
  ("a red circle", 2, 0),  # 3 words, 12 characters
  ("a photo of a dog", 3, 2),  # 5 words, 16 characters
  ("cat", 4, 1),  # 1 word, 3 characters
  ("two blue birds on a wire", 4, 3),  # 6 words, 24 characters
  ("a red circle", 2, 1),  # a repeated prompt: 3 words, 12 characters
]
WORDS = [3, 5, 1, 6, 3]
CHARS = [12, 16, 3, 24, 12]


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("pref")
  rng = np.random.default_rng(0)
  with open(d / "test.jsonl", "w") as f:
    for i, (prompt, n, chosen) in enumerate(FIXTURE):
      names = []
      for j in range(n):
        name = f"img_{i}_{j}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / name)
        names.append(name)
      f.write(json.dumps({"prompt": prompt, "images": names, "chosen": chosen}) + "\n")
  return d


def _records(users=None):
  return [
    {"prompt": p, "images": [b""] * n, "chosen": c, **({"user": users[i]} if users else {})}
    for i, (p, n, c) in enumerate(FIXTURE)
  ]


def test_library_counts_and_lengths():
  s = dataset_stats(_records()).summary()
  assert s["prompts"] == 5 and s["distinct_prompts"] == 4 and s["images"] == 15
  assert s["prompts_by_images"] == {"2": 2, "3": 1, "4": 2}
  assert s["users"] == "not recorded"
  # words 1, 3, 3, 5, 6 / characters 3, 12, 12, 16, 24
  assert s["prompt_words"]["mean"] == pytest.approx(18 / 5) and s["prompt_words"]["median"] == 3
  assert s["prompt_words"]["min"] == 1 and s["prompt_words"]["max"] == 6
  assert s["prompt_words"]["p25"] == 3 and s["prompt_words"]["p75"] == 5  # linear interpolation, 5 values
  assert s["prompt_words"]["p5"] == pytest.approx(1 + 0.2 * 2) and s["prompt_words"]["p95"] == pytest.approx(5.8)
  assert s["prompt_chars"]["mean"] == pytest.approx(67 / 5) and s["prompt_chars"]["median"] == 12
  assert s["prompt_chars"]["p75"] == 16 and s["prompt_chars"]["max"] == 24
  assert "| prompts with 4 images | 2 |" in markdown(s)


def test_library_users():
  s = dataset_stats(_records(users=["u1", "u2", "u1", "u1", ""])).summary()
  u = s["users"]
  assert u["users"] == 2 and u["records_without_user"] == 1
  per = u["choices_per_user"]
  assert per["max"] == 3 and per["min"] == 1 and per["mean"] == 2 and per["median"] == 2
  assert per["distribution"] == {"1": 1, "3": 1}  # one user with 1 choice, one with 3
  text = markdown(s)
  assert "| users | 2 |" in text and "| choices per user (max / median / mean) | 3 / 2 / 2 |" in text


def test_dataset_stats_command(jsonl_dir, tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  out = tmp_path / "stats.json"
  argv = ["dataset", "stats", "preference_jsonl", "--manual-dir", str(jsonl_dir), "--data-dir", str(tmp_path / "tfds")]
  plots = ["--plots", str(tmp_path / "plots")] if _has_matplotlib() else []
  assert main([*argv, "--output", str(out), *plots]) == 0
  report = json.loads(out.read_text())
  assert report["dataset"] == "preference_jsonl" and report["split"] == "test"
  assert report["prompts"] == 5 and report["images"] == 15
  assert report["prompts_by_images"] == {"2": 2, "3": 1, "4": 2}
  assert report["users"] == "not recorded"
  assert report["prompt_words"]["mean"] == pytest.approx(np.mean(WORDS))
  assert report["prompt_chars"]["median"] == np.median(CHARS)
  table = out.with_suffix(".md").read_text()
  assert table in capsys.readouterr().out and "| prompts with 3 images | 1 |" in table
  if plots:
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["images_per_prompt.png", "prompt_length.png"]
  # --max-prompts takes a prefix; several splits are joined with commas
  assert main([*argv, "--max-prompts", "2", "--output", str(out)]) == 0
  assert json.loads(out.read_text())["prompts_by_images"] == {"2": 1, "3": 1}
  assert main([*argv, "--split", "test,test", "--output", str(out)]) == 0
  assert json.loads(out.read_text())["images"] == 30


def test_dataset_stats_usage_errors(tmp_path, capsys):
  assert main(["dataset", "stats", "nope"]) == 2
  assert "unknown dataset 'nope'" in capsys.readouterr().err
  assert main(["dataset", "stats", "synthetic", "--synthetic-size", "3", "--output", str(tmp_path / "x.txt")]) == 2
  assert "unknown format .txt; use .json" in capsys.readouterr().err


def _has_matplotlib() -> bool:
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return False
  return True
