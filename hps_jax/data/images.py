"""Robust image loading: anything image-like in, ``uint8`` RGB ``(H, W, 3)`` out, or a clear :class:`ImageError`.

:func:`load_image` accepts

* a path (``str`` / ``os.PathLike``) or a binary file object,
* ``bytes`` / ``bytearray`` / ``memoryview`` holding an encoded image (JPEG, PNG, WebP, GIF, ...),
* a ``PIL.Image.Image`` (lazily opened ones are fully decoded here),
* a ``numpy`` array, channels-last: ``(H, W)`` gray, ``(H, W, 1)``, ``(H, W, 2)`` gray+alpha, ``(H, W, 3)`` RGB or
  ``(H, W, 4)`` RGBA.

Every failure raises :class:`ImageError` (a ``ValueError``) whose message names the source (the path for files) and
says what went wrong; no raw PIL / OS exception escapes (the original is chained as ``__cause__``).

Decisions (each is tested in ``tests/data/test_images.py``):

* **Full decode.** Files are decoded completely (``img.load()``) so truncated or corrupt JPEG/PNG data is detected
  at load time. ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is *not* enabled here; if some other code sets that global
  to ``True``, PIL itself stops reporting truncation and this module cannot detect it either.
* **Alpha** (RGBA, LA, PA, palette or L/RGB images with a ``tRNS`` transparency key, premultiplied modes and 2/4
  channel arrays) is composited onto ``background``, **black** ``(0, 0, 0)`` by default:
  ``out = round((rgb * a + bg * (255 - a)) / 255)`` in exact integer arithmetic. Black is the default because it
  agrees with the reference HPS / CLIP pipelines (``img.convert("RGB")``) wherever transparent pixels store black,
  which is what most encoders write, and with the black pad fill of ``preprocess`` ``pad`` mode.
  ``background`` may be an int (gray level) or an RGB triple; ``background=None`` drops the alpha channel without
  compositing, exactly like PIL's ``convert("RGB")`` (bit-exact parity with the reference pipelines).
* **16-bit data** (PNG modes ``I;16*`` / ``I``, ``uint16`` arrays) is reduced to 8 bits by ``value >> 8``
  (the high byte; a linear rescale, never clipping). Mode ``I`` values outside ``[0, 65535]`` are rejected.
  16-bit RGB(A) PNGs are reduced by PIL's decoder itself, which also keeps the high byte.
* **Float data** (``float*`` arrays, PIL mode ``F``) is accepted only when every value is finite and lies in
  ``[0, 1]``; it is mapped by ``round(x * 255)``. Anything else is rejected (convert 0..255 floats to ``uint8``
  yourself: the scale of such data is ambiguous). Other integer arrays (``int64`` from ``np.array(list)``, ...)
  are accepted when their values lie in ``[0, 255]``; ``bool`` arrays map to 0 / 255.
* **Colour spaces**: CMYK (including Adobe-inverted CMYK JPEGs), YCbCr, 1-bit, L, P, LA, ... go through PIL's
  conversions to RGB. Embedded ICC profiles are not applied.
* **EXIF orientation** is applied (``ImageOps.exif_transpose``) for encoded sources and PIL images; pass
  ``exif_transpose=False`` to keep the stored pixel order. Unreadable EXIF metadata is ignored (the pixels are
  fine), not treated as an error.
* **Multi-frame** files (animated GIF / WebP, multi-page TIFF): the first frame is used.
* **Decompression bombs**: encoded images with more than ``max_pixels`` pixels (default ``DEFAULT_MAX_PIXELS``,
  PIL's default limit of about 89.5 Mpx, whatever ``PIL.Image.MAX_IMAGE_PIXELS`` has been set to) are rejected
  from their header, before any pixel is decoded; PIL's own ``DecompressionBombError`` is reported the same way.
  ``max_pixels=None`` disables the check here (PIL still refuses images above twice its own limit). Arrays and
  PIL images are already in memory and not checked. Alpha compositing works in 16-bit integers, so an image at
  the limit costs about 3 bytes per pixel for its RGB copy plus 2 per channel while compositing.
* **Paths** that cannot name a file (a NUL character, a lone surrogate from a JSON string) are an ImageError, like
  a missing file.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hps_jax.errors import InputError

__all__ = ["ImageError", "load_image", "describe", "DEFAULT_MAX_PIXELS"]

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray, Any]

# PIL's default (1024 ** 3 // 4 // 3, about 89.5 Mpx: a 268 MB RGB image); PIL's global is not consulted, so code
# elsewhere that sets `Image.MAX_IMAGE_PIXELS = None` does not switch this guard off (pass max_pixels instead).
DEFAULT_MAX_PIXELS: int | None = 1024 * 1024 * 1024 // 4 // 3

_DEFAULT = object()  # sentinel: "use DEFAULT_MAX_PIXELS"

# Modes that carry an alpha channel (premultiplied La / RGBa are un-premultiplied by convert("RGBA")).
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_INT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(InputError):
  """An image could not be loaded or understood.

  Attributes:
    source: printable name of what was being loaded (the path for files, see :func:`describe`).
    message: what went wrong, without the source.
  """

  def __init__(self, source: Any, message: str):
    self.source = source if isinstance(source, str) else describe(source)
    self.message = message
    super().__init__(f"{self.source}: {message}")

  def __reduce__(self):  # keep picklable (multiprocessing data loaders) despite the 2-argument __init__
    return (type(self), (self.source, self.message))


def describe(src: Any) -> str:
  """A short printable name for an image source: the path for files, a summary for in-memory data."""
  if isinstance(src, (str, os.PathLike)):
    try:
      return os.fspath(src)
    except TypeError:  # os.PathLike returning bytes, or a broken __fspath__
      return repr(src)
  if isinstance(src, (bytes, bytearray, memoryview)):
    return f"<{type(src).__name__} of {len(memoryview(src).cast('B'))} bytes>"
  if isinstance(src, Image.Image):
    name = getattr(src, "filename", "") or ""
    if name:
      return os.fspath(name) if isinstance(name, (str, os.PathLike)) else repr(name)
    return f"<PIL.Image mode={src.mode} size={src.size[0]}x{src.size[1]}>"
  if isinstance(src, np.ndarray):
    return f"<ndarray shape={tuple(src.shape)} dtype={src.dtype}>"
  name = getattr(src, "name", None)  # file objects
  if isinstance(name, (str, os.PathLike)):
    return os.fspath(name)
  text = repr(src)
  return text if len(text) <= 80 else text[:77] + "..."


def _parse_background(background) -> tuple[int, int, int] | None:
  if background is None:
    return None
  if isinstance(background, (int, np.integer)) and not isinstance(background, bool):
    background = (int(background),) * 3
  try:
    bg = tuple(int(v) for v in background)
  except TypeError:
    raise TypeError(f"background must be None, an int or an (r, g, b) triple, got {background!r}") from None
  if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
    raise ValueError(
      f"background must be None, an int in [0, 255] or an (r, g, b) triple in [0, 255], got {background!r}"
    )
  return bg


def _composite(rgba: np.ndarray, background: tuple[int, int, int] | None) -> np.ndarray:
  """(H, W, 4) uint8 -> (H, W, 3) uint8, alpha-blended onto ``background`` (or alpha dropped when None)."""
  rgb = rgba[..., :3]
  if background is None:
    return np.ascontiguousarray(rgb)
  # exact integer arithmetic in 16 bits: rgb * a + bg * (255 - a) + 127 <= 255 * 255 + 127 = 65152 < 2 ** 16
  a = rgba[..., 3:4].astype(np.uint16)
  bg = np.asarray(background, dtype=np.uint16)
  out = rgb.astype(np.uint16) * a
  out += bg * (255 - a)
  out += 127
  out //= 255  # round half up
  return out.astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))


def _float_to_uint8(src: Any, arr: np.ndarray) -> np.ndarray:
  arr = np.asarray(arr, dtype=np.float64)
  if arr.size and not np.all(np.isfinite(arr)):
    raise ImageError(src, "float image contains NaN or infinite values")
  if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
    raise ImageError(
      src,
      f"float image values must lie in [0, 1] (got range [{arr.min():.6g}, {arr.max():.6g}]); "
      "convert 0..255 data to uint8 first",
    )
  return np.round(arr * 255.0).astype(np.uint8)


def _int_to_uint8(src: Any, arr: np.ndarray) -> np.ndarray:
  """Integer/bool array of any width -> uint8, under the policy in the module docstring."""
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype == np.bool_:
    return arr.astype(np.uint8) * 255
  if arr.dtype == np.uint16:
    return (arr >> 8).astype(np.uint8)
  if np.issubdtype(arr.dtype, np.integer):
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      raise ImageError(
        src,
        f"{arr.dtype} image values must lie in [0, 255] (got range [{arr.min()}, {arr.max()}]); "
        "pass uint16 for 16-bit data",
      )
    return arr.astype(np.uint8)
  if np.issubdtype(arr.dtype, np.floating):
    return _float_to_uint8(src, arr)
  raise ImageError(src, f"unsupported array dtype {arr.dtype}")


def _array_to_rgb(src: Any, arr: np.ndarray, background) -> np.ndarray:
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
    raise ImageError(
      src, f"expected a channels-last array of shape (H, W) or (H, W, C) with C in 1..4, got shape {tuple(arr.shape)}"
    )
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ImageError(src, f"image has no pixels (shape {tuple(arr.shape)})")
  arr = _int_to_uint8(src, arr)
  if arr.ndim == 2:
    return _gray_to_rgb(arr)
  c = arr.shape[-1]
  if c == 3:
    return np.array(arr, dtype=np.uint8, order="C", copy=True)  # never alias the caller's buffer
  if c == 2:  # gray + alpha
    arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=-1), arr[..., 1:]], axis=-1)
  return _composite(arr, background)


def _pil_to_rgb(src: Any, img: Image.Image, background) -> np.ndarray:
  mode = img.mode
  if mode in _INT16_MODES or mode == "I":
    arr = np.asarray(img)
    if mode == "I":
      if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ImageError(
          src, f"32-bit integer image values outside the 16-bit range [0, 65535] (got [{arr.min()}, {arr.max()}])"
        )
    return _gray_to_rgb((arr.astype(np.uint32) >> 8).astype(np.uint8))
  if mode == "F":
    return _gray_to_rgb(_float_to_uint8(src, np.asarray(img)))
  if mode in _ALPHA_MODES or "transparency" in img.info:
    try:
      rgba = img.convert("RGBA")
    except (ValueError, OSError) as e:
      raise ImageError(src, f"cannot convert mode {mode} to RGBA: {e}") from e
    return _composite(np.asarray(rgba), background)
  if mode == "RGB":
    return np.array(img, dtype=np.uint8)
  try:
    rgb = img.convert("RGB")
  except (ValueError, OSError) as e:
    raise ImageError(src, f"unsupported image mode {mode}: {e}") from e
  return np.array(rgb, dtype=np.uint8)


def _apply_exif(img: Image.Image) -> Image.Image:
  try:
    out = ImageOps.exif_transpose(img)
  except Exception:  # malformed EXIF block: keep the pixels as stored
    return img
  return img if out is None else out


def _open_encoded(src: Any, fp, max_pixels) -> Image.Image:
  """Opens and fully decodes an encoded image from a file object, mapping every failure to ImageError."""
  try:
    with warnings.catch_warnings():
      # the pixel limit is enforced below, with a clearer error, instead of PIL's warning
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(fp)
  except Image.DecompressionBombError as e:
    raise ImageError(src, f"refusing to decode a possible decompression bomb: {e}") from e
  except UnidentifiedImageError as e:
    raise ImageError(src, "not a recognised image format (unreadable header or not an image file)") from e
  except Exception as e:  # OSError, ValueError, SyntaxError, EOFError, struct.error from broken headers, ...
    if "truncated" in str(e).lower():
      raise ImageError(src, f"truncated image header ({e})") from e
    raise ImageError(src, f"cannot open image: {type(e).__name__}: {e}") from e
  w, h = img.size
  if w <= 0 or h <= 0:
    raise ImageError(src, f"image header declares no pixels ({w}x{h})")
  if max_pixels is not None and w * h > max_pixels:
    raise ImageError(
      src,
      f"refusing to decode a possible decompression bomb: {w}x{h} = {w * h} pixels exceeds "
      f"the limit of {max_pixels} (pass max_pixels to raise it)",
    )
  _load_pixels(src, img)
  return img


def _load_pixels(src: Any, img: Image.Image) -> None:
  w, h = img.size
  try:
    img.load()  # force a full decode so truncated / corrupt data is detected now
  except Image.DecompressionBombError as e:
    raise ImageError(src, f"refusing to decode a possible decompression bomb: {e}") from e
  except MemoryError as e:
    raise ImageError(src, f"out of memory decoding a {w}x{h} image") from e
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, zlib.error, ...
    msg = str(e)
    if "truncated" in msg.lower():
      raise ImageError(src, f"truncated image data ({msg})") from e
    raise ImageError(src, f"corrupt image data: {type(e).__name__}: {msg}") from e


def load_image(
  src: ImageSource,
  *,
  background: int | tuple[int, int, int] | None = (0, 0, 0),
  max_pixels: int | None | object = _DEFAULT,
  exif_transpose: bool = True,
) -> np.ndarray:
  """Loads ``src`` as a ``uint8`` RGB array of shape ``(H, W, 3)`` (C-contiguous, owning its memory).

  Args:
    src: path, binary file object, encoded ``bytes``, ``PIL.Image.Image`` or ``numpy`` array (see module doc).
    background: colour that alpha is composited onto: an int gray level, an ``(r, g, b)`` triple, or ``None`` to
      drop alpha without compositing (PIL ``convert("RGB")`` behaviour). Default black.
    max_pixels: largest ``width * height`` accepted for encoded images; ``None`` disables the check.
    exif_transpose: apply the EXIF orientation tag (encoded sources and PIL images).

  Raises:
    ImageError: the source is missing, empty, not an image, truncated/corrupt, too large, or has an unsupported
      layout; the message names the source.
  """
  bg = _parse_background(background)
  if max_pixels is _DEFAULT:
    max_pixels = DEFAULT_MAX_PIXELS
  name = describe(src)

  if isinstance(src, np.ndarray):
    return _array_to_rgb(name, src, bg)

  if isinstance(src, Image.Image):
    if src.size[0] <= 0 or src.size[1] <= 0:
      raise ImageError(name, f"image has no pixels ({src.size[0]}x{src.size[1]})")
    _load_pixels(name, src)  # a lazily opened image may still be undecoded (and truncated)
    return _decode_to_rgb(name, src, bg, exif_transpose)

  if isinstance(src, (bytes, bytearray, memoryview)):
    data = bytes(src)
    if not data:
      raise ImageError(name, "empty data (0 bytes)")
    img = _open_encoded(name, io.BytesIO(data), max_pixels)
  elif isinstance(src, (str, os.PathLike)):
    try:
      path = os.fspath(src)
    except TypeError as e:
      raise ImageError(name, f"invalid path: {e}") from e
    try:
      if os.path.isdir(path):
        raise ImageError(name, "is a directory, not an image file")
      st = os.stat(path)
      if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever, a device never ends
        raise ImageError(name, "not a regular file (a device, FIFO or socket)")
      size = st.st_size
    except FileNotFoundError as e:
      raise ImageError(name, "file not found") from e
    except OSError as e:
      raise ImageError(name, f"cannot access file: {e.strerror or e}") from e
    except ImageError:
      raise
    except ValueError as e:  # embedded NUL, a lone surrogate the file system encoding cannot take
      raise ImageError(repr(path), f"not a usable file path ({e})") from e
    if size == 0:
      raise ImageError(name, "empty file (0 bytes)")
    try:
      fp = open(path, "rb")
    except (OSError, ValueError) as e:
      raise ImageError(name, f"cannot open file: {getattr(e, 'strerror', None) or e}") from e
    with fp:  # decode and convert while the file is open (PIL may read trailing chunks lazily)
      return _decode_to_rgb(name, _open_encoded(name, fp, max_pixels), bg, exif_transpose)
  elif hasattr(src, "read"):
    img = _open_encoded(name, src, max_pixels)
  else:
    raise ImageError(
      name,
      f"unsupported image source type {type(src).__name__}; expected a path, bytes, "
      "a file object, a PIL image or a numpy array",
    )
  return _decode_to_rgb(name, img, bg, exif_transpose)


def _decode_to_rgb(name: str, img: Image.Image, bg, exif_transpose: bool) -> np.ndarray:
  # multi-frame files: Image.open positions on (and load() decoded) the first frame
  try:
    img = _apply_exif(img) if exif_transpose else img
    return _pil_to_rgb(name, img, bg)
  except ImageError:
    raise
  except Exception as e:
    raise ImageError(name, f"cannot convert image to RGB: {type(e).__name__}: {e}") from e


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(directory) -> list[Path]:
  """Every image file below a directory (recursive, by extension, case-insensitive), sorted by path."""
  d = Path(directory)
  files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise InputError(f"{d}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
  return files
