"""hps_jax.data.images.load_image on a corpus of good and broken files written to tmp_path, plus in-memory inputs."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from hps_jax.data.images import ImageError, describe, load_image

# ----------------------------------------------------------------------------------------------------- helpers


def _rgb(h=24, w=32, seed=0):
  """Blocky RGB test image (8x8 constant blocks, so lossy codecs keep block centres close)."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, size=(-(-h // 8), -(-w // 8), 3), dtype=np.uint8)
  return np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:h, :w])


def _save(path, img, fmt=None, **kw):
  img.save(path, format=fmt, **kw)
  return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(width, height, bit_depth, color_type, rows: bytes) -> bytes:
  """Minimal PNG writer (filter 0 on every row), for layouts PIL cannot write (16-bit RGB)."""
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", ihdr)
    + _png_chunk(b"IDAT", zlib.compress(rows))
    + _png_chunk(b"IEND", b"")
  )


def _mode(path):
  with Image.open(path) as im:
    return im.mode


def _pil_rgb(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _assert_error(src, *fragments, **kw):
  with pytest.raises(ImageError) as info:
    load_image(src, **kw)
  msg = str(info.value)
  for frag in fragments:
    assert frag.lower() in msg.lower(), f"{frag!r} not in {msg!r}"
  assert info.value.__cause__ is None or not isinstance(info.value.__cause__, ImageError)
  return info.value


# ------------------------------------------------------------------------------------------------ good files


def test_png_lossless_roundtrip(tmp_path):
  arr = _rgb()
  path = _save(tmp_path / "good.png", Image.fromarray(arr))
  out = load_image(path)
  assert out.dtype == np.uint8 and out.shape == (24, 32, 3) and out.flags.c_contiguous
  np.testing.assert_array_equal(out, arr)
  np.testing.assert_array_equal(load_image(str(path)), arr)  # str and PathLike


def test_jpeg(tmp_path):
  arr = _rgb(48, 64)
  path = _save(tmp_path / "good.jpg", Image.fromarray(arr), quality=95)
  out = load_image(path)
  assert out.shape == (48, 64, 3) and out.dtype == np.uint8
  # lossy: compare the centres of the 8x8 constant blocks
  centres = (slice(3, None, 8), slice(3, None, 8))
  assert np.abs(out[centres].astype(int) - arr[centres].astype(int)).max() <= 12


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_lossless(tmp_path):
  arr = _rgb(20, 30)
  path = _save(tmp_path / "good.webp", Image.fromarray(arr), lossless=True)
  np.testing.assert_array_equal(load_image(path), arr)


def test_bytes_and_file_object(tmp_path):
  arr = _rgb()
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  np.testing.assert_array_equal(load_image(buf.getvalue()), arr)
  np.testing.assert_array_equal(load_image(bytearray(buf.getvalue())), arr)
  np.testing.assert_array_equal(load_image(memoryview(buf.getvalue())), arr)
  buf.seek(0)
  np.testing.assert_array_equal(load_image(buf), arr)


def test_grayscale_and_bilevel(tmp_path):
  gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
  out = load_image(_save(tmp_path / "gray.png", Image.fromarray(gray)))
  assert out.shape == (16, 16, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)
  bits = np.zeros((8, 8), dtype=bool)
  bits[::2] = True
  out = load_image(_save(tmp_path / "bits.png", Image.fromarray(bits)))  # mode "1"
  np.testing.assert_array_equal(out[..., 0], np.where(bits, 255, 0))


def test_palette_png(tmp_path):
  palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 17, 34, 51]
  idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
  img = Image.fromarray(idx, mode="L").convert("P")
  img.putpalette(palette + [0] * (768 - len(palette)))
  img.frombytes(idx.tobytes())
  path = _save(tmp_path / "palette.png", img)
  assert _mode(path) == "P"
  expected = np.array(palette, dtype=np.uint8).reshape(4, 3)[idx]
  np.testing.assert_array_equal(load_image(path), expected)

  # palette with a transparent entry (tRNS): index 3 composited onto the background
  img.info["transparency"] = 3
  path = _save(tmp_path / "palette_trns.png", img, transparency=3)
  out = load_image(path)
  np.testing.assert_array_equal(out[0, 3], [0, 0, 0])
  np.testing.assert_array_equal(out[0, :3], expected[0, :3])
  np.testing.assert_array_equal(load_image(path, background=255)[0, 3], [255, 255, 255])


