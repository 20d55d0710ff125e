"""The scoring API: HPS(img, prompt) = 100 * cos(enc_v(img), enc_t(prompt)), and the LAION aesthetic score.

    from hps_jax import Scorer
    scorer = Scorer.from_checkpoint("hpc.pt")                    # HPS v1; HF dirs, open_clip files work too
    hps = scorer.score(["a.png", "b.png"], "a red bicycle")      # np.ndarray, one value per image

HPS values only compare images *of the same prompt*: the text embedding sets an offset that differs per prompt.
`score` returns 100 * cosine (the paper's scale); `cosine` returns the raw cosine.

Batching: inputs are split into chunks of at most `batch_size`, each padded to the smallest of a few fixed bucket
sizes, so a long run compiles once per bucket and never per call. Chunks are sharded over all local devices
(pure data parallelism, parameters replicated).

Streaming (`iter_scores`): a pipeline keeps the device busy. Images are decoded and preprocessed by `workers` host
workers, threads or spawned processes (`worker_type`: "thread"; "process"; "auto", threads today: measured on a
2-core CPU, bench/score_e2e.py, threads decoded faster, as PIL releases the GIL and a process pool costs a start and
a copy of every array), up to `prefetch` chunks ahead of the chunk being computed; each chunk's forward pass is
dispatched (its host-to-device transfer included) before the previous chunk's results are fetched. Output order is
the input order; at most `prefetch` + 2 chunks of items are held at once; an unreadable image is reported in its
place; an exception, a stop signal or closing the stream early shuts the workers down (none is left running).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax import parallel, weights
from hps_jax.convert.aesthetic import load_aesthetic
from hps_jax.convert.clip import load_clip
from hps_jax.convert.io import CheckpointError
from hps_jax.data.images import ImageError, describe, load_image
from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.errors import check_stop
from hps_jax.models.clip import CLIP, normalize
from hps_jax.models.dtypes import as_dtype


def make_buckets(batch_size: int, divisor: int) -> tuple[int, ...]:
  """Bucket sizes: batch_size and its quarters down to the device count, all multiples of `divisor`."""
  top = -(-batch_size // divisor) * divisor
  sizes, b = {top}, top
  while b // 4 >= divisor:
    b //= 4
    sizes.add(-(-b // divisor) * divisor)
  sizes.add(divisor)
  return tuple(sorted(sizes))


class BucketedRunner:
  """Runs a jitted function over the leading axis of host arrays in fixed-size, sharded, padded chunks."""

  def __init__(self, fn: Callable, state, *, batch_size: int = 32, mesh=None, buckets: Sequence[int] | None = None):
    self.mesh = mesh if mesh is not None else parallel.local_mesh()
    div = parallel.batch_divisor(self.mesh)
    self.buckets = tuple(sorted(buckets)) if buckets else make_buckets(batch_size, div)
    if any(b % div for b in self.buckets):
      raise ValueError(f"bucket sizes {self.buckets} must be multiples of the {div} batch shards")
    self.batch_size = self.buckets[-1]
    self.state = parallel.shard_state(state, self.mesh)
    self.fn = jax.jit(fn)

  def bucket(self, n: int) -> int:
    return next(b for b in self.buckets if b >= n)

  def __call__(self, *arrays: np.ndarray) -> np.ndarray:
    return self.dispatch(*arrays).result()

  def dispatch(self, *arrays: np.ndarray) -> "_Pending":
    """Starts the computation (host-to-device transfer and the jitted calls, both asynchronous) and returns at
    once; `.result()` waits and gives what `__call__` gives."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start : start + self.batch_size] for a in arrays]
      m = len(chunk[0])
      b = self.bucket(m)
      padded = [np.concatenate([c, np.zeros((b - m,) + c.shape[1:], c.dtype)]) if b > m else c for c in chunk]
      outs.append((self.fn(self.state, *parallel.put_batch(self.mesh, padded)), m))
    return _Pending(outs)

  def compiled_variants(self) -> int:
    """How many shapes the function has been compiled for (one per bucket used)."""
    return self.fn._cache_size()


