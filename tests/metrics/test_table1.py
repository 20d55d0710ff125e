"""`hps-jax dataset metrics` (Table 1) on the synthetic set with a random-weight Inception: the seeded samples are
the preferred / non-preferred images of the records, and the numbers equal `hps-jax metrics --metrics fid,is` run
on the same sampled images."""

import json

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main
from hps_jax.data.sources import open_source
from hps_jax.metrics import table1


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
  from flax import nnx

  from hps_jax.convert.inception import save_inception_torch
  from hps_jax.models.inception import FIDInception

  return save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("inc") / "inception.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  d = tmp_path_factory.mktemp("ref")
  rng = np.random.default_rng(1)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(d / f"ref_{i}.png")
  return d


def _metrics(argv, capsys) -> dict:
  assert main(argv) == 0
  return json.loads(capsys.readouterr().out)


def test_table1_equals_metrics_on_the_samples(inception_weights, reference, tmp_path, capsys):
  num_fid = 6  # IS and FID of the same images: one Inception pass per subset (num_fid < num_is: two, same code)
  samples, out = tmp_path / "samples", tmp_path / "table1.json"
  inc = ["--inception-weights", str(inception_weights), "--batch-size", "4"]
  argv = ["dataset", "metrics", "synthetic", "--synthetic-size", "8", "--split", "test", "--seed", "3"]
  argv += ["--reference", str(reference), "--num-is", "6", "--num-fid", str(num_fid), "--is-splits", "2", *inc]
  assert main([*argv, "--save-samples", str(samples), "--output", str(out)]) == 0
  result = json.loads(out.read_text())
  table = out.with_suffix(".md").read_text()
  assert table in capsys.readouterr().out and "| preferred |" in table and "| non-preferred |" in table

  source = open_source("synthetic", "test", seed=3, synthetic_size=8)
  pools = table1.subset_pools(source)
  for subset in table1.SUBSETS:
    r = result[subset]
    assert r["pool"] == len(pools[subset]) and r["num_is"] == 6 and r["num_fid"] == num_fid
    rows = [json.loads(line) for line in (samples / f"{subset}_is.jsonl").read_text().splitlines()]
    picked = [(row["record"], row["index"]) for row in rows]
    # seeded, without replacement, from the right pool: the preferred image is the chosen one, the others rank worse
    assert picked == [pools[subset][k] for k in table1.sample_order(len(pools[subset]), 3, subset)[:6]]
    assert len(set(picked)) == 6
    for row in rows:
      rec = source[row["record"]]
      assert (samples / row["image"]).read_bytes() == rec["images"][row["index"]]
      chosen = rec["chosen"]
      assert (row["index"] == chosen) if subset == "preferred" else (rec["ranks"][row["index"]] > rec["ranks"][chosen])
    fid_rows = (samples / f"{subset}_fid.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in fid_rows] == rows[:num_fid]
    # exactly what `hps-jax metrics` gives on the same images
    metrics = ["metrics", "--reference", str(reference), "--is-splits", "2", *inc]
    by_hand = _metrics([*metrics, "--images", str(samples / f"{subset}_is.jsonl"), "--metrics", "fid,is"], capsys)
    assert (r["is_mean"], r["is_std"]) == (by_hand["is_mean"], by_hand["is_std"])
    if num_fid < 6:
      by_hand = _metrics([*metrics, "--images", str(samples / f"{subset}_fid.jsonl"), "--metrics", "fid"], capsys)
    assert r["fid"] == by_hand["fid"]
  assert result["preferred"]["is_mean"] != result["non_preferred"]["is_mean"]


def test_table1_usage_errors(inception_weights, reference, tmp_path, capsys):
  base = ["dataset", "metrics", "synthetic", "--synthetic-size", "4", "--reference", str(reference)]
  with pytest.raises(SystemExit) as e:  # argparse: the option's type checks the range
    main([*base, "--num-is", "0"])
  assert e.value.code == 2
  assert "argument --num-is: expected an integer >= 1, got 0" in capsys.readouterr().err
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  assert main([*base, "--save-samples", str(tmp_path / "full")]) == 2
  assert "is not empty" in capsys.readouterr().err
