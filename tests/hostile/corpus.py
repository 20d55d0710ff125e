"""The hostile-input corpus: what an attacker or a clumsy user hands `hps-jax`, each case with the exit code and the
words of the one-line message the error contract promises (see DESIGN.md: 0 done, 1 inputs skipped and named,
2 bad usage / input file / checkpoint / config, 3 internal error + log, 130 / 143 after SIGINT / SIGTERM).

Every file is generated here (no committed binaries). A case is a function of the shared assets `A` (a tiny random
CLIP checkpoint, good images, a tiny Stable Diffusion folder, ...) and its own folder `d`: it writes its inputs under
`d/in`, returns the command line, and the runner executes it with `d/out` as the working directory (the output
root): nothing may appear in `d` outside `d/out`, `d/logs` (exit-3 tracebacks) and `d/tmp`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Assets:
  ckpt: Path  # tiny HF CLIP folder (config.json + model.safetensors)
  images: list[Path]  # three good PNGs
  pairs: Path  # good {"image", "prompt"} JSONL over `images`
  sd: Path  # tiny Stable Diffusion folder
  inception: Path  # random-init FID Inception weights (safetensors)
  aesthetic: Path  # random-init aesthetic head


@dataclasses.dataclass
class Case:
  name: str
  cls: str
  build: Callable[[Assets, Path], list[str]]
  code: int
  words: str = ""  # a regex the error line (exit 2 / 3), or the whole stderr (exit 0 / 1 / 130 / 143), must match
  memory: bool = False  # a bomb / hostile-size case: peak RSS must stay under the cap
  signal: int | None = None  # sent once the command is at work (see `ready`)
  ready: str = ""  # stderr text that means "at work" for a signal case
  env: dict | None = None
  check: Callable[[Assets, Path], None] | None = None  # an extra assertion on the case folder afterwards
  fault: str | None = None  # a fault the runner injects (see runner.py)


CASES: list[Case] = []


def case(cls, code, words="", **kw):
  def register(fn):
    CASES.append(Case(fn.__name__.lstrip("_"), cls, fn, code, words, **kw))
    return fn

  return register


# ------------------------------------------------------------------------------------------------------------
# helpers that write inputs
# ------------------------------------------------------------------------------------------------------------
def put(d: Path, name: str, data: bytes | str) -> Path:
  p = d / "in" / name
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
  return p


def png(arr: np.ndarray | None = None, mode: str | None = None, fmt: str = "PNG", **save) -> bytes:
  arr = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8) if arr is None else arr
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, fmt, **save) if mode else Image.fromarray(arr).save(buf, fmt, **save)
  return buf.getvalue()


def jsonl(*rows) -> str:
  return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def score_pairs(a: Assets, d: Path, text: str | bytes, *extra) -> list[str]:
  p = put(d, "pairs.jsonl", text)
  return ["score", "--checkpoint", str(a.ckpt), "--pairs", str(p), "--output", "scores.jsonl", *extra]


def score_image(a: Assets, d: Path, name: str, data: bytes | None, *extra) -> list[str]:
  """score a good image and one hostile image file against one prompt."""
  img = put(d, name, data) if data is not None else d / "in" / name
  return ["score", "--checkpoint", str(a.ckpt), "--prompt", "a cat", str(a.images[0]), str(img), "--output",
          "scores.jsonl", *extra]  # fmt: skip


def hf_dir(a: Assets, d: Path, config=None, weights: bytes | None = None, weights_name="model.safetensors") -> Path:
  """A copy of the tiny HF checkpoint with its config.json and/or weights file replaced."""
  out = d / "in" / "ckpt"
  out.mkdir(parents=True, exist_ok=True)
  cfg = json.loads((a.ckpt / "config.json").read_text())
  if callable(config):
    cfg = config(cfg)
  (out / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(cfg).encode())
  (out / weights_name).write_bytes(weights if weights is not None else (a.ckpt / "model.safetensors").read_bytes())
  return out


def score_ckpt(a: Assets, ckpt: Path) -> list[str]:
  return ["score", "--checkpoint", str(ckpt), "--pairs", str(a.pairs), "--output", "scores.jsonl"]


def safetensors_bytes(tensors: dict) -> bytes:
  from safetensors.numpy import save

  return save({k: np.array(v, order="C") for k, v in tensors.items()})  # (ascontiguousarray makes 0-d arrays 1-d)


def raw_safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
  h = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(h) if length is None else length) + h + data


def tiny_weights(a: Assets) -> dict:
  from safetensors.numpy import load_file

  return load_file(a.ckpt / "model.safetensors")


class _Evil:
  """Pickles to a call of os.system: what a malicious checkpoint holds."""

  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


class _Eval:
  def __reduce__(self):
    return (eval, ("__import__('os').getpid()",))


def torch_zip(d: Path, payload: bytes) -> bytes:
  """A torch-style zip checkpoint (archive/data.pkl) holding `payload` as its pickle."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("archive/data.pkl", payload)
    zf.writestr("archive/version", "3\n")
  return buf.getvalue()