class _Pending:
  """Dispatched device computations of `BucketedRunner.dispatch`; `result()` fetches them as host numpy."""

  def __init__(self, outs):
    self._outs = outs

  def result(self):
    outs = [jax.tree.map(lambda o, m=m: np.asarray(o)[:m], out) for out, m in self._outs]
    if not outs:
      return None
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _load_preprocessed(sources, preprocess: PreprocessConfig, workers: int, load: Callable | None = None):
  """Decodes and preprocesses images on host threads (PIL releases the GIL while decoding and resizing).
  Returns (array or None, error or None) per source, in order. `preprocess`: anything with `apply(uint8 image)`;
  `load`: the decoder (default `load_image`, looked up at call time)."""
  load = load or load_image

  def one(src):
    try:
      return preprocess.apply(load(src)), None
    except ImageError as e:
      return None, e

  if workers <= 1 or len(sources) <= 1:
    return [one(s) for s in sources]
  with cf.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(one, sources))


WORKER_TYPES = ("auto", "thread", "process")
# sources a worker process gets cheaply and by value: a path, or encoded image bytes (file objects cannot be
# pickled; in-memory images and arrays would cost more to send than to decode): other chunks go to threads
_ENCODED = (str, os.PathLike, bytes, bytearray)


def _decode_many(load, preprocess, sources) -> list:
  """The generic decode task: (preprocessed array or None, ImageError or None) per source. `load` None: the
  module's `load_image`, looked up at call time."""
  out = []
  for src in sources:
    try:
      out.append((preprocess.apply((load or load_image)(src)), None))
    except ImageError as e:
      out.append((None, e))
  return out


def _result(future):
  """The future's result; waits in short steps so a stop signal (`check_stop`) is noticed while waiting."""
  while not cf.wait([future], timeout=0.25).done:
    check_stop()
  try:
    return future.result()
  except cf.BrokenExecutor as e:
    raise RuntimeError(
      "an image decoding worker died (killed, out of memory, or started from a script without an "
      "`if __name__ == '__main__':` guard, which spawned workers import): pass worker_type='thread' to decode on "
      "threads"
    ) from e


class _Batch:
  """Some images of a chunk, decoded by one task; `result()` -> [(array or None, ImageError or None)]."""

  def __init__(self, decoder, sources, future, light: bool):
    self.decoder, self.sources, self.future, self.light = decoder, sources, future, light

  def result(self) -> list:
    if not self.light:
      return _result(self.future)
    try:
      return [(row, None) for row in _result(self.future)]
    except ImageError:  # `apply_batch` stops at the first unreadable image: decode one by one to tell which
      singles = [self.decoder.submit_light([src]) for src in self.sources]
      out = []
      for f in singles:
        try:
          out.append((_result(f)[0], None))
        except ImageError as e:
          out.append((None, e))
      return out


