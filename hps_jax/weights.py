"""The published weights hps_jax knows by name, kept in a local cache and checked by sha256.

    from hps_jax.weights import resolve
    path = resolve("laion-aesthetic-linear")      # ~/.cache/hps_jax/laion-aesthetic-linear/sac+logos+...pth

Cache: `$HPS_JAX_CACHE`, else `~/.cache/hps_jax`; an entry lives at `CACHE/NAME/FILENAME` (one file) or `CACHE/NAME/`
(a Hugging Face repo dir). A file whose sha256 is published is checked against it; for the others the sha256 of
the first copy seen (downloaded, or placed there by hand) is *pinned* in `PATH.sha256.json` next to it and checked
from then on. The sidecar also records size and mtime, so a resolve re-hashes only a file that changed; `verify`
always re-hashes.

Downloads (never when `HF_HUB_OFFLINE=1` or `HPS_JAX_OFFLINE=1`): Hub entries through `huggingface_hub` (optional:
`pip install huggingface_hub`), URLs through `urllib.request`; into a temporary name next to the target, renamed into
place only after the sha256 check. Anything that cannot be resolved raises `WeightsError` with one line naming what
to download and the exact path to put it at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

from hps_jax import files
from hps_jax.errors import InputError

KINDS = ("hf_file", "hf_repo", "url", "manual")
_HF_CLIP_FILES = (
  "config.json",
  "model.safetensors",
  "vocab.json",
  "merges.txt",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "preprocessor_config.json",
)
_TOKENIZER_FILES = _HF_CLIP_FILES[2:]


class WeightsError(InputError):
  """A registry entry that is unknown, missing from the cache (and not downloadable now), or fails its sha256."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One published file (or Hugging Face repo dir).

  kind: hf_file (`filename` in Hub repo `location`), hf_repo (the `allow_patterns` files of Hub repo `location`,
  as a dir), url (`location` is the file's URL), manual (`location` is a page to download from by hand, e.g. a
  OneDrive share). sha256 / size: as published, else None (then pinned on first download). sha256_prefix: a
  published prefix of the sha256 (torch hub's file-name convention), checked when the full hash is unknown.
  format / tokenizer: hints for `Scorer.from_pretrained` (tokenizer: another entry's name)."""

  name: str
  description: str
  kind: str
  location: str
  filename: str | None = None
  sha256: str | None = None
  size: int | None = None
  licence: str | None = None
  allow_patterns: tuple[str, ...] = ()
  required: tuple[str, ...] = ("config.json",)
  sha256_prefix: str | None = None
  format: str = "auto"
  tokenizer: str | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind != "hf_repo" and not self.filename:
      raise ValueError(f"{self.name}: a {self.kind} entry needs a filename")

  @property
  def is_dir(self) -> bool:
    return self.kind == "hf_repo"

  @property
  def url(self) -> str:
    """Where to download it from (for a Hub entry: the file's resolve URL, or the repo page)."""
    if self.kind == "hf_file":
      return f"https://huggingface.co/{self.location}/resolve/main/{self.filename}"
    if self.kind == "hf_repo":
      return f"https://huggingface.co/{self.location}"
    return self.location


_AESTHETIC = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
_OPENAI_CLIP = "https://openaipublic.azureedge.net/clip/models/"  # + the file's sha256 + "/" + its name
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
_SD_FILES = (
  "model_index.json",
  "*/config.json",
  "scheduler/scheduler_config.json",
  "tokenizer/*",
  "text_encoder/model.safetensors",
  "unet/diffusion_pytorch_model.safetensors",
  "vae/diffusion_pytorch_model.safetensors",
)

REGISTRY: dict[str, Entry] = {
  e.name: e
  for e in (
    Entry(
      "hps-v1",
      "HPS v1 (Wu et al., ICCV 2023): OpenAI CLIP ViT-L/14 fine-tuned on human choices",
      "manual",
      "https://mycuhk-my.sharepoint.com/:u:/g/personal/1155172150_link_cuhk_edu_hk/"
      "EWDmzdoqa1tEgFIGgR5E7gYBTaQktJcxoOYRoTHWzwzNcw?e=b7rgYW",
      "hpc.pt",
      format="openai",
    ),
    Entry(
      "hps-v2",
      "HPS v2: open_clip ViT-H/14 fine-tuned on HPD v2",
      "hf_file",
      "xswu/HPSv2",
      "HPS_v2_compressed.pt",
      licence="Apache-2.0",
      format="open_clip",
    ),
    Entry(
      "hps-v2.1",
      "HPS v2.1: open_clip ViT-H/14 fine-tuned on HPD v2 (the v2 recommended release)",
      "hf_file",
      "xswu/HPSv2",
      "HPS_v2.1_compressed.pt",
      licence="Apache-2.0",
      format="open_clip",
    ),
    Entry(
      "clip-vit-l-14",
      "OpenAI CLIP ViT-L/14 (HF dir): the aesthetic heads' backbone, HPS v1's starting point",
      "hf_repo",
      "openai/clip-vit-large-patch14",
      licence="MIT",
      allow_patterns=_HF_CLIP_FILES,
      format="hf",
    ),
    Entry(
      "clip-rn50x64",
      "OpenAI CLIP RN50x64 (TorchScript archive, 448 px, read without torch): Table 2's CLIP RN50x64 baseline",
      "url",
      _OPENAI_CLIP + "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
      "RN50x64.pt",
      sha256="be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
      licence="MIT",
      format="openai",
    ),
    Entry(
      "clip-vit-l-14-openai",
      "OpenAI CLIP ViT-L/14 as `clip.load` downloads it (TorchScript archive, read without torch)",
      "url",
      _OPENAI_CLIP + "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
      "ViT-L-14.pt",
      sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
      licence="MIT",
      format="openai",
    ),
    Entry(
      "pickscore",
      "PickScore v1: CLIP ViT-H/14 fine-tuned on Pick-a-Pic (HF dir; tokenizer of laion-clip-vit-h-14-processor)",
      "hf_repo",
      "yuvalkirstain/PickScore_v1",
      allow_patterns=_HF_CLIP_FILES + ("pytorch_model.bin",),
      format="hf",
      tokenizer="laion-clip-vit-h-14-processor",
    ),
    Entry(
      "laion-clip-vit-h-14-processor",
      "tokenizer / preprocessor files of LAION CLIP ViT-H/14 (PickScore's processor; no weights)",
      "hf_repo",
      "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
      licence="MIT",
      allow_patterns=_TOKENIZER_FILES,
      required=("vocab.json", "merges.txt"),
    ),
    Entry(
      "laion-aesthetic-linear",
      "LAION improved aesthetic predictor, linear MLP head on CLIP ViT-L/14 embeddings",
      "url",
      _AESTHETIC + "sac+logos+ava1-l14-linearMSE.pth",
      "sac+logos+ava1-l14-linearMSE.pth",
      sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
      size=3714759,
      licence="Apache-2.0",
    ),
    Entry(
      "laion-aesthetic-relu",
      "LAION improved aesthetic predictor, ReLU MLP head on CLIP ViT-L/14 embeddings",
      "url",
      _AESTHETIC + "ava+logos-l14-reluMSE.pth",
      "ava+logos-l14-reluMSE.pth",
      sha256="0af3254c651d55b7ea851429c20f26ec880bb0169805a4df85b814bd7966f3e4",
      size=3714887,
      licence="Apache-2.0",
    ),
    Entry(
      "inception-fid",
      "FID Inception-v3 (TF 2015-12-05 graph, as pytorch-fid / torch-fidelity ship it)",
      "url",
      INCEPTION_URL,
      INCEPTION_FILE,
      licence="Apache-2.0",
      sha256_prefix="6726825d",
    ),
    Entry(
      "sd-v1-4",
      "Stable Diffusion v1.4 (diffusers dir: unet, vae, text_encoder, tokenizer, scheduler; gated on the Hub)",
      "hf_repo",
      "CompVis/stable-diffusion-v1-4",
      licence="CreativeML OpenRAIL-M",
      allow_patterns=_SD_FILES,
      required=("model_index.json",),
    ),
  )
}


# ------------------------------------------------------------------------------------------------------------
# cache layout and hashing
# ------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
  """$HPS_JAX_CACHE, else ~/.cache/hps_jax."""
  env = os.environ.get("HPS_JAX_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "hps_jax"


def offline() -> bool:
  """True when HF_HUB_OFFLINE or HPS_JAX_OFFLINE is set to a true value: nothing is downloaded."""
  return any(
    os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HPS_JAX_OFFLINE")
  )


def get(name: str | Entry) -> Entry:
  if isinstance(name, Entry):
    return name
  try:
    return REGISTRY[name]
  except KeyError:
    raise WeightsError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}") from None


def cache_path(name: str | Entry, cache: Path | None = None) -> Path:
  """Where the entry lives in the cache (whether or not it is there)."""
  e = get(name)
  root = Path(cache) if cache is not None else cache_dir()
  return root / e.name if e.is_dir else root / e.name / e.filename


def _sidecar(path: Path) -> Path:
  return path.with_name(path.name + ".sha256.json")


def _files(path: Path) -> list[Path]:
  """A dir entry's files (the Hub client's own `.cache` folder left out), sorted."""
  return sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts)


def sha256_of(path: Path) -> str:
  """sha256 of a file; of a dir: of its sorted `relative/path<TAB>sha256` lines."""
  path = Path(path)
  if path.is_dir():
    lines = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_of(p)}\n" for p in _files(path))
    return hashlib.sha256(lines.encode()).hexdigest()
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _stamp(path: Path) -> dict:
  files = _files(path) if path.is_dir() else [path]
  stats = [p.stat() for p in files]
  return {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _read_sidecar(path: Path) -> dict | None:
  try:
    return json.loads(_sidecar(path).read_text())
  except (OSError, ValueError):
    return None


def _write_sidecar(path: Path, sha: str, pinned: bool) -> None:
  files.write_text(_sidecar(path), json.dumps({"sha256": sha, "pinned": pinned, **_stamp(path)}) + "\n")


def expected_sha256(name: str | Entry, cache: Path | None = None) -> str | None:
  """The published sha256, else the one pinned in the cache, else None."""
  e = get(name)
  if e.sha256:
    return e.sha256
  side = _read_sidecar(cache_path(e, cache))
  return side.get("sha256") if side and side.get("pinned") else None


def is_present(name: str | Entry, cache: Path | None = None) -> bool:
  """The file (or, for a dir entry, its required files) is in the cache; says nothing about its hash."""
  e, path = get(name), cache_path(name, cache)
  return all((path / r).is_file() for r in e.required) if e.is_dir else path.is_file()


def _mismatch(e: Entry, path: Path, want: str, got: str, how: str) -> WeightsError:
  return WeightsError(f"{e.name}: {path} {how}: sha256 {got}, expected {want}; delete it and download {e.url} again")


def check(name: str | Entry, cache: Path | None = None, *, rehash: bool = False) -> str:
  """Checks a present cache entry against its published or pinned sha256 (pinning it if it has neither);
  returns the sha256. Re-hashes only when the file changed since the last check, or with rehash=True."""
  e, path = get(name), cache_path(name, cache)
  side = _read_sidecar(path)
  pinned = side.get("sha256") if side and side.get("pinned") else None
  want = e.sha256 or pinned
  if (
    not rehash
    and side
    and want
    and side.get("sha256") == want
    and {k: side.get(k) for k in ("size", "mtime_ns")} == _stamp(path)
  ):
    return want
  got = sha256_of(path)
  if want is None:
    _check_unpinned(e, path, got)
    _write_sidecar(path, got, pinned=True)
    return got
  if got != want:
    raise _mismatch(
      e, path, want, got, "was pinned at first download and has changed" if pinned and not e.sha256 else "is corrupt"
    )
  _write_sidecar(path, got, pinned=not e.sha256)
  return got


def _check_unpinned(e: Entry, path: Path, got: str) -> None:
  """What can be checked of a file without a known sha256: its published size and sha256 prefix."""
  if e.size is not None and not e.is_dir and path.stat().st_size != e.size:
    raise WeightsError(f"{e.name}: {path} has {path.stat().st_size} bytes, expected {e.size}; download {e.url} again")
  if e.sha256_prefix and not got.startswith(e.sha256_prefix):
    raise WeightsError(f"{e.name}: {path}: sha256 {got} does not start with the published {e.sha256_prefix}")


# ------------------------------------------------------------------------------------------------------------
# downloading
# ------------------------------------------------------------------------------------------------------------
def fetch_url(e: Entry, dest: Path) -> None:
  """Downloads `e.url` to `dest` (urllib; file:// works too). An HTML page (a login or consent wall) is refused."""
  with urllib.request.urlopen(e.url, timeout=60) as r, open(dest, "wb") as f:
    if "text/html" in (r.headers.get("Content-Type") or ""):
      raise OSError(f"{e.url} returned an HTML page, not the file")
    shutil.copyfileobj(r, f, 1 << 20)


def _hub():
  try:
    import huggingface_hub  # optional: only Hub downloads need it
  except ImportError:
    raise WeightsError(
      "downloading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub"
    ) from None
  return huggingface_hub


def fetch_hf_file(e: Entry, dest: Path) -> None:
  hub = _hub()
  with tempfile.TemporaryDirectory(dir=dest.parent) as d:
    got = Path(hub.hf_hub_download(e.location, e.filename, local_dir=d))
    os.replace(got, dest)


def fetch_hf_repo(e: Entry, dest: Path) -> None:
  hub = _hub()
  hub.snapshot_download(e.location, local_dir=dest, allow_patterns=list(e.allow_patterns) or None)
  shutil.rmtree(dest / ".cache", ignore_errors=True)


FETCHERS: dict[str, Callable[[Entry, Path], None]] = {
  "url": fetch_url,
  "hf_file": fetch_hf_file,
  "hf_repo": fetch_hf_repo,
}


def _where(e: Entry, path: Path) -> str:
  if e.is_dir:
    return f"download {', '.join(e.allow_patterns)} from {e.url} into {path}"
  return f"download {e.url} and put it at {path}"


def download(
  name: str | Entry, cache: Path | None = None, *, fetch: Callable[[Entry, Path], None] | None = None
) -> Path:
  """Downloads the entry into the cache: to a temporary name beside the target, sha256-checked (or pinned), then
  renamed into place. A failed or mismatching download leaves nothing behind. `fetch(entry, dest)` writes the
  file (or dir) at `dest`; default: by kind (FETCHERS)."""
  e, path = get(name), cache_path(name, cache)
  fetch = fetch or FETCHERS.get(e.kind)
  if fetch is None:
    raise WeightsError(f"{e.name}: not in the cache and not downloadable automatically; {_where(e, path)}")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
  try:
    if e.is_dir:
      tmp.mkdir(parents=True, exist_ok=True)
    fetch(e, tmp)
    got = sha256_of(tmp)
    if e.sha256 and got != e.sha256:
      raise WeightsError(f"{e.name}: downloaded {e.url} has sha256 {got}, expected {e.sha256}; refused (removed)")
    if not e.sha256:
      _check_unpinned(e, tmp, got)
    if path.is_dir():
      shutil.rmtree(path)
    os.replace(tmp, path)
  except WeightsError:
    raise
  except Exception as err:  # network, HTTP, Hub errors: one line naming what to do by hand
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise WeightsError(f"{e.name}: download failed ({msg}); {_where(e, path)}") from err
  finally:
    if tmp.is_dir():
      shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
      tmp.unlink()
  _write_sidecar(path, got, pinned=not e.sha256)
  return path


def resolve(
  name: str | Entry,
  *,
  cache: Path | None = None,
  download_missing: bool = True,
  fetch: Callable[[Entry, Path], None] | None = None,
) -> Path:
  """The checked cache path of a registry entry, downloading it first when it is missing (and not offline)."""
  e, path = get(name), cache_path(name, cache)
  if is_present(e, cache):
    check(e, cache)
    return path
  if not download_missing or offline():
    why = "offline (HF_HUB_OFFLINE / HPS_JAX_OFFLINE)" if offline() else "downloading is off (download_missing=False)"
    raise WeightsError(f"{e.name}: not in the cache and {why}; {_where(e, path)}")
  return download(e, cache, fetch=fetch)
