"""CLIP byte-level BPE tokenizer (49,408 tokens, context 77), pure Python, no torch.

Sources, all offline:
  * a BPE merges file `bpe_simple_vocab_16e6.txt.gz` (the one OpenAI CLIP and open_clip ship; open_clip's wheel
    carries it, so `CLIPTokenizer.default()` finds it when open_clip is installed, or via $HPS_JAX_BPE);
  * a Hugging Face tokenizer dir (`vocab.json` + `merges.txt`, or `tokenizer.json`) as saved next to a
    `CLIPModel` (PickScore, openai/clip-vit-large-patch14).

Text cleaning differs between the two ecosystems and changes ids for some inputs, so it is a choice:
  clean="open_clip"  ftfy.fix_text, HTML-unescape twice, collapse whitespace, lower-case (OpenAI CLIP, open_clip,
                     HPS v1/v2 — the default for BPE files);
  clean="hf"         NFC, collapse whitespace, lower-case (transformers' CLIPTokenizer — the default for HF dirs).
Each sequence is [start] + tokens + [end], truncated to the context length keeping the end token, then padded
with `pad_id` (0 in OpenAI/open_clip, the end token in HF). Padding never changes CLIP's text embedding: it sits
after the end token, which the causal mask protects and the pooling reads.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
_WORD_SUFFIX = "</w>"
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
  """The reversible byte -> printable unicode character map of byte-level BPE: the 188 printable latin-1 bytes map
  to themselves, the other 68 to code points from 256 upward, in byte order. The dict's order (printable bytes
  first, then the others) is the order of the first 256 vocabulary entries."""
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  table = {b: chr(b) for b in keep}
  rest = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + n) for n, b in enumerate(rest)})
  return table


def default_bpe_path() -> Path:
  """$HPS_JAX_BPE, else the merges file inside an installed open_clip (located without importing it)."""
  env = os.environ.get("HPS_JAX_BPE")
  if env:
    return Path(env)
  spec = importlib.util.find_spec("open_clip")
  if spec is not None and spec.origin:
    path = Path(spec.origin).parent / BPE_FILENAME
    if path.exists():
      return path
  raise FileNotFoundError(
    f"no CLIP BPE file: set HPS_JAX_BPE to a {BPE_FILENAME}, pass --tokenizer PATH (a BPE file or a Hugging Face "
    "tokenizer dir), or `pip install --no-deps open_clip_torch`, whose wheel ships the file"
  )


def _clean_open_clip(text: str) -> str:

  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return " ".join(text.split()).lower()


def _clean_hf(text: str) -> str:
  return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


_CLEANERS = {"open_clip": _clean_open_clip, "hf": _clean_hf}


class CLIPTokenizer:
  """`tok(texts, context_length=77) -> int32 (len(texts), context_length)`; `tok.encode(text)` -> BPE ids."""

  def __init__(
    self,
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    *,
    start_token: str,
    end_token: str,
    pad_id: int = 0,
    clean: str = "open_clip",
    context_length: int = 77,
    source: str | None = None,
  ):
    if clean not in _CLEANERS:
      raise ValueError(f"clean must be one of {sorted(_CLEANERS)}, got {clean!r}")
    self.vocab = dict(vocab)
    self.ranks = {tuple(m): i for i, m in enumerate(merges)}
    self.start_id, self.end_id = self.vocab[start_token], self.vocab[end_token]
    self.special = {start_token: self.start_id, end_token: self.end_id}
    self.pad_id = int(pad_id)
    self.clean_name = clean
    self.clean = _CLEANERS[clean]
    self.context_length = context_length
    self.source = source or f"{len(self.vocab)}-token vocabulary"  # where the vocabulary came from, for messages
    specials = "|".join(regex.escape(t) for t in self.special)
    self._pattern = regex.compile(f"{specials}|{_SPLIT}", regex.IGNORECASE)
    self._bytes = byte_alphabet()
    self._cache: dict[str, list[int]] = {}
    self._inverse = None

  # ----- construction
  @classmethod
  def from_bpe_file(cls, path: str | os.PathLike, **kw) -> "CLIPTokenizer":
    """The OpenAI / open_clip merges file (gzip or plain text; first line is a header)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f"{path}: expected {NUM_MERGES} BPE merges of two symbols, got {len(merges)}")
    symbols = list(byte_alphabet().values())
    vocab_list = symbols + [s + _WORD_SUFFIX for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<start_of_text>", "<end_of_text>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    kw.setdefault("pad_id", 0)
    kw.setdefault("source", f"BPE file {path}")
    return cls(vocab, merges, start_token="<start_of_text>", end_token="<end_of_text>", **kw)

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike, **kw) -> "CLIPTokenizer":
    """A Hugging Face CLIP tokenizer dir: vocab.json + merges.txt (the hub layout), or tokenizer.json alone (what
    transformers >= 5 `save_pretrained` writes: `model.vocab`, `model.merges` as "a b" strings or ["a", "b"]
    pairs, `added_tokens`)."""
    path = Path(path)
    fast = {}
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
      vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
      lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
      merges = [tuple(l.split()) for l in lines if l.strip() and not l.startswith("#version")]
      kw.setdefault("source", f"Hugging Face tokenizer {path} (vocab.json + merges.txt)")
    elif (path / "tokenizer.json").exists():
      fast = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
      vocab, merges = _fast_tokenizer_bpe(fast, path / "tokenizer.json")
      kw.setdefault("source", f"Hugging Face tokenizer {path / 'tokenizer.json'}")
    else:
      raise FileNotFoundError(f"{path}: no Hugging Face tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    special = {**_fast_special_tokens(fast), **_hf_special_tokens(path)}
    start, end = special.get("bos_token", "<|startoftext|>"), special.get("eos_token", "<|endoftext|>")
    pad = special.get("pad_token", end)
    for name, tok in (("start", start), ("end", end), ("pad", pad)):
      if tok not in vocab:
        raise ValueError(f"{path}: {name} token {tok!r} is not in the vocabulary")
    kw.setdefault("pad_id", vocab[pad])
    kw.setdefault("clean", "hf")
    return cls(vocab, merges, start_token=start, end_token=end, **kw)

  def save_hf_dir(self, path: str | os.PathLike) -> Path:
    """Writes vocab.json + merges.txt + the two token configs (the layout of Stable Diffusion's `tokenizer/`),
    naming the special tokens as Hugging Face does; `from_hf_dir` reads it back to identical ids."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {hf_names.get(k, k): v for k, v in self.vocab.items()}
    inverse = {v: k for k, v in vocab.items()}
    merges = [" ".join(m) for m, _ in sorted(self.ranks.items(), key=lambda kv: kv[1])]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
      "bos_token": inverse[self.start_id],
      "eos_token": inverse[self.end_id],
      "pad_token": inverse[self.pad_id],
      "unk_token": inverse[self.end_id],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
      "tokenizer_class": "CLIPTokenizer",
      "model_max_length": self.context_length,
      "do_lower_case": True,
      **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out

  @classmethod
  def from_path(cls, path: str | os.PathLike, **kw) -> "CLIPTokenizer":
    """A BPE merges file, or a Hugging Face tokenizer dir (or a file inside one)."""
    p = Path(path)
    if p.is_dir():
      return cls.from_hf_dir(p, **kw)
    if p.name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
      return cls.from_hf_dir(p.parent, **kw)
    if p.exists():
      return cls.from_bpe_file(p, **kw)
    raise FileNotFoundError(f"tokenizer {path}: no such file or directory")

  @classmethod
  def default(cls, **kw) -> "CLIPTokenizer":
    return _default_cached(tuple(sorted(kw.items())))

  # ----- encoding
  def _bpe(self, word: str) -> list[int]:
    hit = self._cache.get(word)
    if hit is not None:
      return hit
    parts = list(word[:-1]) + [word[-1] + _WORD_SUFFIX]
    while len(parts) > 1:
      best, best_rank = -1, None
      for i in range(len(parts) - 1):
        r = self.ranks.get((parts[i], parts[i + 1]))
        if r is not None and (best_rank is None or r < best_rank):
          best, best_rank = i, r
      if best_rank is None:
        break
      a, b = parts[best], parts[best + 1]
      merged, i = [], 0
      while i < len(parts):  # merge every occurrence of the best pair, left to right
        if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
          merged.append(a + b)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = [self.vocab[p] for p in parts]
    if len(self._cache) < 200_000:
      self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text` after cleaning, without start/end tokens."""
    out = []
    for piece in self._pattern.findall(self.clean(text)):
      if piece in self.special:
        out.append(self.special[piece])
      else:
        out.extend(self._bpe("".join(self._bytes[b] for b in piece.encode("utf-8"))))
    return out

  def __call__(self, texts: str | Iterable[str], context_length: int | None = None) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    n = context_length or self.context_length
    if n < 2:
      raise ValueError(f"context_length must be >= 2, got {n}")
    out = np.full((len(texts), n), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"text {row} is {type(text).__name__}, not str")
      ids = [self.start_id] + self.encode(text)[: n - 2] + [self.end_id]
      out[row, : len(ids)] = ids
    return out

  def decode(self, ids: Iterable[int]) -> str:
    if self._inverse is None:
      self._inverse = {v: k for k, v in self.vocab.items()}
      self._unbyte = {c: b for b, c in byte_alphabet().items()}
    skip = {self.start_id, self.end_id, self.pad_id}
    text = "".join(self._inverse[int(i)] for i in ids if int(i) not in skip)
    words = text.split(_WORD_SUFFIX)
    raw = b" ".join(bytes(self._unbyte[c] for c in w) for w in words)
    return raw.decode("utf-8", errors="replace").strip()

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def __repr__(self):
    return (
      f"CLIPTokenizer(vocab={self.vocab_size}, clean={self.clean_name!r}, pad_id={self.pad_id}, "
      f"context_length={self.context_length})"
    )


def _fast_tokenizer_bpe(tj: dict, where: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocabulary (with the added tokens) and merges of a tokenizers-library JSON holding a BPE model."""
  model = tj.get("model") or {}
  if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
    raise ValueError(f"{where}: not a byte-level BPE tokenizer (model type {model.get('type')!r})")
  vocab = dict(model["vocab"])
  for tok in tj.get("added_tokens") or []:
    vocab.setdefault(tok["content"], int(tok["id"]))
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
  bad = [m for m in merges if len(m) != 2]
  if bad:
    raise ValueError(f"{where}: merges must be pairs of symbols, got e.g. {bad[0]!r}")
  return vocab, merges


def _fast_special_tokens(tj: dict) -> dict[str, str]:
  """bos/eos from a tokenizer.json post-processor (CLIP's RobertaProcessing: cls = start, sep = end); the
  tokenizer configs, read after, take precedence."""
  post = tj.get("post_processor") or {}
  out = {}
  for key, name in (("cls", "bos_token"), ("sep", "eos_token")):
    v = post.get(key)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
      out[name] = v[0]
  return out


def _hf_special_tokens(path: Path) -> dict[str, str]:
  out = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    f = path / name
    if f.exists():
      for k, v in json.loads(f.read_text(encoding="utf-8")).items():
        if k in ("bos_token", "eos_token", "pad_token") and k not in out:
          out[k] = v["content"] if isinstance(v, dict) else v
  return {k: v for k, v in out.items() if isinstance(v, str)}


@lru_cache(maxsize=4)
def _default_cached(kw: tuple) -> CLIPTokenizer:
  path = default_bpe_path()
  return CLIPTokenizer.from_bpe_file(path, **{"source": f"default CLIP BPE file {path}", **dict(kw)})