def stats_npz(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def fid_against(a: Assets, d: Path, stats: bytes, name: str = "ref.npz") -> list[str]:
  p = put(d, name, stats)
  return ["fid", str(a.images[0].parent), str(p), "--inception-weights", str(a.inception), "--batch-size", "4"]


def part_zip(members: dict[str, bytes], meta: dict | bytes | None, *, name="part-000001.zip", bad_zip=None) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for n, b in members.items():
      zf.writestr(n, b)
    if meta is not None:
      zf.writestr(name.replace(".zip", ".json"), meta if isinstance(meta, bytes) else json.dumps(meta))
  return buf.getvalue()


def reg_dir(a: Assets, d: Path) -> Path:
  r = d / "in" / "reg"
  r.mkdir(parents=True, exist_ok=True)
  (r / "r1.png").write_bytes(a.images[1].read_bytes())
  (r / "metadata.jsonl").write_text(jsonl({"file_name": "r1.png", "caption": "a photo"}))
  return r


def label(a: Assets, d: Path, images: Path, *extra) -> list[str]:
  return ["label", "--checkpoint", str(a.ckpt), "--images", str(images), "--regularization", str(reg_dir(a, d)),
          "--out", "manifest.jsonl", "--alpha", "1", *extra]  # fmt: skip


def good_members(n=4, prompt="a cat") -> tuple[dict, dict]:
  members = {f"m{i}.png": png(np.full((24, 24, 3), 40 * i, np.uint8) + np.arange(24, dtype=np.uint8)[:, None, None])
             for i in range(n)}  # fmt: skip
  return members, {k: {"p": prompt} for k in members}


def train_pref(*extra, workdir="work") -> list[str]:
  return ["train-preference", "--config", "hps_classifier:tiny", "--workdir", workdir, *extra]


# ============================================================================================================
# arguments
# ============================================================================================================
ARG = "arguments"


@case(ARG, 2, r"--batch-size: expected an integer >= 1")
def _score_batch_zero(a, d):
  return score_ckpt(a, a.ckpt) + ["--batch-size", "0"]


@case(ARG, 2, r"--batch-size: expected an integer >= 1")
def _score_batch_negative(a, d):
  return score_ckpt(a, a.ckpt) + ["--batch-size", "-3"]


@case(ARG, 2, r"--batch-size: expected an integer, got 'abc'")
def _score_batch_text(a, d):
  return score_ckpt(a, a.ckpt) + ["--batch-size", "abc"]


@case(ARG, 2, r"one of the arguments --prompt --pairs is required")
def _score_no_prompt(a, d):
  return ["score", "--checkpoint", str(a.ckpt), str(a.images[0])]


@case(ARG, 2, r"--output .*unknown format \.txt")
def _score_output_txt(a, d):
  return score_ckpt(a, a.ckpt)[:-1] + ["scores.txt"]


@case(ARG, 2, r"--output .* is a directory")
def _score_output_dir(a, d):
  (d / "out" / "adir.jsonl").mkdir(parents=True)
  return score_ckpt(a, a.ckpt)[:-1] + ["adir.jsonl"]


@case(ARG, 2, r"--output .* is also an input")
def _score_output_is_pairs(a, d):
  p = put(d, "pairs.jsonl", a.pairs.read_text().replace('"im', f'"{a.images[0].parent}/im'))
  return ["score", "--checkpoint", str(a.ckpt), "--pairs", str(p), "--output", str(p), "--overwrite"]


@case(ARG, 2, r"--output .* exists: pass --overwrite")
def _score_output_exists(a, d):
  (d / "out" / "scores.jsonl").write_text("keep me\n")
  return score_ckpt(a, a.ckpt)


@case(ARG, 2, r"the folder of --output|Not a directory|is a file")
def _score_output_under_a_file(a, d):
  (d / "out" / "afile").write_text("x")
  return score_ckpt(a, a.ckpt)[:-1] + ["afile/scores.jsonl"]


@case(ARG, 2, r"nowhere")
def _score_checkpoint_missing(a, d):
  return score_ckpt(a, d / "in" / "nowhere")


@case(ARG, 2, r"--dtype: invalid choice")
def _score_dtype_float64(a, d):
  return score_ckpt(a, a.ckpt) + ["--dtype", "float64"]


@case(ARG, 2, r"unrecognized arguments: --frobnicate")
def _score_unknown_option(a, d):
  return score_ckpt(a, a.ckpt) + ["--frobnicate"]


@case(ARG, 2, r"invalid choice: 'frobnicate'|choose a COMMAND")
def _unknown_command(a, d):
  return ["frobnicate"]


@case(ARG, 2, "")
def _bare_command(a, d):
  return []


def _sample(a, *extra, outdir="samples"):
  return ["sample", "--model", str(a.sd), "--prompt", "a cat", "--steps", "2", "--outdir", outdir, *extra]


@case(ARG, 2, r"--guidance: expected a finite number, got nan")
def _sample_guidance_nan(a, d):
  return _sample(a, "--guidance", "nan")


@case(ARG, 2, r"--guidance: expected a finite number, got inf")
def _sample_guidance_inf(a, d):
  return _sample(a, "--guidance", "inf")


@case(ARG, 2, r"--lora-scale: expected a finite number")
def _sample_lora_scale_nan(a, d):
  return _sample(a, "--lora-scale", "NaN")


@case(ARG, 2, r"--height: expected an integer in \[8, 8192\], a multiple of 8, got 33")
def _sample_height_33(a, d):
  return _sample(a, "--height", "33")


@case(ARG, 2, r"--width: expected an integer in \[8, 8192\]")
def _sample_width_zero(a, d):
  return _sample(a, "--width", "0")


@case(ARG, 2, r"--height: expected an integer in \[8, 8192\]")
def _sample_height_huge(a, d):
  return _sample(a, "--height", "1000000")


@case(ARG, 2, r"--steps: expected an integer >= 1")
def _sample_steps_zero(a, d):
  return _sample(a, "--steps", "0")


@case(ARG, 2, r"--num-images: expected an integer >= 1")
def _sample_num_images_negative(a, d):
  return _sample(a, "--num-images", "-1")


@case(ARG, 2, r"--seed: expected an integer in \[0, 4294967295\]")
def _sample_seed_negative(a, d):
  return _sample(a, "--seed", "-1")


@case(ARG, 2, r"--outdir .* is a file, expected a folder")
def _sample_outdir_is_file(a, d):
  (d / "out" / "samples").write_text("a file")
  return _sample(a)


@case(ARG, 2, r"--ab compares the base model with its LoRA")
def _sample_ab_without_lora(a, d):
  return _sample(a, "--ab")


@case(ARG, 2, r"--best-of ranks candidates by HPS")
def _sample_best_of_without_checkpoint(a, d):
  return _sample(a, "--best-of", "2")


@case(ARG, 2, r"--save-stats .* is a directory")
def _fid_save_stats_dir(a, d):
  (d / "out" / "s.npz").mkdir(parents=True)
  return ["fid", str(a.images[0].parent), "--save-stats", "s.npz", "--inception-weights", str(a.inception)]


@case(ARG, 2, r"--save-stats .*unknown format \.txt")
def _fid_save_stats_txt(a, d):
  return ["fid", str(a.images[0].parent), "--save-stats", "s.txt", "--inception-weights", str(a.inception)]


@case(ARG, 2, r"give PATH_B")
def _fid_nothing_to_compare(a, d):
  return ["fid", str(a.images[0].parent)]


@case(ARG, 2, r"unknown metrics \['bogus'\]")
def _metrics_unknown(a, d):
  return ["metrics", "--images", str(a.pairs), "--metrics", "bogus"]


@case(ARG, 2, r"fid and kid need --reference")
def _metrics_fid_without_reference(a, d):
  return ["metrics", "--images", str(a.pairs), "--metrics", "fid"]


@case(ARG, 2, r"--output .* is a directory")
def _metrics_output_dir(a, d):
  (d / "out" / "m.json").mkdir(parents=True)
  return ["metrics", "--images", str(a.pairs), "--metrics", "hps", "--checkpoint", str(a.ckpt), "--output", "m.json"]


@case(ARG, 2, r"--kid-subset-size: expected an integer >= 1")
def _metrics_kid_subset_zero(a, d):
  return ["metrics", "--images", str(a.pairs), "--metrics", "kid", "--kid-subset-size", "0"]


@case(ARG, 2, r"--max-images: expected an integer >= 2")
def _eval_preference_one_slot(a, d):
  return ["eval-preference", "--random", "--dataset", "synthetic", "--max-images", "1"]


@case(ARG, 2, r"--batch-size: expected an integer >= 1")
def _eval_preference_batch_zero(a, d):
  return ["eval-preference", "--random", "--dataset", "synthetic", "--batch-size", "0"]


@case(ARG, 2, r"--alpha: expected a finite number")
def _label_alpha_nan(a, d):
  return label(a, d, a.pairs, "--alpha", "nan")


@case(ARG, 2, r"alpha must be > 0")
def _label_alpha_negative(a, d):
  return label(a, d, a.pairs)[:-2] + ["--alpha", "-1"]


@case(ARG, 2, r"--out .*unknown format \.txt")
def _label_out_txt(a, d):
  args = label(a, d, a.pairs)
  args[args.index("manifest.jsonl")] = "manifest.txt"
  return args


@case(ARG, 2, r"--out .* is also an input")
def _label_out_is_images(a, d):
  p = put(d, "pairs.jsonl", a.pairs.read_text())
  args = label(a, d, p)
  args[args.index("manifest.jsonl")] = str(p)
  return args


@case(ARG, 2, r"no such file")
def _convert_missing_source(a, d):
  return ["convert", str(d / "in" / "nothing.pt"), "x.safetensors"]


@case(ARG, 2, r"DST is SRC")
def _convert_onto_itself(a, d):
  p = put(d, "w.safetensors", (a.ckpt / "model.safetensors").read_bytes())
  return ["convert", str(p), str(p), "--overwrite"]


@case(ARG, 2, r"DST must end in \.safetensors")
def _convert_wrong_suffix(a, d):
  return ["convert", str(a.ckpt / "model.safetensors"), "x.bin"]


@case(ARG, 2, r"--max-per-user: expected an integer >= 0")
def _collect_negative_cap(a, d):
  p = put(d, "export.json", "{}")
  return ["collect", "discord", str(p), "--out", "ds", "--max-per-user", "-1"]


@case(ARG, 2, r"invalid choice")
def _weights_unknown_action(a, d):
  return ["weights", "explode"]


@case(ARG, 2, r"--output .*unknown format \.txt")
def _eval_generator_output_txt(a, d):
  p = put(d, "prompts.txt", "a cat\n")
  return ["eval-generator", "--model", str(a.sd), "--prompts", str(p), "--metrics", "hps", "--checkpoint", str(a.ckpt),
          "--output", "r.txt"]  # fmt: skip


@case(ARG, 2, r"--outdir .* is a file")
def _eval_generator_outdir_file(a, d):
  p = put(d, "prompts.txt", "a cat\n")
  (d / "out" / "imgs").write_text("x")
  return ["eval-generator", "--model", str(a.sd), "--prompts", str(p), "--metrics", "hps", "--checkpoint", str(a.ckpt),
          "--output", "r.json", "--outdir", "imgs"]  # fmt: skip


@case(ARG, 2, r"work")
def _train_workdir_is_file(a, d):
  (d / "out" / "work").write_text("a file")
  return train_pref()


@case(ARG, 2, r"expected a \.json file|unknown format \.txt")
def _dataset_stats_output_txt(a, d):
  return ["dataset", "stats", "synthetic", "--output", "s.txt"]


@case(ARG, 2, r"argument --prompt: not valid UTF-8 text")
def _score_prompt_not_utf8(a, d):
  return ["score", "--checkpoint", str(a.ckpt), "--prompt", "a \udcff cat", str(a.images[0]), "--output", "s.jsonl"]


@case(ARG, 2, r"argument --negative-prompt: not valid UTF-8 text")
def _sample_negative_prompt_not_utf8(a, d):
  return _sample(a, "--negative-prompt", "weird \udcfe")


@case(ARG, 2, r"--tokenizer|tokenizer")
def _score_tokenizer_missing(a, d):
  return score_ckpt(a, a.ckpt) + ["--tokenizer", str(d / "in" / "nope.txt.gz")]


# ============================================================================================================
# images (score: one good image and one hostile file; a skipped image is named, exit 1)
# ============================================================================================================
IMG = "images"


@case(IMG, 1, r"skipped .*empty\.png")
def _image_zero_bytes(a, d):
  return score_image(a, d, "empty.png", b"")


@case(IMG, 1, r"skipped .*noise\.png")
def _image_random_bytes(a, d):
  return score_image(a, d, "noise.png", os.urandom(4096))


@case(IMG, 1, r"skipped .*half\.png")
def _image_truncated_png(a, d):
  data = png(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
  return score_image(a, d, "half.png", data[: len(data) // 2])


@case(IMG, 1, r"skipped .*half\.jpg")
def _image_truncated_jpeg(a, d):
  data = png(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8), fmt="JPEG")
  return score_image(a, d, "half.jpg", data[: len(data) // 2])


@case(IMG, 1, r"skipped .*text\.jpg")
def _image_text_named_jpg(a, d):
  return score_image(a, d, "text.jpg", "this is not a picture\n" * 20)


@case(IMG, 1, r"skipped .*bomb\.png", memory=True)
def _image_decompression_bomb(a, d):
  im = Image.new("1", (30000, 30000))  # 900 Mpixel, ~100 kB as PNG
  buf = io.BytesIO()
  im.save(buf, "PNG", optimize=False)
  return score_image(a, d, "bomb.png", buf.getvalue())


@case(IMG, 1, r"skipped .*large\.png", memory=True)
def _image_just_over_pixel_cap(a, d):
  im = Image.new("L", (14000, 14000))  # 196 Mpixel: above the decoder's cap, below PIL's hard limit x2
  buf = io.BytesIO()
  im.save(buf, "PNG")
  return score_image(a, d, "large.png", buf.getvalue())


@case(IMG, 1, r"skipped .*crc\.png")
def _image_bad_crc(a, d):
  data = bytearray(png())
  i = data.index(b"IDAT") + 8
  data[i] ^= 0xFF  # a corrupted byte in the compressed data (its chunk CRC no longer matches)
  return score_image(a, d, "crc.png", bytes(data))


@case(IMG, 1, r"skipped .*noise\.webp")
def _image_webp_random(a, d):
  return score_image(a, d, "noise.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 " + os.urandom(64))


@case(IMG, 2, r"adir\.png: no image files")
def _image_is_empty_directory(a, d):
  (d / "in" / "adir.png").mkdir(parents=True)
  return score_image(a, d, "adir.png", None)


@case(IMG, 1, r"skipped .*dangling\.png")
def _image_dangling_symlink(a, d):
  (d / "in").mkdir(parents=True, exist_ok=True)
  os.symlink(d / "in" / "nothing-here.png", d / "in" / "dangling.png")
  return score_image(a, d, "dangling.png", None)


@case(IMG, 1, r"skipped .*fifo\.png")
def _image_is_a_fifo(a, d):
  (d / "in").mkdir(parents=True, exist_ok=True)
  os.mkfifo(d / "in" / "fifo.png")  # opening it for reading would block forever
  return score_image(a, d, "fifo.png", None)


@case(IMG, 1, r"skipped .*missing\.png")
def _image_missing(a, d):
  return score_image(a, d, "missing.png", None)


@case(IMG, 0)
def _image_one_pixel(a, d):
  return score_image(a, d, "one.png", png(np.zeros((1, 1, 3), np.uint8)))


@case(IMG, 0)
def _image_16_bit(a, d):
  return score_image(a, d, "deep.png", png((np.arange(32 * 24).reshape(24, 32) * 80).astype(np.uint16)))


@case(IMG, 0)
def _image_cmyk_jpeg(a, d):
  im = Image.new("CMYK", (32, 24), (10, 200, 30, 5))
  buf = io.BytesIO()
  im.save(buf, "JPEG")
  return score_image(a, d, "cmyk.jpg", buf.getvalue())


@case(IMG, 0)
def _image_palette_transparency(a, d):
  im = Image.new("P", (32, 24), 3)
  buf = io.BytesIO()
  im.save(buf, "PNG", transparency=3)
  return score_image(a, d, "pal.png", buf.getvalue())


@case(IMG, 0)
def _image_gray_alpha(a, d):
  im = Image.new("LA", (32, 24), (120, 30))
  buf = io.BytesIO()
  im.save(buf, "PNG")
  return score_image(a, d, "la.png", buf.getvalue())


@case(IMG, 0)
def _image_animated_gif(a, d):
  frames = [Image.new("RGB", (32, 24), (i * 60, 0, 0)) for i in range(3)]
  buf = io.BytesIO()
  frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
  return score_image(a, d, "anim.gif", buf.getvalue())


@case(IMG, 0)
def _image_extreme_aspect(a, d):
  return score_image(a, d, "strip.png", png(np.full((1, 4000, 3), 99, np.uint8)))


@case(IMG, 0)
def _image_float_tiff(a, d):
  im = Image.fromarray(np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32), "F")
  buf = io.BytesIO()
  im.save(buf, "TIFF")
  return score_image(a, d, "float.tiff", buf.getvalue())


@case(IMG, 0)
def _image_exif_rotated(a, d):
  im = Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 32, 3), dtype=np.uint8))
  exif = im.getexif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  im.save(buf, "JPEG", exif=exif)
  return score_image(a, d, "rotated.jpg", buf.getvalue())


@case(IMG, 1, r"skipped .*huge_header\.png", memory=True)
def _image_png_header_lies(a, d):
  data = bytearray(png(np.zeros((8, 8, 3), np.uint8)))
  data[16:24] = struct.pack(">II", 60000, 60000)  # IHDR width/height (the CRC is now wrong as well)
  return score_image(a, d, "huge_header.png", bytes(data))


# ============================================================================================================
# JSONL (score --pairs): whole-file problems are exit 2, bad lines are named skips (exit 1)
# ============================================================================================================
JS = "jsonl"


def _row(a, i=0, **kw):
  return {"image": str(a.images[i]), "prompt": "a cat", **kw}


@case(JS, 2, r"pairs\.jsonl.*no .*rows|empty")
def _jsonl_empty(a, d):
  return score_pairs(a, d, "")


@case(JS, 2, r"pairs\.jsonl: binary data")
def _jsonl_binary(a, d):
  return score_pairs(a, d, os.urandom(512).replace(b"\n", b"") + b"\x00\x00")


@case(JS, 2, r"pairs\.jsonl: a UTF-16/32 text file")
def _jsonl_utf16(a, d):
  return score_pairs(a, d, jsonl(_row(a)).encode("utf-16"))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_not_json_line(a, d):
  return score_pairs(a, d, jsonl(_row(a), "{oops", _row(a, 1)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_list_line(a, d):
  return score_pairs(a, d, jsonl(_row(a), "[1, 2]", _row(a, 1)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_null_line(a, d):
  return score_pairs(a, d, jsonl(_row(a), "null", _row(a, 1)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_missing_image(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"prompt": "x"}, _row(a, 1)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_missing_prompt(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"image": str(a.images[1])}, _row(a, 2)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_image_is_number(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"image": 7, "prompt": "x"}, _row(a, 1)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_prompt_is_number(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"image": str(a.images[1]), "prompt": 3.5}, _row(a, 2)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_lone_surrogate_prompt(a, d):
  return score_pairs(a, d, jsonl(_row(a), '{"image": "%s", "prompt": "a \\ud800 cat"}' % a.images[1], _row(a, 2)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_lone_surrogate_path(a, d):
  return score_pairs(a, d, jsonl(_row(a), '{"image": "x\\udfffy.png", "prompt": "cat"}', _row(a, 2)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_nul_in_path(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"image": "a\u0000b.png", "prompt": "x"}, _row(a, 1)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_deep_nesting(a, d):
  return score_pairs(a, d, jsonl(_row(a), "[" * 200000 + "]" * 200000, _row(a, 1)))


@case(JS, 0)
def _jsonl_megabyte_prompt(a, d):
  return score_pairs(a, d, jsonl(_row(a, prompt="cat " * 250000)))


@case(JS, 0)
def _jsonl_utf8_bom(a, d):
  return score_pairs(a, d, b"\xef\xbb\xbf" + jsonl(_row(a), _row(a, 1)).encode())


@case(JS, 0)
def _jsonl_crlf(a, d):
  return score_pairs(a, d, jsonl(_row(a), _row(a, 1)).replace("\n", "\r\n"))


@case(JS, 0)
def _jsonl_blank_lines(a, d):
  return score_pairs(a, d, "\n\n" + jsonl(_row(a)) + "\n   \n" + jsonl(_row(a, 1)))


@case(JS, 0)
def _jsonl_extra_keys(a, d):
  return score_pairs(a, d, jsonl(_row(a, extra={"deep": [1, 2]}, score=None, n=1e308)))


@case(JS, 1, r"skipped .*pairs\.jsonl:2.*escapes")
def _jsonl_relative_escape(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"image": "../../../etc/passwd", "prompt": "x"}))


@case(JS, 0)
def _jsonl_relative_escape_allowed(a, d):
  rel = os.path.relpath(a.images[1], d / "in")
  return score_pairs(a, d, jsonl(_row(a), {"image": rel, "prompt": "x"}), "--allow-outside-paths")


@case(JS, 1, r"skipped .*zero")
def _jsonl_device_file(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"image": "/dev/zero", "prompt": "x"}))


@case(JS, 1, r"skipped .*is a directory")
def _jsonl_image_is_directory(a, d):
  return score_pairs(a, d, jsonl(_row(a), {"image": str(a.images[0].parent), "prompt": "x"}))


@case(JS, 1, r"skipped .*pairs\.jsonl:1")
def _jsonl_whole_array(a, d):
  return score_pairs(a, d, json.dumps([_row(a), _row(a, 1)]) + "\n" + jsonl(_row(a, 2)))


@case(JS, 0)
def _jsonl_control_characters_in_prompt(a, d):
  return score_pairs(a, d, jsonl(_row(a, prompt="a\u0000cat\u001b[31m\u202e")))


@case(JS, 2, r"pairs\.jsonl")
def _jsonl_pairs_is_directory(a, d):
  (d / "in" / "pairs.jsonl").mkdir(parents=True)
  return ["score", "--checkpoint", str(a.ckpt), "--pairs", str(d / "in" / "pairs.jsonl")]


@case(JS, 2, r"pairs\.jsonl")
def _jsonl_pairs_missing(a, d):
  return ["score", "--checkpoint", str(a.ckpt), "--pairs", str(d / "in" / "pairs.jsonl")]


@case(JS, 1, r"skipped .*pairs\.jsonl:2")
def _jsonl_invalid_utf8_line(a, d):
  return score_pairs(a, d, jsonl(_row(a)).encode() + b'{"image": "\xff\xfe.png", "prompt": "x"}\n')


@case(JS, 2, r"pairs\.jsonl: no usable row, all 3 skipped")
def _jsonl_only_bad_lines(a, d):
  return score_pairs(a, d, "{oops\n[1]\nnull\n")


@case(JS, 1, r"skipped .*metadata\.jsonl:2.*escapes")
def _jsonl_metrics_path_escape(a, d):
  p = put(d, "metadata.jsonl", jsonl(_row(a), {"image": "../../x.png", "prompt": "x"}, _row(a, 1)))
  return ["metrics", "--images", str(p), "--metrics", "hps", "--checkpoint", str(a.ckpt), "--output", "m.json"]


@case(JS, 0)
def _jsonl_metrics_path_escape_allowed(a, d):
  rel = os.path.relpath(a.images[2], d / "in")
  p = put(d, "metadata.jsonl", jsonl(_row(a), {"image": rel, "prompt": "x"}, _row(a, 1)))
  return ["metrics", "--images", str(p), "--metrics", "hps", "--checkpoint", str(a.ckpt), "--output", "m.json",
          "--allow-outside-paths"]  # fmt: skip


@case(JS, 1, r"skipped .*metadata\.jsonl:2")
def _jsonl_metrics_images_bad_line(a, d):
  p = put(d, "metadata.jsonl", jsonl(_row(a), "{bad", _row(a, 1)))
  return ["metrics", "--images", str(p), "--metrics", "hps", "--checkpoint", str(a.ckpt), "--output", "m.json"]


# ============================================================================================================
# checkpoints (HF folders, safetensors, pickles, shard indices, aesthetic heads, LoRA files, SD folders)
# ============================================================================================================
CK = "checkpoints"


@case(CK, 2, r"config\.json")
def _hf_config_not_json(a, d):
  return score_ckpt(a, hf_dir(a, d, b"{not json"))


@case(CK, 2, r"config\.json")
def _hf_config_is_list(a, d):
  return score_ckpt(a, hf_dir(a, d, b"[1, 2, 3]"))


def _set(section, key, value):
  def edit(cfg):
    cfg[section][key] = value
    return cfg

  return edit


@case(CK, 2, r"num_hidden_layers", memory=True)
def _hf_ten_million_layers(a, d):
  return score_ckpt(a, hf_dir(a, d, _set("vision_config", "num_hidden_layers", 10_000_000)))


@case(CK, 2, r"hidden_size", memory=True)
def _hf_giant_hidden_size(a, d):
  return score_ckpt(a, hf_dir(a, d, _set("text_config", "hidden_size", 10**9)))


@case(CK, 2, r"intermediate_size|hidden_size|negative|config")
def _hf_negative_size(a, d):
  return score_ckpt(a, hf_dir(a, d, _set("vision_config", "intermediate_size", -64)))


@case(CK, 2, r"num_attention_heads|config")
def _hf_string_where_int(a, d):
  return score_ckpt(a, hf_dir(a, d, _set("text_config", "num_attention_heads", "four")))


@case(CK, 2, r"config\.json|config")
def _hf_config_empty_object(a, d):
  return score_ckpt(a, hf_dir(a, d, b"{}"))


@case(CK, 2, r"layers|unused|num_hidden_layers")
def _hf_fewer_layers_than_weights(a, d):
  return score_ckpt(a, hf_dir(a, d, _set("vision_config", "num_hidden_layers", 1)))


@case(CK, 2, r"layers|missing|num_hidden_layers")
def _hf_more_layers_than_weights(a, d):
  return score_ckpt(a, hf_dir(a, d, _set("text_config", "num_hidden_layers", 7)))


@case(CK, 2, r"hidden_size|shape")
def _hf_width_disagrees_with_weights(a, d):
  return score_ckpt(a, hf_dir(a, d, _set("vision_config", "hidden_size", 48)))


@case(CK, 2, r"ckpt")
def _hf_no_weights_file(a, d):
  out = hf_dir(a, d)
  (out / "model.safetensors").unlink()
  return score_ckpt(a, out)


@case(CK, 2, r"empty")
def _checkpoint_empty_dir(a, d):
  (d / "in" / "empty").mkdir(parents=True)
  return score_ckpt(a, d / "in" / "empty")


@case(CK, 2, r"model\.safetensors")
def _safetensors_truncated(a, d):
  data = (a.ckpt / "model.safetensors").read_bytes()
  return score_ckpt(a, hf_dir(a, d, weights=data[: len(data) // 2]))


@case(CK, 2, r"model\.safetensors")
def _safetensors_random_bytes(a, d):
  return score_ckpt(a, hf_dir(a, d, weights=os.urandom(2048)))


@case(CK, 2, r"model\.safetensors", memory=True)
def _safetensors_huge_header_length(a, d):
  return score_ckpt(a, hf_dir(a, d, weights=raw_safetensors(b"{}", length=2**62)))


@case(CK, 2, r"model\.safetensors", memory=True)
def _safetensors_offsets_beyond_file(a, d):
  h = {"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}}
  return score_ckpt(a, hf_dir(a, d, weights=raw_safetensors(h, b"\0" * 64)))


@case(CK, 2, r"model\.safetensors")
def _safetensors_header_not_json(a, d):
  return score_ckpt(a, hf_dir(a, d, weights=raw_safetensors(b"\xff\xfe not json at all")))


@case(CK, 2, r"model\.safetensors|dtype")
def _safetensors_integer_weights(a, d):
  w = {k: (v * 100).astype(np.int8) for k, v in tiny_weights(a).items()}
  return score_ckpt(a, hf_dir(a, d, weights=safetensors_bytes(w)))


@case(CK, 2, r"model\.safetensors|missing")
def _safetensors_missing_tensors(a, d):
  w = dict(list(tiny_weights(a).items())[:5])
  return score_ckpt(a, hf_dir(a, d, weights=safetensors_bytes(w)))


@case(CK, 2, r"model\.safetensors|shape")
def _safetensors_wrong_shape(a, d):
  w = tiny_weights(a)
  k = next(k for k in w if k.endswith("q_proj.weight"))
  w[k] = np.zeros((3, 5), np.float32)
  return score_ckpt(a, hf_dir(a, d, weights=safetensors_bytes(w)))


@case(CK, 2, r"w\.safetensors")
def _safetensors_zero_bytes(a, d):
  return score_ckpt(a, put(d, "w.safetensors", b""))


@case(CK, 2, r"noise\.pt")
def _pt_random_bytes(a, d):
  return score_ckpt(a, put(d, "noise.pt", os.urandom(4096)))


@case(CK, 2, r"cut\.pt")
def _pt_zip_truncated(a, d):
  data = torch_zip(d, pickle.dumps({"a": 1}, protocol=2))
  return score_ckpt(a, put(d, "cut.pt", data[: len(data) - 40]))


def _owned(a, d):
  assert not (d / "out" / "owned").exists(), "a pickle in a checkpoint ran code"


@case(CK, 2, r"evil\.pt.*(posix\.system|os\.system|not allowed|refused)", check=_owned)
def _pt_pickle_calls_os_system(a, d):
  return score_ckpt(a, put(d, "evil.pt", torch_zip(d, pickle.dumps(_Evil("touch owned"), protocol=2))))


@case(CK, 2, r"evil\.bin.*(posix\.system|os\.system|not allowed|refused)", check=_owned)
def _bin_legacy_pickle_calls_os_system(a, d):
  return score_ckpt(a, put(d, "evil.bin", pickle.dumps(_Evil("touch owned"), protocol=2)))


@case(CK, 2, r"eval\.pt.*(eval|not allowed|refused)")
def _pt_pickle_calls_eval(a, d):
  return score_ckpt(a, put(d, "eval.pt", torch_zip(d, pickle.dumps(_Eval(), protocol=2))))


@case(CK, 2, r"notdict\.pt")
def _pt_pickle_not_a_dict(a, d):
  return score_ckpt(a, put(d, "notdict.pt", torch_zip(d, pickle.dumps([1, 2, 3], protocol=2))))


def _index(a, d, weight_map) -> list[str]:
  out = hf_dir(a, d)
  (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
  text = weight_map if isinstance(weight_map, (bytes, str)) else json.dumps({"metadata": {}, "weight_map": weight_map})
  (out / "model.safetensors.index.json").write_text(text if isinstance(text, str) else text.decode())
  return score_ckpt(a, out)


@case(CK, 2, r"escapes|outside")
def _shard_index_outside_folder(a, d):
  put(d, "x.safetensors", (a.ckpt / "model.safetensors").read_bytes())
  return _index(a, d, {k: "../x.safetensors" for k in tiny_weights(a)})


@case(CK, 2, r"index")
def _shard_index_points_at_itself(a, d):
  return _index(a, d, {k: "model.safetensors.index.json" for k in tiny_weights(a)})


@case(CK, 2, r"index")
def _shard_index_not_json(a, d):
  return _index(a, d, "{weight_map")


@case(CK, 2, r"weight_map")
def _shard_index_without_weight_map(a, d):
  return _index(a, d, '{"metadata": {}}')


@case(CK, 2, r"model-00002")
def _shard_index_missing_shard(a, d):
  return _index(a, d, {k: "model-00002-of-00002.safetensors" for k in tiny_weights(a)})


@case(CK, 2, r"escapes|outside|absolute")
def _shard_index_absolute_path(a, d):
  return _index(a, d, {k: str(a.ckpt / "model.safetensors") for k in tiny_weights(a)})


@case(CK, 1, r"non-finite")
def _weights_nan(a, d):
  w = {k: np.full_like(v, np.nan) if k.endswith("proj.weight") else v for k, v in tiny_weights(a).items()}
  return score_ckpt(a, hf_dir(a, d, weights=safetensors_bytes(w)))


@case(CK, 1, r"non-finite")
def _weights_inf(a, d):
  w = {k: (v * np.float32(1e38) * 1e3).astype(np.float32) for k, v in tiny_weights(a).items()}
  return score_ckpt(a, hf_dir(a, d, weights=safetensors_bytes(w)))


def _nan_ckpt(a, d) -> Path:
  w = {k: np.full_like(v, np.nan) if k.endswith("proj.weight") else v for k, v in tiny_weights(a).items()}
  return hf_dir(a, d, weights=safetensors_bytes(w))


@case(CK, 2, r"non-finite scores")
def _eval_preference_nan_weights(a, d):
  return ["eval-preference", "--checkpoint", str(_nan_ckpt(a, d)), "--dataset", "synthetic", "--synthetic-size", "8",
          "--batch-size", "4"]  # fmt: skip


@case(CK, 2, r"non-finite value")
def _metrics_hps_nan_weights(a, d):
  return ["metrics", "--images", str(a.pairs), "--metrics", "hps", "--checkpoint", str(_nan_ckpt(a, d)), "--output",
          "m.json"]  # fmt: skip


@case(CK, 2, r"head\.safetensors|aesthetic")
def _aesthetic_head_random_bytes(a, d):
  p = put(d, "head.safetensors", os.urandom(1000))
  return ["aesthetic", "--aesthetic-mlp", str(p), "--clip-checkpoint", str(a.ckpt), str(a.images[0])]


@case(CK, 2, r"head\.safetensors|shape|aesthetic")
def _aesthetic_head_wrong_shapes(a, d):
  p = put(d, "head.safetensors", safetensors_bytes({"layers.0.weight": np.zeros((3, 3), np.float32)}))
  return ["aesthetic", "--aesthetic-mlp", str(p), "--clip-checkpoint", str(a.ckpt), str(a.images[0])]


@case(CK, 2, r"lora\.safetensors|LoRA|lora")
def _lora_random_bytes(a, d):
  return _sample(a, "--lora", str(put(d, "lora.safetensors", os.urandom(3000))))


@case(CK, 2, r"lora\.safetensors|LoRA|lora|shape")
def _lora_wrong_shapes(a, d):
  t = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 999), np.float32),
       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((999, 4), np.float32)}  # fmt: skip
  return _sample(a, "--lora", str(put(d, "lora.safetensors", safetensors_bytes(t))))


@case(CK, 2, r"lora\.safetensors|LoRA|no .*keys|recogni")
def _lora_unrelated_keys(a, d):
  return _sample(a, "--lora", str(put(d, "lora.safetensors", safetensors_bytes({"foo": np.zeros(3, np.float32)}))))


def _sd_copy(a, d, edit=None, drop=None) -> Path:
  import shutil

  out = d / "in" / "sd"
  shutil.copytree(a.sd, out)
  if drop:
    shutil.rmtree(out / drop)
  if edit:
    sub, fn = edit
    cfg_path = out / sub / "config.json"
    cfg_path.write_text(json.dumps(fn(json.loads(cfg_path.read_text()))))
  return out


@case(CK, 2, r"unet")
def _sd_without_unet(a, d):
  return ["sample", "--model", str(_sd_copy(a, d, drop="unet")), "--prompt", "x", "--outdir", "s"]


@case(CK, 2, r"unet|layers_per_block|block_out_channels|config", memory=True)
def _sd_unet_config_hostile(a, d):
  out = _sd_copy(a, d, edit=("unet", lambda c: {**c, "layers_per_block": 10_000_000}))
  return ["sample", "--model", str(out), "--prompt", "x", "--outdir", "s"]


@case(CK, 2, r"vae|config")
def _sd_vae_config_not_json(a, d):
  out = _sd_copy(a, d)
  (out / "vae" / "config.json").write_text("{{{")
  return ["sample", "--model", str(out), "--prompt", "x", "--outdir", "s"]


@case(CK, 2, r"text_encoder|hidden_size|config", memory=True)
def _sd_text_encoder_config_hostile(a, d):
  out = _sd_copy(a, d, edit=("text_encoder", lambda c: {**c, "hidden_size": 10**9}))
  return ["sample", "--model", str(out), "--prompt", "x", "--outdir", "s"]


@case(CK, 2, r"non-finite pixels")
def _sd_nan_unet_weights(a, d):
  from safetensors.numpy import load_file

  out = _sd_copy(a, d)
  f = next((out / "unet").glob("*.safetensors"))
  w = load_file(f)
  k = next(k for k in w if k.endswith("conv_out.weight"))
  w[k] = np.full_like(w[k], np.nan)
  f.write_bytes(safetensors_bytes(w))
  return ["sample", "--model", str(out), "--prompt", "x", "--outdir", "s", "--steps", "2", "--height", "32",
          "--width", "32", "--batch-size", "1"]  # fmt: skip


@case(CK, 2, r"inception|inc\.safetensors")
def _inception_weights_random(a, d):
  return ["fid", str(a.images[0].parent), "--save-stats", "s.npz", "--inception-weights",
          str(put(d, "inc.safetensors", os.urandom(5000)))]  # fmt: skip


@case(CK, 2, r"noise\.pt")
def _convert_random_bytes(a, d):
  return ["convert", str(put(d, "noise.pt", os.urandom(999))), "x.safetensors"]


@case(CK, 2, r"evil\.pt", check=_owned)
def _convert_malicious_pickle(a, d):
  return ["convert", str(put(d, "evil.pt", torch_zip(d, pickle.dumps(_Evil("touch owned"), protocol=2)))),
          "x.safetensors"]  # fmt: skip


# ============================================================================================================
# configs (train-preference / train-lora)
# ============================================================================================================
CF = "configs"


@case(CF, 2, r"nope\.py")
def _config_file_missing(a, d):
  return ["train-preference", "--config", str(d / "in" / "nope.py") + ":tiny", "--workdir", "w"]


@case(CF, 2, r"unknown preset|nope")
def _config_unknown_preset(a, d):
  return ["train-preference", "--config", "hps_classifier:nope", "--workdir", "w"]


@case(CF, 2, r"bad\.py")
def _config_syntax_error(a, d):
  p = put(d, "bad.py", "def get_config(arg):\n  return {\n")
  return ["train-preference", "--config", f"{p}:tiny", "--workdir", "w"]


@case(CF, 2, r"raises\.py")
def _config_raises(a, d):
  p = put(d, "raises.py", "raise RuntimeError('boom')\n")
  return ["train-preference", "--config", f"{p}:tiny", "--workdir", "w"]


@case(CF, 2, r"noget\.py.*get_config")
def _config_without_get_config(a, d):
  p = put(d, "noget.py", "x = 1\n")
  return ["train-preference", "--config", f"{p}:tiny", "--workdir", "w"]


@case(CF, 2, r"dict\.py|ConfigDict|config")
def _config_returns_wrong_type(a, d):
  p = put(d, "dict.py", "def get_config(arg=None):\n  return 42\n")
  return ["train-preference", "--config", f"{p}:tiny", "--workdir", "w"]


@case(CF, 2, r"batch_size")
def _config_batch_zero(a, d):
  return train_pref("--config.batch_size=0")


@case(CF, 2, r"batch_size")
def _config_batch_negative(a, d):
  return train_pref("--config.batch_size=-4")


@case(CF, 2, r"num_steps")
def _config_steps_zero(a, d):
  return train_pref("--config.num_steps=0")


@case(CF, 2, r"lr")
def _config_lr_nan(a, d):
  return train_pref("--config.optim.lr=nan")


@case(CF, 2, r"nonexistent")
def _config_unknown_key(a, d):
  return train_pref("--config.nonexistent=1")


@case(CF, 2, r"batch_size")
def _config_wrong_type(a, d):
  return train_pref("--config.batch_size=abc")


@case(CF, 2, r"adir")
def _config_is_directory(a, d):
  (d / "in" / "adir").mkdir(parents=True)
  return ["train-preference", "--config", str(d / "in" / "adir") + ":tiny", "--workdir", "w"]


@case(CF, 2, r"batch_size")
def _lora_config_batch_zero(a, d):
  return ["train-lora", "--config", "lora_sd14:tiny", "--workdir", "w", "--config.batch_size=0"]


@case(CF, 2, r"lr")
def _lora_config_lr_inf(a, d):
  return ["train-lora", "--config", "lora_sd14:tiny", "--workdir", "w", "--config.optim.lr=inf"]


@case(CF, 2, r"override|--config\.")
def _config_override_without_value(a, d):
  return train_pref("--config.batch_size")


# ============================================================================================================
# archives (label on DiffusionDB parts)
# ============================================================================================================
AR = "archives"


def _db(d: Path, data: bytes, name="part-000001.zip") -> Path:
  p = put(d, f"db/{name}", data)
  return p.parent


def _bomb_zip() -> bytes:
  """A part zip holding a 2 GiB member of zeros (about 2 MB compressed) next to good members."""
  members, meta = good_members()
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for n, b in members.items():
      zf.writestr(n, b)
    with zf.open("bomb.png", "w", force_zip64=True) as f:
      chunk = b"\0" * (16 << 20)
      for _ in range(128):
        f.write(chunk)
    meta["bomb.png"] = {"p": "a cat"}
    zf.writestr("part-000001.json", json.dumps(meta))
  return buf.getvalue()


@case(AR, 1, r"skipped .*bomb\.png", memory=True)
def _zip_bomb_member(a, d):
  return label(a, d, _db(d, _bomb_zip()))


@case(AR, 1, r"skipped .*part-000001\.zip:m0\.png: cannot read zip member")
def _zip_corrupt_members(a, d):
  members, meta = good_members()
  data = part_zip(members, meta)
  return label(a, d, _db(d, data[:100] + os.urandom(200) + data[300:]))


@case(AR, 2, r"part-000001\.zip: not a readable zip archive")
def _zip_not_a_zip(a, d):
  return label(a, d, _db(d, b"PK\x03\x04 but then nothing"))


def _distinct_manifest_images(a, d):
  rows = [json.loads(line) for line in (d / "out" / "manifest.jsonl").read_text().splitlines()]
  images = [r.get("image") or r.get("file_name") for r in rows if r.get("kind") != "regularization"]
  assert len(images) == len(set(images)), f"two manifest rows share an image file: {images}"


@case(AR, 0, check=_distinct_manifest_images)
def _zip_name_collision(a, d):
  members, meta = good_members(3)
  members = {"../dup.png": members["m0.png"], "dup.png": members["m1.png"], "sub/dup.png": members["m2.png"],
             "m3.png": png(np.full((24, 24, 3), 200, np.uint8) + np.arange(24, dtype=np.uint8)[None, :, None])}  # fmt: skip
  return label(a, d, _db(d, part_zip(members, {k: {"p": "a cat"} for k in members})))


def _nothing_at_tmp_abs(a, d):
  assert not Path("/tmp/abs.png").exists(), "an absolute member name was extracted outside the output root"


@case(AR, 0, check=_nothing_at_tmp_abs)
def _zip_absolute_member(a, d):
  members, meta = good_members(3)
  members["/tmp/abs.png"] = png(np.full((24, 24, 3), 7, np.uint8) + np.arange(24, dtype=np.uint8)[:, None, None])
  return label(a, d, _db(d, part_zip(members, {k: {"p": "a cat"} for k in members})))


@case(AR, 2, r"part-000001\.json|part JSON")
def _zip_json_not_a_dict(a, d):
  members, _ = good_members()
  return label(a, d, _db(d, part_zip(members, b"[1, 2]")))


@case(AR, 2, r"part-000001\.json|part JSON")
def _zip_json_invalid(a, d):
  members, _ = good_members()
  return label(a, d, _db(d, part_zip(members, b"{oops")))


@case(AR, 2, r"no .*records|nothing")
def _zip_without_prompts(a, d):
  members, _ = good_members()
  return label(a, d, _db(d, part_zip(members, None)))


@case(AR, 2, r"no .*records|nothing")
def _zip_empty(a, d):
  return label(a, d, _db(d, part_zip({}, {})))


@case(AR, 1, r"ghost\.png: listed in part-000001\.json but not in the archive")
def _zip_json_lists_absent_members(a, d):
  members, meta = good_members()
  meta["ghost.png"] = {"p": "a cat"}
  return label(a, d, _db(d, part_zip(members, meta)))


@case(AR, 1, r"skipped .*m1\.png")
def _zip_member_crc_error(a, d):
  members, meta = good_members()
  data = bytearray(part_zip(members, meta))
  with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
    info = zf.getinfo("m1.png")
  start = info.header_offset + 30 + len(info.filename) + len(info.extra)
  data[start + info.compress_size // 2] ^= 0x55
  return label(a, d, _db(d, bytes(data)))


@case(AR, 1, r"skipped .*ratio\.png", memory=True)
def _zip_high_ratio_member(a, d):
  members, meta = good_members()
  members["ratio.png"] = b"\x89PNG\r\n\x1a\n" + b"\0" * (300 << 20)  # 300 MB of zeros: ratio ~1000:1
  meta["ratio.png"] = {"p": "a cat"}
  return label(a, d, _db(d, part_zip(members, meta)))


@case(AR, 1, r"skipped .*metadata\.jsonl:2")
def _regularization_bad_line(a, d):
  members, meta = good_members()
  args = label(a, d, _db(d, part_zip(members, meta)))
  reg = d / "in" / "reg"
  (reg / "metadata.jsonl").write_text(jsonl({"file_name": "r1.png", "caption": "a"}, "{oops"))
  return args


@case(AR, 1, r"skipped .*metadata\.jsonl:2.*escapes")
def _regularization_path_escape(a, d):
  members, meta = good_members()
  args = label(a, d, _db(d, part_zip(members, meta)))
  reg = d / "in" / "reg"
  (reg / "metadata.jsonl").write_text(jsonl({"file_name": "r1.png", "caption": "a"},
                                            {"file_name": "../../../etc/hostname", "caption": "b"}))  # fmt: skip
  return args


@case(AR, 2, r"noreg")
def _regularization_missing(a, d):
  members, meta = good_members()
  args = label(a, d, _db(d, part_zip(members, meta)))
  args[args.index("--regularization") + 1] = str(d / "in" / "noreg")
  return args


@case(AR, 2, r"part-000001\.zip: not a readable zip archive")
def _zip_central_directory_cut(a, d):
  members, meta = good_members()
  data = part_zip(members, meta)
  return label(a, d, _db(d, data[:-30]))


@case(AR, 1, r"skipped .*enc\.png")
def _zip_encrypted_member(a, d):
  members, meta = good_members()
  data = bytearray(part_zip({**members, "enc.png": png()}, {**meta, "enc.png": {"p": "a cat"}}))
  with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
    info = zf.getinfo("enc.png")
  data[info.header_offset + 6] |= 0x01  # the local header's "encrypted" flag
  for off in range(len(data) - 4):  # and the central directory's entry for the same member
    if data[off : off + 4] == b"PK\x01\x02" and data[off + 46 : off + 46 + 7] == b"enc.png":
      data[off + 8] |= 0x01
  return label(a, d, _db(d, bytes(data)))


@case(AR, 0)
def _zip_directory_entries(a, d):
  members, meta = good_members()
  members["folder.png/"] = b""
  return label(a, d, _db(d, part_zip(members, meta)))


@case(AR, 2, r"metadata\.parquet")
def _parquet_garbage(a, d):
  members, meta = good_members()
  db = _db(d, part_zip(members, meta))
  (db / "metadata.parquet").write_bytes(b"PAR1 garbage PAR1")
  return label(a, d, db)


# ============================================================================================================
# statistics files (fid against a hostile .npz)
# ============================================================================================================
ST = "stats"
_EYE = np.eye(2048, dtype=np.float64)
_MU = np.zeros(2048)


@case(ST, 2, r"ref\.npz")
def _stats_random_bytes(a, d):
  return fid_against(a, d, os.urandom(3000))


@case(ST, 2, r"ref\.npz")
def _stats_empty_file(a, d):
  return fid_against(a, d, b"")


@case(ST, 2, r"ref\.npz")
def _stats_text_file(a, d):
  return fid_against(a, d, b"mu = 0\nsigma = 1\n")


@case(ST, 2, r"ref\.npz")
def _stats_pickled_object_array(a, d):
  return fid_against(a, d, stats_npz(mu=np.array([{"x": 1}], dtype=object), sigma=_EYE))


@case(ST, 2, r"ref\.npz.*mu")
def _stats_missing_mu(a, d):
  return fid_against(a, d, stats_npz(sigma=_EYE))


@case(ST, 2, r"ref\.npz.*sigma")
def _stats_missing_sigma(a, d):
  return fid_against(a, d, stats_npz(mu=_MU))


@case(ST, 2, r"ref\.npz.*sigma")
def _stats_sigma_not_square(a, d):
  return fid_against(a, d, stats_npz(mu=_MU, sigma=np.zeros((2048, 10))))


@case(ST, 2, r"ref\.npz")
def _stats_dims_disagree(a, d):
  return fid_against(a, d, stats_npz(mu=np.zeros(10), sigma=_EYE))


@case(ST, 2, r"ref\.npz.*2048|ref\.npz.*dimension|ref\.npz.*features")
def _stats_wrong_feature_dim(a, d):
  return fid_against(a, d, stats_npz(mu=np.zeros(10), sigma=np.eye(10)))


@case(ST, 2, r"ref\.npz.*(NaN|non-finite|finite)")
def _stats_nan_mu(a, d):
  mu = _MU.copy()
  mu[3] = np.nan
  return fid_against(a, d, stats_npz(mu=mu, sigma=_EYE))


@case(ST, 2, r"ref\.npz.*(inf|non-finite|finite)")
def _stats_inf_sigma(a, d):
  s = _EYE.copy()
  s[1, 1] = np.inf
  return fid_against(a, d, stats_npz(mu=_MU, sigma=s))


@case(ST, 2, r"ref\.npz.*symmetric")
def _stats_asymmetric_sigma(a, d):
  s = _EYE.copy()
  s[0, 5] = 0.5
  return fid_against(a, d, stats_npz(mu=_MU, sigma=s))


@case(ST, 2, r"ref\.npz.*(positive semi-definite|PSD)")
def _stats_not_psd(a, d):
  s = _EYE.copy()
  s[0, 0] = -1000.0
  return fid_against(a, d, stats_npz(mu=_MU, sigma=s))


@case(ST, 2, r"ref\.npz")
def _stats_directory(a, d):
  (d / "in" / "ref.npz").mkdir(parents=True)
  return ["fid", str(a.images[0].parent), str(d / "in" / "ref.npz"), "--inception-weights", str(a.inception)]


@case(ST, 2, r"ref\.npz", memory=True)
def _stats_npy_header_bomb(a, d):
  header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (200000, 200000), }"
  header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
  npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("mu.npy", npy)
    zf.writestr("sigma.npy", npy)
  return fid_against(a, d, buf.getvalue())


@case(ST, 2, r"ref\.npz")
def _stats_truncated(a, d):
  data = stats_npz(mu=_MU, sigma=_EYE)
  return fid_against(a, d, data[: len(data) // 3])


@case(ST, 2, r"ref\.npz.*(sigma|shape|2-D|matrix)")
def _stats_sigma_scalar(a, d):
  return fid_against(a, d, stats_npz(mu=_MU, sigma=np.float64(1.0)))


# ============================================================================================================
# faults: signals, a full disk, an unwritable place, an internal error
# ============================================================================================================
FT = "faults"


def _many_pairs(a, d, n=4000):
  return score_pairs(a, d, jsonl(*[_row(a, i % 3) for i in range(n)]), "--batch-size", "1")


def _no_output(a, d):
  """Nothing but the resumable partial result (OUT.partial and its settings, which --resume continues) is left."""
  left = sorted(p.name for p in (d / "out").iterdir() if not p.name.endswith((".partial", ".partial.json")))
  assert left == [], f"an interrupted run left files behind: {left}"


@case(FT, 143, r"stopped by SIGTERM", signal=15, ready="scoring:", check=_no_output)
def _score_sigterm(a, d):
  return _many_pairs(a, d)


@case(FT, 130, r"stopped by SIGINT", signal=2, ready="scoring:", check=_no_output)
def _score_sigint(a, d):
  return _many_pairs(a, d)


def _no_partial_files(a, d):
  partial = [str(p) for p in (d / "out").rglob("*") if ".tmp" in p.name]
  assert not partial, f"an interrupted run left partial files: {partial}"
  assert not (d / "out" / "s" / "samples.jsonl").exists(), "an interrupted run wrote its summary"


@case(FT, 143, r"stopped by SIGTERM", signal=15, ready="sampling|denoising|it/s|img/s", check=_no_partial_files)
def _sample_sigterm(a, d):
  return _sample(a, "--steps", "50", "--num-images", "40", "--batch-size", "1", "--height", "64", "--width", "64",
                 outdir="s")  # fmt: skip


@case(FT, 2, r"scores\.jsonl.*(File too large|cannot write|No space)", env={"HOSTILE_FSIZE": "2000"}, check=_no_output)
def _score_disk_full(a, d):
  return _many_pairs(a, d, 200)


@case(FT, 2, r"/proc/")
def _score_output_unwritable_place(a, d):
  return score_ckpt(a, a.ckpt)[:-1] + ["/proc/hps-jax-nope/scores.jsonl"]


@case(FT, 3, r"internal error: RuntimeError: injected fault.*traceback is in", fault="scorer")
def _internal_error_logged(a, d):
  return score_ckpt(a, a.ckpt)


@case(FT, 2, r"cache|HPS_JAX_CACHE", env={"HPS_JAX_CACHE": "cachefile"})
def _weights_cache_is_a_file(a, d):
  (d / "out" / "cachefile").write_text("x")
  return ["weights", "path", "sd-v1-4"]


CASES_BY_NAME = {c.name: c for c in CASES}
