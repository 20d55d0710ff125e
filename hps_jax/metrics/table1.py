"""The paper's Table 1: Inception Score and FID of the images humans preferred vs the images they did not.

Per record of a preference dataset, the preferred image is the chosen one; the non-preferred images are those
ranked worse than it (images tied with the chosen one belong to neither subset). From each subset's pool a seeded
permutation (without replacement) takes the first `num_is` images for IS and the first `num_fid` for FID (fewer
when the pool is smaller; the FID sample is a prefix of the IS sample or the other way round). The sampled images
(encoded bytes in the records) are written to files with a JSONL of {"image", "prompt", "record", "index"} rows per
sample, and measured by `hps_jax.metrics.compute.generator_metrics` exactly as `hps-jax metrics --images
SAMPLE.jsonl --metrics is,fid --reference REF` would; the reference's Inception statistics are computed once.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from hps_jax.data.skips import Skips
from hps_jax.metrics import compute

SUBSETS = ("preferred", "non_preferred")
_LABELS = {"preferred": "preferred", "non_preferred": "non-preferred"}


def subset_pools(source) -> dict[str, list[tuple[int, int]]]:
  """(record index, image index) of every preferred and every non-preferred image of a source of records."""
  pools: dict[str, list[tuple[int, int]]] = {s: [] for s in SUBSETS}
  for i in range(len(source)):
    rec = source[i]
    chosen = int(rec["chosen"])
    ranks = np.asarray(rec["ranks"])
    pools["preferred"].append((i, chosen))
    pools["non_preferred"].extend((i, j) for j in range(len(rec["images"])) if ranks[j] > ranks[chosen])
  return pools


def sample_order(pool_size: int, seed: int, subset: str) -> np.ndarray:
  """The seeded permutation of a subset's pool (a pure function of seed and subset); samples are its prefixes."""
  return np.random.default_rng([seed, SUBSETS.index(subset)]).permutation(pool_size)


def _extension(data: bytes) -> str:
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return ".png"
  if data[:3] == b"\xff\xd8\xff":
    return ".jpg"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return ".webp"
  return ".img"  # decoded by content all the same (`hps_jax.data.images.load_image`)


def write_samples(source, picks: dict[str, list[tuple[int, int]]], out_dir) -> dict[str, Path]:
  """Writes the picked images of each subset as OUT/<subset>/NNNNNN.<ext> (in pick order) and OUT/<subset>.jsonl
  rows {"image" (relative to OUT), "prompt", "record", "index"}; every record is read once. -> subset: JSONL."""
  out = Path(out_dir)
  wanted: dict[int, list[tuple[str, int, int]]] = {}
  for subset, pick in picks.items():
    (out / subset).mkdir(parents=True, exist_ok=True)
    for k, (i, j) in enumerate(pick):
      wanted.setdefault(i, []).append((subset, k, j))
  rows: dict[str, list] = {s: [None] * len(p) for s, p in picks.items()}
  for i in sorted(wanted):
    rec = source[i]
    for subset, k, j in wanted[i]:
      data = bytes(rec["images"][j])
      name = f"{subset}/{k:06d}{_extension(data)}"
      (out / name).write_bytes(data)
      rows[subset][k] = {"image": name, "prompt": str(rec["prompt"]), "record": i, "index": j}
  files = {}
  for subset, subset_rows in rows.items():
    files[subset] = out / f"{subset}.jsonl"
    files[subset].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in subset_rows), encoding="utf-8")
  return files


def _prefix_jsonl(path: Path, n: int, dest: Path) -> Path:
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  dest.write_text("".join(lines[:n]), encoding="utf-8")
  return dest