def test_rgba_compositing_numbers(tmp_path):
  rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [10, 20, 30, 64]]], np.uint8)
  path = _save(tmp_path / "alpha.png", Image.fromarray(rgba, mode="RGBA"))
  # default: black background, out = round(rgb * a / 255)
  np.testing.assert_array_equal(load_image(path), [[[200, 100, 50], [0, 0, 0], [100, 50, 25], [3, 5, 8]]])
  # white background: round(rgb * a / 255 + 255 * (255 - a) / 255)
  np.testing.assert_array_equal(
    load_image(path, background=(255, 255, 255)), [[[200, 100, 50], [255, 255, 255], [227, 177, 152], [194, 196, 199]]]
  )
  np.testing.assert_array_equal(load_image(path, background=255), load_image(path, background=(255, 255, 255)))
  # arbitrary colour, checked against the float formula
  bg = np.array([30, 60, 90])
  a = rgba[..., 3:].astype(float) / 255
  want = np.round(rgba[..., :3] * a + bg * (1 - a)).astype(np.uint8)
  np.testing.assert_array_equal(load_image(path, background=tuple(bg)), want)
  # background=None drops alpha exactly like PIL's convert("RGB")
  np.testing.assert_array_equal(load_image(path, background=None), rgba[..., :3])
  np.testing.assert_array_equal(load_image(path, background=None), _pil_rgb(path))


def test_la_png(tmp_path):
  la = np.array([[[100, 255], [100, 0], [200, 128]]], np.uint8)
  path = _save(tmp_path / "la.png", Image.fromarray(la, mode="LA"))
  np.testing.assert_array_equal(load_image(path), [[[100] * 3, [0] * 3, [100] * 3]])
  np.testing.assert_array_equal(load_image(path, background=255), [[[100] * 3, [255] * 3, [227] * 3]])


def test_cmyk_jpeg(tmp_path):
  # quadrants: cyan, magenta, yellow, black ink
  cmyk = np.zeros((32, 32, 4), np.uint8)
  cmyk[:16, :16, 0] = 255
  cmyk[:16, 16:, 1] = 255
  cmyk[16:, :16, 2] = 255
  cmyk[16:, 16:, 3] = 255
  path = _save(tmp_path / "cmyk.jpg", Image.fromarray(cmyk, mode="CMYK"), quality=95)
  assert _mode(path) == "CMYK"
  out = load_image(path)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  want = {(8, 8): (0, 255, 255), (8, 24): (255, 0, 255), (24, 8): (255, 255, 0), (24, 24): (0, 0, 0)}
  for (y, x), rgb in want.items():
    assert np.abs(out[y, x].astype(int) - rgb).max() <= 6, ((y, x), out[y, x], rgb)


def test_16bit_gray_png_is_high_byte(tmp_path):
  values = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # full 0..65535 gradient
  path = _save(tmp_path / "gray16.png", Image.fromarray(values))
  data = path.read_bytes()
  assert data[24] == 16 and data[25] == 0  # IHDR: 16-bit grayscale
  assert _mode(path).startswith("I")
  out = load_image(path)
  want = (values >> 8).astype(np.uint8)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], want)
  # a scaled conversion, not a clip: every 8-bit level appears exactly 256 times
  assert np.bincount(out[..., 0].ravel(), minlength=256).tolist() == [256] * 256


def test_16bit_rgb_png_is_high_byte(tmp_path):
  rng = np.random.default_rng(1)
  values = rng.integers(0, 65536, size=(5, 7, 3), dtype=np.uint16)
  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
  path = tmp_path / "rgb16.png"
  path.write_bytes(_raw_png(7, 5, 16, 2, rows))
  np.testing.assert_array_equal(load_image(path), (values >> 8).astype(np.uint8))