class _Decoder:
  """The decode workers of one stream: `workers` threads, or `workers` spawned processes (never forked: the parent
  runs JAX's threads). Processes take the chunks whose sources are paths / encoded bytes, in batches of a few
  images; with the default decoder and a PreprocessConfig they run `PreprocessConfig.apply_batch`, whose module
  (numpy + PIL) imports without JAX; a custom `load` or preprocessing runs `_decode_many`, which imports this
  module in each worker. Pools start on first use; `close` shuts them down, cancelling what has not started."""

  def __init__(self, preprocess, workers: int, load, worker_type: str):
    if worker_type not in WORKER_TYPES:
      raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got {worker_type!r}")
    self.preprocess, self.load, self.worker_type = preprocess, load, worker_type
    self.workers = max(1, int(workers))
    self.light = load is None and type(preprocess) is PreprocessConfig
    self.kind = None if worker_type == "auto" else worker_type
    self._threads = self._procs = None

  def resolve(self, first_chunk, more: bool) -> str:
    """`auto`: threads. Measured (bench/score_e2e.py, 2-core CPU, 512 px JPEGs): 2 threads decode 737 images/s, 2
    processes 499 (each run pays the pool's start, about 0.4 s, and a copy of every array between processes). A
    machine where the GIL-held part of decoding limits threads (many workers) may do better with "process"; this
    is where a rule for it would go (`first_chunk`, `more`: whether the stream is longer than one chunk)."""
    if self.kind is None:
      self.kind = "thread"
    return self.kind

  def _process_pool(self):
    if self._procs is None:
      self._procs = cf.ProcessPoolExecutor(
        self.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=signal.signal,  # Ctrl-C reaches the whole process group: the parent stops the workers
        initargs=(signal.SIGINT, signal.SIG_IGN),
      )
    return self._procs

  def submit_light(self, sources):
    return self._process_pool().submit(self.preprocess.apply_batch, sources)

  def submit(self, sources: list) -> list:
    """Starts decoding `sources`; returns their `_Batch`es, in order."""
    if self.kind == "process" and all(isinstance(src, _ENCODED) for src in sources):
      size = max(1, -(-len(sources) // (2 * self.workers)))  # two batches per worker per chunk: balanced, and
      parts = [sources[i : i + size] for i in range(0, len(sources), size)]  # few messages between processes
      if self.light:
        return [_Batch(self, p, self.submit_light(p), True) for p in parts]
      task = functools.partial(_decode_many, self.load, self.preprocess)
      return [_Batch(self, p, self._process_pool().submit(task, p), False) for p in parts]
    if self._threads is None:
      self._threads = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="hps-decode")
    return [
      _Batch(self, [src], self._threads.submit(_decode_many, self.load, self.preprocess, [src]), False)
      for src in sources
    ]

  def close(self) -> None:
    for pool in (self._threads, self._procs):
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    self._threads = self._procs = None


def _finish(chunk, errors, ok, out):
  """The rows of a computed chunk: waits for its (possibly still running) computation."""
  values = {}
  if ok:
    out = out.result() if isinstance(out, _Pending) else out
    values = dict(zip(ok, out if isinstance(out, list) else np.asarray(out).tolist()))
  for i, (src, extra) in enumerate(chunk):
    yield src, extra, values.get(i), errors[i]


def _stream(
  items,
  batch_size,
  preprocess,
  workers,
  compute,
  *,
  collate: Callable = np.stack,
  load=None,
  worker_type: str = "auto",
  prefetch: int = 2,
):
  """Shared streaming loop of the scorers: chunks of `batch_size` (source, extra) items are decoded by `workers`
  host workers (`worker_type`: thread, process, or auto: see `_Decoder.resolve`), the readable ones go through
  `compute(collate(preprocessed), extras)`, which returns one value per readable item (an array, a list of any
  values, or the `_Pending` of a `BucketedRunner.dispatch`); yields (source, extra, value, error), in input order.
  `collate` (default np.stack) and `load` (default `load_image`) let `hps_jax.metrics.multiscore` feed several
  scorers from one decode.

  Pipeline: up to `prefetch` chunks are decoding while one is computed; a chunk is dispatched before the rows of
  the previous one are fetched and yielded, so at most `prefetch` + 2 chunks of items are held. An exception from
  `items` or `compute` comes after the rows of the chunks before it (as without the pipeline); the workers are
  shut down however the stream ends (exhausted, an exception, KeyboardInterrupt, a stop signal, `close()`)."""
  if prefetch < 1:
    raise ValueError(f"prefetch must be >= 1, got {prefetch}")
  items = iter(items)
  decoder = _Decoder(preprocess, workers, load, worker_type)
  pending = collections.deque()  # (chunk, batches) being decoded, oldest first
  deferred = []  # an exception raised by `items`, raised once the chunks read before it are out

  def read() -> list:
    chunk = []
    if deferred:
      return chunk
    try:
      for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
          break
    except Exception as e:  # a partial chunk before a failing item is dropped, as the sequential loop did
      deferred.append(e)
      return []
    return chunk

  def fill():
    while len(pending) < prefetch:
      chunk = read()
      if not chunk:
        return
      if decoder.kind is None:
        nxt = read() if len(chunk) == batch_size else []
        decoder.resolve(chunk, bool(nxt))
        pending.append((chunk, decoder.submit([src for src, _ in chunk])))
        chunk = nxt
        if not chunk:
          return
      pending.append((chunk, decoder.submit([src for src, _ in chunk])))

  prev = None  # (chunk, errors, ok, dispatched output): rows not yet yielded
  try:
    fill()
    while pending:
      check_stop()
      chunk, batches = pending.popleft()
      loaded = [r for b in batches for r in b.result()]
      del batches
      fill()  # the next chunks decode while this one computes
      ok = [i for i, (_, err) in enumerate(loaded) if err is None]
      out = compute(collate([loaded[i][0] for i in ok]), [chunk[i][1] for i in ok]) if ok else None
      errors = [err for _, err in loaded]
      del loaded
      if prev is not None:
        done, prev = prev, None
        yield from _finish(*done)
      prev = (chunk, errors, ok, out)
    if prev is not None:
      done, prev = prev, None
      yield from _finish(*done)
    if deferred:
      raise deferred[0]
  except Exception:
    if prev is not None:  # rows computed before the failure come out first
      done, prev = prev, None
      yield from _finish(*done)
    raise
  finally:
    decoder.close()


def _default_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def _check_worker_type(worker_type: str) -> str:
  if worker_type not in WORKER_TYPES:
    raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got {worker_type!r}")
  return worker_type


class Scorer:
  """HPS scorer around a CLIP model. See the module docstring."""

  checkpoint: str | None = None  # where the model was loaded from (`from_checkpoint`), named in errors

  def __init__(
    self,
    model: CLIP,
    tokenizer: CLIPTokenizer,
    preprocess: PreprocessConfig | str = "pad",
    *,
    batch_size: int = 32,
    mesh=None,
    buckets: Sequence[int] | None = None,
    workers: int | None = None,
    worker_type: str = "auto",
  ):
    self.config = model.config
    self.tokenizer = tokenizer
    self.preprocess = (
      preprocess
      if isinstance(preprocess, PreprocessConfig)
      else PreprocessConfig(mode=preprocess, size=model.config.image_size)
    )
    if self.preprocess.size != model.config.image_size:
      raise ValueError(f"preprocess size {self.preprocess.size} != model image size {model.config.image_size}")
    self.workers = workers or _default_workers()
    self.worker_type = _check_worker_type(worker_type)
    graphdef, state = nnx.split(model)

    def cos_fn(state, pixels, ids):
      m = nnx.merge(graphdef, state)
      img, txt = normalize(m.encode_image(pixels)), normalize(m.encode_text(ids))
      return jnp.sum(img * txt, axis=-1)

    def image_fn(state, pixels):
      return normalize(nnx.merge(graphdef, state).encode_image(pixels))

    def text_fn(state, ids):
      return normalize(nnx.merge(graphdef, state).encode_text(ids))

    kw = dict(batch_size=batch_size, mesh=mesh, buckets=buckets)
    self._cos = BucketedRunner(cos_fn, state, **kw)
    self._img = BucketedRunner(image_fn, state, **kw)
    self._txt = BucketedRunner(text_fn, state, **kw)

  # construction ----------------------------------------------------------------------------------------------
  @classmethod
  def from_checkpoint(
    cls,
    path,
    format: str = "auto",
    preprocess: str | PreprocessConfig = "pad",
    dtype=None,
    *,
    tokenizer=None,
    activation: str | None = None,
    batch_size: int = 32,
    param_dtype=None,
    mesh=None,
    buckets=None,
    workers: int | None = None,
    worker_type: str = "auto",
  ) -> "Scorer":
    """Loads a CLIP/HPS checkpoint (HF dir, OpenAI-layout `hpc.pt`, open_clip `HPS_v2*.pt`, safetensors).
    `tokenizer`: a CLIPTokenizer, a BPE file / HF tokenizer dir path, or None (the checkpoint dir's own
    tokenizer — vocab.json + merges.txt, or tokenizer.json — if it has one, else the default CLIP BPE file).
    `workers` / `worker_type`: the host decode workers of `iter_scores` (module docstring).
    Raises CheckpointError when the tokenizer has ids beyond the checkpoint's token embedding table."""

    model = load_clip(path, format, activation=activation, dtype=as_dtype(dtype), param_dtype=as_dtype(param_dtype))
    tok = resolve_tokenizer(tokenizer, path)
    check_token_ids([max(tok.vocab.values()), tok.pad_id], model.config.vocab_size, tok, path)
    kw = dict(batch_size=batch_size, mesh=mesh, buckets=buckets, workers=workers, worker_type=worker_type)
    scorer = cls(model, tok, preprocess, **kw)
    scorer.checkpoint = str(path)
    return scorer

  # scoring ---------------------------------------------------------------------------------------------------
  def prepare_images(self, images) -> np.ndarray:
    """Paths / bytes / PIL images / uint8 arrays -> preprocessed (N, S, S, 3) float32. Raises ImageError."""
    out = list(_checked(_load_preprocessed(list(images), self.preprocess, self.workers)))
    return np.stack(out) if out else np.zeros((0, self.preprocess.size, self.preprocess.size, 3), np.float32)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    ids = np.asarray(self.tokenizer(list(prompts), context_length=self.config.context_length), np.int32)
    check_token_ids(ids, self.config.vocab_size, self.tokenizer, self.checkpoint)
    return ids

  def cosine(self, images, prompts) -> np.ndarray:
    images = _as_list(images)
    prompts = _broadcast_prompts(prompts, len(images))
    if not images:
      return np.zeros((0,), np.float32)
    return self.cosine_arrays(self.prepare_images(images), self.tokenize(prompts))

  def score(self, images, prompts) -> np.ndarray:
    """HPS = 100 * cosine, one value per image."""
    return 100.0 * self.cosine(images, prompts)

  def cosine_arrays(self, pixels: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Cosine for already preprocessed pixels (N, S, S, 3) and token ids (N, T)."""
    return self._dispatch_cosine(pixels, token_ids).result()

  def _dispatch_cosine(self, pixels, token_ids) -> _Pending:
    token_ids = np.asarray(token_ids, np.int32)
    check_token_ids(token_ids, self.config.vocab_size, self.tokenizer, self.checkpoint)
    return self._cos.dispatch(np.asarray(pixels, np.float32), token_ids)

  def embed_images(self, images) -> np.ndarray:
    """L2-normalized image embeddings."""
    return self._img(self.prepare_images(_as_list(images)))

  def embed_texts(self, prompts) -> np.ndarray:
    """L2-normalized text embeddings."""
    return self._txt(self.tokenize(_broadcast_prompts(prompts, None)))

  def iter_scores(self, items: Iterable[tuple[object, str]]) -> Iterator[dict]:
    """Streams (image, prompt) pairs; yields one dict per pair, in order: {'image', 'prompt', 'hps', 'cosine'}
    or {'image', 'prompt', 'error'} for an image that could not be read (the run goes on). Images are decoded by
    `workers` host workers while the device computes (module docstring)."""

    def compute(pixels, prompts):
      return self._dispatch_cosine(pixels, self.tokenize(prompts))

    stream = _stream(items, self._cos.batch_size, self.preprocess, self.workers, compute, worker_type=self.worker_type)
    for src, prompt, cos, err in stream:
      if err is None:
        yield {"image": describe(src), "prompt": prompt, "hps": 100.0 * float(cos), "cosine": float(cos)}
      else:
        yield {"image": describe(src), "prompt": prompt, "error": str(err)}

  @property
  def compiled_variants(self) -> int:
    return self._cos.compiled_variants()

  @property
  def batch_size(self) -> int:
    """The largest chunk one forward pass takes (the top bucket)."""
    return self._cos.batch_size

  # registry and description ---------------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, name, **kw) -> "Scorer":
    """A scorer of published weights by name (`hps_jax.weights.REGISTRY`: hps-v1, hps-v2, hps-v2.1, pickscore,
    clip-vit-l-14), taken from the cache (`$HPS_JAX_CACHE`, sha256-checked) or downloaded into it; a checkpoint
    path works too. `kw`: `from_checkpoint`'s arguments. Raises `WeightsError` (one line: what to download, where
    to put it) when the weights are not available."""
    path, source = _pretrained_path(name)
    entry = weights.REGISTRY.get(str(name))
    if entry is not None:
      kw.setdefault("format", entry.format)
      if entry.tokenizer and kw.get("tokenizer") is None:
        kw["tokenizer"] = weights.resolve(entry.tokenizer)
    scorer = cls.from_checkpoint(path, **kw)
    scorer._source, scorer._dtype = source, kw.get("dtype")
    return scorer

  def __repr__(self) -> str:
    c = self.config
    arch = f"vision {c.vision_arch}, text {c.text_layers}x{c.text_width}, embed {c.embed_dim}, {c.activation}"
    return (
      f"Scorer(source={getattr(self, '_source', 'in-memory model')!r}, arch={arch!r}, "
      f"preprocess={_describe_preprocess(self.preprocess)!r}, {_describe_dtype(self, self._cos.state)}, "
      f"batch_size={self._cos.batch_size})"
    )


class AestheticScorer:
  """LAION aesthetic predictor: an MLP on the L2-normalized image embedding of OpenAI CLIP ViT-L/14.
  Uses CLIP's own preprocessing (`clip`: short-side resize + center crop) by default, as the predictor was fit."""

  def __init__(
    self,
    clip_model: CLIP,
    mlp,
    preprocess: PreprocessConfig | str = "clip",
    *,
    batch_size: int = 32,
    mesh=None,
    buckets=None,
    workers: int | None = None,
    worker_type: str = "auto",
  ):
    if mlp.dims[0] != clip_model.config.embed_dim:
      raise ValueError(
        f"aesthetic MLP expects {mlp.dims[0]}-d embeddings, the CLIP model gives "
        f"{clip_model.config.embed_dim}-d (the published heads need ViT-L/14)"
      )
    self.preprocess = (
      preprocess
      if isinstance(preprocess, PreprocessConfig)
      else PreprocessConfig(mode=preprocess, size=clip_model.config.image_size)
    )
    self.workers = workers or _default_workers()
    self.worker_type = _check_worker_type(worker_type)
    graphdef, state = nnx.split((clip_model, mlp))

    def fn(state, pixels):
      clip, head = nnx.merge(graphdef, state)
      return head(normalize(clip.encode_image(pixels)))

    self._run = BucketedRunner(fn, state, batch_size=batch_size, mesh=mesh, buckets=buckets)

  @classmethod
  def from_checkpoint(cls, mlp_path, clip_path, clip_format: str = "auto", dtype=None, **kw) -> "AestheticScorer":

    return cls(load_clip(clip_path, clip_format, dtype=as_dtype(dtype)), load_aesthetic(mlp_path), **kw)

  @property
  def batch_size(self) -> int:
    """The largest chunk one forward pass takes (the top bucket)."""
    return self._run.batch_size

  def score_arrays(self, pixels: np.ndarray) -> np.ndarray:
    """Aesthetic rating for already preprocessed pixels (N, S, S, 3)."""
    return self._run(np.asarray(pixels, np.float32))

  def score(self, images) -> np.ndarray:
    """Aesthetic rating (about 1-10) per image. Raises ImageError for an unreadable image."""
    images = _as_list(images)
    pixels = [arr for arr in _checked(_load_preprocessed(images, self.preprocess, self.workers))]
    if not pixels:
      return np.zeros((0,), np.float32)
    return self._run(np.stack(pixels))

  def iter_scores(self, images: Iterable) -> Iterator[dict]:
    """Yields {'image', 'aesthetic'} or {'image', 'error'} per image, in order."""
    for src, _, value, err in _stream(
      ((img, None) for img in images),
      self._run.batch_size,
      self.preprocess,
      self.workers,
      lambda pixels, _: self._run.dispatch(np.asarray(pixels, np.float32)),
      worker_type=self.worker_type,
    ):
      yield (
        {"image": describe(src), "aesthetic": float(value)}
        if err is None
        else {"image": describe(src), "error": str(err)}
      )

  @classmethod
  def from_pretrained(
    cls, name="laion-aesthetic-linear", clip="clip-vit-l-14", clip_format: str = "auto", dtype=None, **kw
  ) -> "AestheticScorer":
    """The aesthetic predictor of published weights by name (`hps_jax.weights.REGISTRY`: laion-aesthetic-linear
    or laion-aesthetic-relu on clip-vit-l-14), from the cache or downloaded into it (sha256-checked); checkpoint
    paths work too. `kw`: the constructor's arguments."""
    mlp_path, mlp_source = _pretrained_path(name)
    clip_path, clip_source = _pretrained_path(clip)
    scorer = cls.from_checkpoint(mlp_path, clip_path, clip_format, dtype, **kw)
    scorer._source, scorer._dtype = f"{mlp_source} on {clip_source}", dtype
    return scorer

  def __repr__(self) -> str:
    kernels = [
      leaf.shape
      for path, leaf in jax.tree_util.tree_flatten_with_path(self._run.state[1])[0]
      if "kernel" in [getattr(k, "key", None) for k in path] and getattr(leaf, "ndim", 0) == 2
    ]
    dims = [k[0] for k in kernels[:1]] + [k[1] for k in kernels]
    return (
      f"AestheticScorer(source={getattr(self, '_source', 'in-memory model')!r}, "
      f"arch={'CLIP image embedding -> MLP ' + '-'.join(map(str, dims))!r}, "
      f"preprocess={_describe_preprocess(self.preprocess)!r}, {_describe_dtype(self, self._run.state)}, "
      f"batch_size={self._run.batch_size})"
    )


def _pretrained_path(name) -> tuple[Path, str]:
  """(path, description) of a registry name (resolved through the cache) or an existing checkpoint path."""
  if str(name) in weights.REGISTRY:
    path = weights.resolve(str(name))
    return path, f"{name} ({path})"
  if Path(name).exists():
    return Path(name), str(name)
  raise weights.WeightsError(
    f"{name!r} is neither a known weights name ({', '.join(weights.REGISTRY)}) nor an existing checkpoint path"
  )


def _describe_preprocess(p: PreprocessConfig) -> str:
  return f"{p.mode} {p.size}px" + (" upscale" if p.upscale else "")


def _describe_dtype(scorer, state) -> str:
  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
  params = str(leaves[0].dtype) if leaves else "?"
  compute = getattr(scorer, "_dtype", None)
  dtype = jnp.dtype(as_dtype(compute)).name if compute is not None else params
  return f"dtype={dtype!r}, params={params!r}"


def _checked(loaded):
  for arr, err in loaded:
    if err is not None:
      raise err
    yield arr


def resolve_tokenizer(tokenizer, checkpoint=None) -> CLIPTokenizer:
  """`tokenizer` itself, a tokenizer file / dir path, else the checkpoint dir's own Hugging Face tokenizer
  (vocab.json + merges.txt, or tokenizer.json), else the default CLIP BPE file. Prints "tokenizer: <source>"
  on stderr."""
  if isinstance(tokenizer, CLIPTokenizer):
    tok = tokenizer
  elif tokenizer is not None:
    tok = CLIPTokenizer.from_path(tokenizer)
  else:
    d = Path(checkpoint) if checkpoint is not None else None
    has_own = (
      d is not None
      and d.is_dir()
      and ((d / "tokenizer.json").exists() or ((d / "vocab.json").exists() and (d / "merges.txt").exists()))
    )
    tok = CLIPTokenizer.from_hf_dir(d) if has_own else CLIPTokenizer.default()
  print(f"tokenizer: {getattr(tok, 'source', tok)}", file=sys.stderr)
  return tok


def check_token_ids(ids, vocab_size: int, tokenizer, checkpoint=None) -> None:
  """Raises CheckpointError when a token id does not index the `vocab_size`-row text embedding table (a
  tokenizer that does not belong to the checkpoint): an out-of-range id would silently give NaN scores."""
  top = int(np.max(ids)) if np.size(ids) else -1
  low = int(np.min(ids)) if np.size(ids) else 0
  if top >= vocab_size or low < 0:
    bad = top if top >= vocab_size else low
    raise CheckpointError(
      f"tokenizer {getattr(tokenizer, 'source', tokenizer)} gives token id {bad}, but checkpoint "
      f"{checkpoint or '(in memory)'} has a {vocab_size}-token text embedding table (ids 0..{vocab_size - 1}): "
      "pass the checkpoint's own tokenizer (--tokenizer / tokenizer=)"
    )


def _as_list(images) -> list:
  if isinstance(images, np.ndarray) and images.ndim == 4:
    return list(images)
  if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
    return [images]
  return list(images)


def _broadcast_prompts(prompts, n: int | None) -> list[str]:
  if isinstance(prompts, str):
    return [prompts] * (1 if n is None else n)
  prompts = list(prompts)
  if n is not None and len(prompts) != n:
    raise ValueError(f"got {len(prompts)} prompts for {n} images: pass one prompt, or one per image")
  bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
  if bad:
    raise TypeError(f"prompts must be strings; entries {bad[:5]} are not")
  return prompts