def table1(
  source,
  reference,
  inception,
  *,
  num_is: int = 20000,
  num_fid: int = 10000,
  seed: int = 0,
  resize: str = "tf1",
  batch_size: int = 50,
  is_splits: int = 10,
  inception_sha256: str | None = None,
  samples_dir=None,
) -> dict:
  """IS (mean, std over `is_splits` splits) and FID against `reference` (an image directory, a JSONL of {image}
  rows or a stats .npz) of the preferred and the non-preferred images of `source`. The samples are written to
  `samples_dir` (kept; per subset <subset>.jsonl names every sampled image, <subset>_is.jsonl and
  <subset>_fid.jsonl the two samples) or to a temporary folder. Raises ValueError for an empty subset or a FID
  sample of fewer than two images."""
  if num_is < 1 or num_fid < 1 or is_splits < 1 or seed < 0:
    raise ValueError("num_is, num_fid and is_splits must be >= 1 and seed >= 0")
  pools = subset_pools(source)
  for subset, pool in pools.items():
    if len(pool) < 2:
      raise ValueError(f"the dataset has {len(pool)} {_LABELS[subset]} image(s); Table 1 needs at least two")
  sizes = {s: (min(num_is, len(p)), min(num_fid, len(p))) for s, p in pools.items()}
  picks = {}
  for subset, pool in pools.items():
    order = sample_order(len(pool), seed, subset)[: max(sizes[subset])]
    picks[subset] = [pool[x] for x in order]
  result: dict = {
    "reference": str(reference),
    "seed": seed,
    "num_is": num_is,
    "num_fid": num_fid,
    "is_splits": is_splits,
    "resize": resize,
  }
  with tempfile.TemporaryDirectory(prefix="hps_table1_") as tmp:
    root = Path(samples_dir) if samples_dir is not None else Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    files = write_samples(source, picks, root)
    skipped = Skips()
    ref = reference
    if not str(reference).endswith(".npz"):  # the reference's statistics once, for both subsets
      _, _, run = compute.reference_stats(
        reference, inception, skipped, resize=resize, batch_size=batch_size, inception_sha256=inception_sha256
      )
      ref = Path(tmp) / "reference.npz"
      run.stats.save(ref, compute.stats_meta(resize=resize, inception_sha256=inception_sha256, num_images=run.count))
      result["num_reference"] = run.count
    common = dict(inception=inception, resize=resize, batch_size=batch_size, is_splits=is_splits,
                  inception_sha256=inception_sha256)  # fmt: skip
    for subset in SUBSETS:
      n_is, n_fid = sizes[subset]
      is_file = _prefix_jsonl(files[subset], n_is, root / f"{subset}_is.jsonl")
      fid_file = _prefix_jsonl(files[subset], n_fid, root / f"{subset}_fid.jsonl")
      is_items = compute.list_images(is_file, skipped)
      if n_is == n_fid:
        both = compute.generator_metrics(is_items, ["is", "fid"], skipped, reference=ref, **common)
        measured = {"is": both, "fid": both}
      else:
        fid_items = compute.list_images(fid_file, skipped)
        measured = {
          "is": compute.generator_metrics(is_items, ["is"], skipped, **common),
          "fid": compute.generator_metrics(fid_items, ["fid"], skipped, reference=ref, **common),
        }
      result[subset] = {
        "pool": len(pools[subset]),
        "num_is": measured["is"]["num_images"],
        "num_fid": measured["fid"]["num_images"],
        "is_mean": measured["is"]["is_mean"],
        "is_std": measured["is"]["is_std"],
        "fid": measured["fid"]["fid"],
      }
      if samples_dir is not None:
        result[subset]["samples"] = {"is": str(is_file), "fid": str(fid_file)}
  result["skipped"] = [{"what": w, "why": y} for w, y in skipped.items]
  return result


def markdown(result: dict, title: str = "Table 1") -> str:
  """The result laid out like the paper's Table 1: rows preferred / non-preferred, columns IS and FID."""
  lines = [f"### {title}", "", "| images | IS | FID |", "|---|---|---|"]
  for subset in SUBSETS:
    r = result[subset]
    lines.append(f"| {_LABELS[subset]} | {r['is_mean']:.2f} ± {r['is_std']:.2f} | {r['fid']:.2f} |")
  lines += [
    "",
    f"IS over {result['is_splits']} splits of {result['preferred']['num_is']:,} / "
    f"{result['non_preferred']['num_is']:,} images, FID of {result['preferred']['num_fid']:,} / "
    f"{result['non_preferred']['num_fid']:,} images against {result['reference']} (seed {result['seed']}).",
  ]
  return "\n".join(lines) + "\n"