def test_exif_orientation_applied(tmp_path):
  arr = _rgb(16, 40)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  path = _save(tmp_path / "rotated.png", Image.fromarray(arr), exif=exif)
  out = load_image(path)
  assert out.shape == (40, 16, 3)
  np.testing.assert_array_equal(out, np.rot90(arr, k=-1))
  np.testing.assert_array_equal(load_image(path, exif_transpose=False), arr)
  jpg = _save(tmp_path / "rotated.jpg", Image.fromarray(arr), exif=exif, quality=95)
  assert load_image(jpg).shape == (40, 16, 3)


def test_animated_gif_first_frame(tmp_path):
  frames = [Image.new("RGB", (6, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
  path = tmp_path / "anim.gif"
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=10)
  out = load_image(path)
  assert out.shape == (4, 6, 3)
  np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


# ------------------------------------------------------------------------------------------------- bad files


def test_missing_path(tmp_path):
  path = tmp_path / "nope.png"
  err = _assert_error(path, "nope.png", "not found")
  assert err.source == str(path)
  assert isinstance(err, ValueError)


def test_empty_file(tmp_path):
  path = tmp_path / "empty.jpg"
  path.write_bytes(b"")
  _assert_error(path, "empty.jpg", "0 bytes")
  _assert_error(b"", "0 bytes")


def test_truncated_jpeg(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(_rgb(128, 128, seed=3)).save(buf, format="JPEG", quality=90)
  data = buf.getvalue()
  path = tmp_path / "truncated.jpg"
  path.write_bytes(data[: len(data) // 2])
  err = _assert_error(path, "truncated.jpg", "truncated")
  assert err.__cause__ is not None  # the PIL error is chained, not lost
  _assert_error(data[: len(data) // 2], "bytes", "truncated")
  # a lazily opened PIL image is decoded (and checked) too
  lazy = Image.open(io.BytesIO(data[: len(data) // 2]))
  _assert_error(lazy, "truncated")


def test_truncated_png(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(_rgb(64, 64, seed=4)).save(buf, format="PNG")
  data = buf.getvalue()
  path = tmp_path / "truncated.png"
  path.write_bytes(data[: len(data) // 2])
  _assert_error(path, "truncated.png")


def test_corrupt_png_data(tmp_path):
  # valid header, IDAT that is not a zlib stream
  ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
  data = (
    b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"garbage!" * 4) + _png_chunk(b"IEND", b"")
  )
  path = tmp_path / "corrupt.png"
  path.write_bytes(data)
  _assert_error(path, "corrupt.png")


def test_text_file_named_jpg(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("this is not an image\n" * 10)
  _assert_error(path, "notes.jpg", "not a recognised image")


def test_directory(tmp_path):
  _assert_error(tmp_path, str(tmp_path), "directory")


def test_decompression_bomb(tmp_path):
  buf = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buf, format="PNG")
  data = bytearray(buf.getvalue())
  # claim 100000 x 100000 pixels in IHDR (and fix its CRC): PIL's own bomb error
  ihdr = bytes(data[12:16]) + struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
  data[16:24] = ihdr[4:12]
  data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
  path = tmp_path / "bomb.png"
  path.write_bytes(bytes(data))
  _assert_error(path, "bomb.png", "decompression bomb")
  # our own limit, checked from the header before decoding
  small = _save(tmp_path / "big.png", Image.fromarray(_rgb(40, 40)))
  _assert_error(small, "big.png", "decompression bomb", "1600", max_pixels=1000)
  assert load_image(small, max_pixels=1600).shape == (40, 40, 3)
  assert load_image(small, max_pixels=None).shape == (40, 40, 3)


def test_unsupported_source_type():
  _assert_error(12345, "12345", "unsupported image source")


# -------------------------------------------------------------------------------------------- numpy / PIL inputs


def test_numpy_layouts():
  arr = _rgb(5, 6)
  out = load_image(arr)
  np.testing.assert_array_equal(out, arr)
  assert out is not arr and not np.shares_memory(out, arr)
  gray = arr[..., 0]
  np.testing.assert_array_equal(load_image(gray), np.stack([gray] * 3, -1))
  np.testing.assert_array_equal(load_image(gray[..., None]), np.stack([gray] * 3, -1))
  rgba = np.concatenate([arr, np.full((5, 6, 1), 128, np.uint8)], -1)
  np.testing.assert_array_equal(load_image(rgba), (arr.astype(int) * 128 + 127) // 255)
  la = np.stack([gray, np.zeros_like(gray)], -1)
  np.testing.assert_array_equal(load_image(la, background=(1, 2, 3)), np.broadcast_to([1, 2, 3], (5, 6, 3)))
  np.testing.assert_array_equal(load_image(arr[:, ::-1]), arr[:, ::-1])  # non-contiguous view


def test_numpy_dtypes():
  f = np.linspace(0, 1, 12).reshape(2, 2, 3)
  np.testing.assert_array_equal(load_image(f), np.round(f * 255).astype(np.uint8))
  np.testing.assert_array_equal(load_image(f.astype(np.float32)), np.round(f * 255).astype(np.uint8))
  _assert_error(f * 255, "float", "[0, 1]")
  _assert_error(np.full((2, 2, 3), np.nan), "nan")
  _assert_error(-f, "[0, 1]")
  ints = np.array([[[0, 128, 255]]])  # int64
  np.testing.assert_array_equal(load_image(ints), [[[0, 128, 255]]])
  _assert_error(ints * 2, "[0, 255]")
  u16 = np.array([[[0, 255, 256], [65535, 32768, 511]]], np.uint16)
  np.testing.assert_array_equal(load_image(u16), [[[0, 0, 1], [255, 128, 1]]])
  np.testing.assert_array_equal(load_image(np.array([[True, False]])), [[[255] * 3, [0] * 3]])


def test_numpy_bad_shapes():
  _assert_error(np.zeros((3, 16, 16), np.uint8), "shape (3, 16, 16)", "channels-last")
  _assert_error(np.zeros((16,), np.uint8), "shape")
  _assert_error(np.zeros((0, 4, 3), np.uint8), "no pixels")
  _assert_error(np.zeros((2, 2, 3), np.complex64), "dtype")


def test_pil_inputs():
  arr = _rgb(6, 9)
  np.testing.assert_array_equal(load_image(Image.fromarray(arr)), arr)
  np.testing.assert_array_equal(
    load_image(Image.fromarray(arr).convert("YCbCr")), np.asarray(Image.fromarray(arr).convert("YCbCr").convert("RGB"))
  )
  fl = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
  np.testing.assert_array_equal(load_image(fl)[..., 0], [[0, 128, 255]])
  _assert_error(Image.fromarray(np.array([[0.0, 2.0]], np.float32), mode="F"), "[0, 1]")
  i32 = Image.fromarray(np.array([[0, 256, 65535]], np.int32), mode="I")
  np.testing.assert_array_equal(load_image(i32)[..., 0], [[0, 1, 255]])
  _assert_error(Image.fromarray(np.array([[0, 70000]], np.int32), mode="I"), "16-bit")


def test_describe_and_error_attributes(tmp_path):
  assert describe(tmp_path / "a.png") == str(tmp_path / "a.png")
  assert describe(b"abc") == "<bytes of 3 bytes>"
  assert describe(np.zeros((2, 3), np.uint8)) == "<ndarray shape=(2, 3) dtype=uint8>"
  assert describe(Image.new("RGB", (4, 5))) == "<PIL.Image mode=RGB size=4x5>"
  path = _save(tmp_path / "named.png", Image.new("RGB", (2, 2)))
  with Image.open(path) as im:
    assert describe(im) == str(path)
  err = ImageError(tmp_path / "x.jpg", "broken")
  assert err.source == str(tmp_path / "x.jpg") and err.message == "broken"
  assert str(err) == f"{tmp_path / 'x.jpg'}: broken"
  again = pickle.loads(pickle.dumps(err))
  assert isinstance(again, ImageError) and str(again) == str(err)


def test_background_validation(tmp_path):
  with pytest.raises(ValueError):
    load_image(np.zeros((2, 2, 4), np.uint8), background=(0, 0, 300))
  with pytest.raises(ValueError):
    load_image(np.zeros((2, 2, 4), np.uint8), background=(0, 0))
