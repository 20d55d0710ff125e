"""The Grain pipeline (process sharding, per-epoch shuffles, slot padding, chosen kept under truncation) and the
train loop's NaN stop."""

import math

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hps_jax.data import pipeline
from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.synthetic import SyntheticPreference
from hps_jax.data.tokenizer import CLIPTokenizer

TOK = CLIPTokenizer.default()


def _transform(max_images=4, size=16):
  return pipeline.RecordTransform(TOK, PreprocessConfig(mode="pad", size=size), max_images=max_images)


def _ids(batches):
  return [tuple(row) for b in batches for row in b["ids"][:, :8].tolist()]


def test_processes_get_disjoint_shards_and_epochs_reshuffle():
  src = SyntheticPreference(24, seed=0, image_size=16)
  t = _transform()
  per_proc = [
    list(pipeline.train_dataset(src, t, global_batch_size=4, seed=3, num_epochs=2, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  assert all(b["pixels"].shape == (2, 4, 16, 16, 3) for proc in per_proc for b in proc)  # 4 global / 2 processes
  # within an epoch the two processes see disjoint records, together all 24 (a record is known by its noisy
  # pixels: prompts repeat)
  first = [[row.tobytes() for b in proc[:6] for row in b["pixels"]] for proc in per_proc]
  assert not set(first[0]) & set(first[1])
  assert set(first[0]) | set(first[1]) == {t(src[i])["pixels"].tobytes() for i in range(24)}
  # the second epoch is another permutation
  one = list(
    pipeline.train_dataset(src, t, global_batch_size=4, seed=3, num_epochs=2, process_index=0, process_count=1)
  )
  # process 0's rows then process 1's make up the one-process global batch, row for row
  assert len(per_proc[0]) == len(per_proc[1]) == len(one)
  for b0, b1, b in zip(*per_proc, one):
    np.testing.assert_array_equal(np.concatenate([b0["pixels"], b1["pixels"]]), b["pixels"])
  order = np.concatenate([b["chosen"] for b in one])
  assert len(one) == 12
  assert _ids(one[:6]) != _ids(one[6:])
  # same seed, same order; another seed, another order
  again = list(
    pipeline.train_dataset(src, t, global_batch_size=4, seed=3, num_epochs=2, process_count=1, process_index=0)
  )
  np.testing.assert_array_equal(order, np.concatenate([b["chosen"] for b in again]))
  other = list(
    pipeline.train_dataset(src, t, global_batch_size=4, seed=4, num_epochs=1, process_count=1, process_index=0)
  )
  assert _ids(other) != _ids(one[:6])


def test_slots_mask_and_truncation_keep_the_chosen_image():
  src = SyntheticPreference(40, seed=1, image_size=16)
  t = _transform(max_images=2)
  for i in range(len(src)):
    rec, out = src[i], t(src[i])
    n = len(rec["images"])
    assert out["mask"].tolist() == [True, True]
    assert out["ranks"][out["chosen"]] == 0  # the chosen image survives truncation to 2 slots
    if n == 2:
      np.testing.assert_array_equal(out["ranks"], rec["ranks"])
  out = _transform(max_images=4)(next(src[i] for i in range(len(src)) if len(src[i]["images"]) == 2))
  assert out["mask"].tolist() == [True, True, False, False]
  assert (out["pixels"][2:] == 0).all() and (out["ranks"][2:] == pipeline.RANK_PAD).all()


def test_pad_batch_and_bad_image_names_the_record():
  src = SyntheticPreference(5, seed=2, image_size=16)
  batches = list(pipeline.eval_dataset(src, _transform(), batch_size=4))
  assert [len(b["chosen"]) for b in batches] == [4, 1]
  padded, n = pipeline.pad_batch(batches[1], 4)
  assert n == 1 and padded["pixels"].shape[0] == 4 and not padded["mask"][1:].any()
  rec = dict(src[0])
  rec["images"] = [rec["images"][0], b"garbage"]
  rec["chosen"], rec["ranks"] = 0, np.array([0, 1])
  try:
    _transform()(rec)
  except ValueError as e:
    assert "record train-0 image 1" in str(e)
  else:
    raise AssertionError("a corrupt image must raise")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  """A batch with a NaN at step 5: the run stops there, checkpoints 2 and 4 stay, nothing is exported."""
  from hps_jax.checkpoint import Checkpointer
  from hps_jax.train_loop import Task, train

  data = [
    {"x": np.full((4, 2), np.nan if i == 4 else 1.0, np.float32), "y": np.ones((4, 1), np.float32)} for i in range(10)
  ]
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))

  def loss_fn(m, batch):
    return jnp.mean((m(batch["x"]) - batch["y"]) ** 2), {}

  exported = []
  task = Task(
    model=model,
    trainable=nnx.Param,
    loss_fn=loss_fn,
    make_iterator=lambda: pipeline.to_iterator(grain.MapDataset.source(data), prefetch_threads=0),
    example={"x": np.zeros(2, np.float32), "y": np.zeros(1, np.float32)},
    export=lambda m, d: exported.append(d),
  )
  config = ml_collections.ConfigDict(
    {
      "seed": 0,
      "batch_size": 4,
      "num_steps": 10,
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
      "sharding_rules": [("batch", ["data", "fsdp"]), ("embed", "fsdp")],
      "optim": {
        "lr": 0.1,
        "weight_decay": 0.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "schedule": "constant",
        "warmup_steps": 0,
        "grad_clip": 0.0,
      },
      "log_every": 1,
      "eval_every": 0,
      "checkpoint_every": 2,
      "keep_checkpoints": 5,
      "progress": False,
    }
  )
  result = train(task, config, tmp_path)
  assert result.status == "nan" and result.step == 5 and math.isnan(result.losses[5])
  assert all(math.isfinite(result.losses[s]) for s in range(1, 5))
  ck = Checkpointer(tmp_path / "checkpoints")
  assert ck.all_steps() == [2, 4]
  ck.close()
  assert not exported and result.export_path is None
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars were written
