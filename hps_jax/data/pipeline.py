"""Grain pipelines for preference data: seeded shuffle, per-process sharding, decode, preprocess, tokenize, pad each
prompt to a fixed number of image slots (with a validity mask), batch, prefetch. The iterator state goes into the
same orbax checkpoint as the model (see `hps_jax.checkpoint`).

A source is any random-access sequence of preference records (`len`, `__getitem__`) in the shared schema:
`{"id", "prompt", "images": [encoded bytes], "ranks": int array (lower = better), "chosen": int}` — the TFDS data
sources of `hps_jax.data.datasets` and the synthetic set both are.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from hps_jax.data.images import ImageError, load_image
from hps_jax.data.preprocess import PreprocessConfig

RANK_PAD = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class RecordTransform:
  """record -> fixed-shape arrays: pixels (K,S,S,3) f32, mask (K,) bool, ids (T,) i32, chosen i32, ranks (K,) i32.

  A prompt with more than K images keeps the chosen one plus the first K-1 others, in their order (deterministic)."""

  tokenizer: object
  preprocess: PreprocessConfig
  max_images: int = 4
  context_length: int = 77

  def __call__(self, record) -> dict:
    images = list(record["images"])
    ranks = np.asarray(record["ranks"], np.int32)
    chosen = int(record["chosen"])
    keep = list(range(len(images)))
    if len(keep) > self.max_images:
      keep = [chosen] + [i for i in keep if i != chosen][: self.max_images - 1]
      keep.sort()
    k, s = self.max_images, self.preprocess.size
    pixels = np.zeros((k, s, s, 3), np.float32)
    mask = np.zeros((k,), bool)
    out_ranks = np.full((k,), RANK_PAD, np.int32)
    for slot, i in enumerate(keep):
      try:
        pixels[slot] = self.preprocess.apply(load_image(images[i]))
      except ImageError as e:
        raise ImageError(f"record {record.get('id', '?')!s} image {i}", str(e)) from e
      mask[slot] = True
      out_ranks[slot] = ranks[i]
    ids = np.asarray(self.tokenizer([str(record["prompt"])], context_length=self.context_length)[0], np.int32)
    return {"pixels": pixels, "mask": mask, "ids": ids, "chosen": np.int32(keep.index(chosen)), "ranks": out_ranks}


def process_shard(ds: grain.MapDataset, process_index: int | None = None, process_count: int | None = None):
  """This process's disjoint slice of a dataset: every process_count-th element from its index. `train_dataset`
  applies it to per-process batches, so global batch g is process 0's g-th batch, then process 1's, ..."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return ds[pi::pc]


def train_dataset(
  source,
  transform,
  *,
  global_batch_size: int,
  seed: int,
  num_epochs: int | None = 1,
  process_index: int | None = None,
  process_count: int | None = None,
  random: bool = False,
) -> grain.MapDataset:
  """Shuffled (a new order every epoch), repeated, transformed, batched (drop remainder), process-sharded.
  The per-process batch is global_batch_size / process_count: global batch g is records [g*B, (g+1)*B) of the
  shuffled stream, process p holding rows [p*B/P, (p+1)*B/P) of it — in the row order of a global array whose batch
  shards are laid out process after process (`parallel.put_batch`), the same batch one process would read. Only
  whole global batches are kept, so every process gets the same number of steps. With `random=True` the transform
  is called as `transform(record, rng)` with a numpy Generator that depends only on (seed, position in the global
  stream), so crops and noise seeds are the same whatever the number of processes and whenever a run resumes."""
  pc = jax.process_count() if process_count is None else process_count
  if global_batch_size % pc:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {pc} processes")
  ds = grain.MapDataset.source(source).shuffle(seed=seed)  # each repetition gets its own permutation
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.random_map(transform, seed=seed) if random else ds.map(transform)  # lazy: only this shard's are computed
  ds = ds[: len(ds) // global_batch_size * global_batch_size]
  return process_shard(ds.batch(global_batch_size // pc, drop_remainder=True), process_index, pc)


def eval_dataset(source, transform: RecordTransform, *, batch_size: int) -> grain.MapDataset:
  """In-order, unsharded, padded last batch (see `pad_batch`) for exact evaluation."""
  return grain.MapDataset.source(source).map(transform).batch(batch_size, drop_remainder=False)


def pad_batch(batch: dict, size: int) -> tuple[dict, int]:
  """Pads a short final batch to `size` rows (masked out); returns (batch, number of real rows)."""
  n = len(batch["chosen"])
  if n == size:
    return batch, n
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}, n


def to_iterator(ds: grain.MapDataset, *, prefetch_threads: int = 4, prefetch_buffer: int = 8):
  """A checkpointable iterator (`get_state` / `set_state`) with threaded prefetch."""
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=prefetch_buffer)))
