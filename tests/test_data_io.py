from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from patchssl.data.io import (
    ImageReadError,
    load_image,
    load_pil_image,
    pil_to_tensor,
    resize_image,
    to_8bit,
)


def _rgb(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip_without_resize(tmp_path: Path) -> None:
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 60)
    assert torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))


@pytest.mark.parametrize("size, expected", [(32, (32, 32)), ((24, 48), (24, 48))])
@pytest.mark.parametrize("mode", ["stretch", "pad", "center_crop"])
def test_resize_modes_give_working_size(tmp_path: Path, size, expected, mode: str) -> None:
    Image.fromarray(_rgb(40, 100)).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", size, resize=mode)
    assert out.shape == (3, *expected)


def test_pad_letterboxes_with_black_and_keeps_content_centred(tmp_path: Path) -> None:
    arr = np.full((20, 80, 3), 200, dtype=np.uint8)  # wide white-ish image
    Image.fromarray(arr).save(tmp_path / "w.png")
    out = load_image(tmp_path / "w.png", 40, resize="pad")
    # 80x20 scaled by 0.5 -> 40x10, centred vertically: rows 15..24 filled, the rest black.
    assert out[:, :15].max() == 0 and out[:, 25:].max() == 0
    assert (out[:, 16:24] == 200).all()


def test_center_crop_cuts_the_middle(tmp_path: Path) -> None:
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, 20:40] = 255  # the middle third is white
    Image.fromarray(arr).save(tmp_path / "c.png")
    out = load_image(tmp_path / "c.png", 20, resize="center_crop")
    assert out.shape == (3, 20, 20)
    assert out.float().mean() > 250  # only the white middle survives


def test_small_image_is_upscaled(tmp_path: Path) -> None:
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "s.png")
    assert load_image(tmp_path / "s.png", 64).shape == (3, 64, 64)


def test_grayscale_gives_three_equal_channels_and_channels_1(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, (30, 30), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png")
    assert rgb.shape == (3, 30, 30)
    assert torch.equal(rgb[0], torch.from_numpy(gray)) and torch.equal(rgb[0], rgb[2])
    one = load_image(tmp_path / "g.png", channels=1)
    assert one.shape == (1, 30, 30) and torch.equal(one[0], torch.from_numpy(gray))


def test_rgb_to_one_channel_uses_luma(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[..., 1] = 255  # pure green: luma 0.587 * 255 ~ 150
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png", channels=1)
    assert out.shape == (1, 4, 4) and abs(int(out[0, 0, 0]) - 150) <= 1


def test_16bit_png_is_scaled_by_full_range_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 256, 4096, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    out = load_image(tmp_path / "d.png")
    expected = torch.from_numpy((values >> 8).astype(np.uint8))  # reference: top 8 bits
    assert torch.equal(out[0], expected) and torch.equal(out[1], expected)
    assert int(out[0, 0, 4]) == 255 and int(out[0, 0, 3]) == 128  # not clipped at 255


def test_32bit_int_and_float_images() -> None:
    ints = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.int32), mode="I")
    assert np.asarray(to_8bit(ints, 1)).tolist() == [[0, 255, 128]]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_8bit(floats, 1)).tolist() == [[0, 128, 255]]
    wide = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_8bit(wide, 1)).tolist() == [[0, 128, 255]]  # min-max scaled


def test_rgba_is_composited_over_black(tmp_path: Path) -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[..., :3] = [200, 100, 50]
    arr[..., 3] = [[255, 0, 128], [255, 0, 128]]
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out[:, 0, 0].tolist() == [200, 100, 50]  # opaque: unchanged
    assert out[:, 0, 1].tolist() == [0, 0, 0]  # transparent: black, hidden colour dropped
    # half transparent: colour * 128 / 255 (rounded), as a reference computation
    assert out[:, 0, 2].tolist() == [round(c * 128 / 255) for c in (200, 100, 50)]


def test_la_and_palette_with_transparency(tmp_path: Path) -> None:
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 180, [[255, 0], [255, 0]]
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out[:, 0, 0].tolist() == [180] * 3 and out[:, 0, 1].tolist() == [0] * 3

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "p.png", transparency=1)
    out = load_image(tmp_path / "p.png")
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 1].tolist() == [0, 0, 0]


def test_palette_gif_and_cmyk_jpeg(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, :4] = [255, 0, 0]
    arr[:, 4:] = [0, 0, 255]
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.gif")
    out = load_image(tmp_path / "p.gif")
    assert out.shape == (3, 8, 8) and out[:, 0, 0].tolist() == [255, 0, 0]
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (3, 8, 8) and out[0, 0, 0] > 200 and out[2, 0, 0] < 60


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # wide; left half red, right half blue
    arr[:, :20] = [255, 0, 0]
    arr[:, 20:] = [0, 0, 255]
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (3, 40, 20)  # displayed upright: tall
    # Rotating 90 degrees clockwise puts the original left (red) half on top.
    assert out[0, 5, 10] > 200 and out[2, 5, 10] < 60
    assert out[2, 35, 10] > 200 and out[0, 35, 10] < 60
    # Same with a working size (the JPEG draft path must honour the rotation too).
    out = load_image(tmp_path / "r.jpg", (32, 16))
    assert out.shape == (3, 32, 16) and out[0, 4, 8] > 200 and out[2, 28, 8] > 200


def test_large_jpeg_draft_matches_full_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(base).resize((720, 480), Image.Resampling.BICUBIC))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    fast = load_image(tmp_path / "big.jpg", 64).float()
    with Image.open(tmp_path / "big.jpg") as im:  # reference: full decode, then resize
        ref = np.array(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    ref_t = torch.from_numpy(ref).permute(2, 0, 1).float()
    assert (fast - ref_t).abs().mean() < 3.0


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("junk.png", b"this is not an image at all", "not an image file"),
        ("empty.jpg", b"", "not an image file"),
    ],
)
def test_corrupt_files_raise_image_read_error(tmp_path: Path, name, data, reason) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageReadError, match=reason) as info:
        load_image(path, 32)
    assert str(path) in str(info.value) and isinstance(info.value, OSError)
    assert info.value.path == str(path)


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_files_raise_and_global_flag_untouched(tmp_path: Path, fmt, ext) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageReadError, match="cut") as info:
        load_image(path, 32)
    assert info.value.reason.startswith("corrupt or truncated file ("), info.value.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before is False


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="directory"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused_with_hint(tmp_path: Path, monkeypatch) -> None:
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 > 2 * 1000
    with pytest.raises(ImageReadError, match="MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "a.png")


def test_error_is_picklable() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ImageReadError("/x/y.png", "bad")))
    assert isinstance(err, ImageReadError) and err.path == "/x/y.png" and err.reason == "bad"
    assert str(err) == "cannot read image /x/y.png: bad"


def test_bad_arguments(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image(tmp_path / "a.png", channels=4)
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(tmp_path / "a.png", 32, resize="squash")
    with pytest.raises(ValueError, match="image_size must be positive"):
        load_image(tmp_path / "a.png", 0)
    with pytest.raises(TypeError, match="image_size"):
        load_image(tmp_path / "a.png", "big")


def test_resize_image_identity_when_already_at_size() -> None:
    im = Image.fromarray(_rgb(10, 10))
    assert resize_image(im, 10) is im
    assert load_pil_image.__name__ == "load_pil_image"


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_real_photograph_smoke(tmp_path: Path, ext: str) -> None:
    skdata = pytest.importorskip("skimage.data")
    retina = skdata.retina()  # (1411, 1411, 3) uint8 fundus photograph
    path = tmp_path / f"retina.{ext}"
    Image.fromarray(retina).save(path, quality=95)
    out = load_image(path, 128)
    assert out.shape == (3, 128, 128) and out.dtype == torch.uint8
    small = np.array(Image.fromarray(retina).resize((128, 128), Image.Resampling.BILINEAR))
    diff = (out.float() - torch.from_numpy(small).permute(2, 0, 1).float()).abs().mean()
    assert diff < 4.0  # same picture: only JPEG/draft rounding differs


def test_pil_to_tensor_matches_the_array_channels_first() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = pil_to_tensor(Image.fromarray(rgb))
    assert out.dtype == torch.uint8 and out.shape == (3, 5, 7)
    assert torch.equal(out, torch.from_numpy(rgb.transpose(2, 0, 1).copy()))
    gray = pil_to_tensor(Image.fromarray(rgb[..., 0]))
    assert gray.shape == (1, 5, 7) and torch.equal(gray[0], torch.from_numpy(rgb[..., 0].copy()))


# ------------------------------------------------------------------ the decode_jpeg fast path
def _jpeg(path: Path, array: np.ndarray, **kw) -> Path:
    Image.fromarray(array).save(path, quality=95, **kw)
    return path


def _pillow_decode(path: Path, mode: str = "RGB") -> torch.Tensor:
    with Image.open(path) as im:
        array = np.array(im.convert(mode))
    t = torch.from_numpy(array)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def test_jpeg_at_working_size_matches_pillow_and_is_an_hwc_view(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "a.jpg", _rgb(48, 64))
    fast = load_image(path, (48, 64))
    assert fast.shape == (3, 48, 64) and fast.dtype == torch.uint8
    torch.testing.assert_close(fast, _pillow_decode(path), atol=0, rtol=0)
    assert fast.permute(1, 2, 0).is_contiguous()  # no transposing copy was made
    torch.testing.assert_close(load_image(path), fast, atol=0, rtol=0)  # no size: same path
    # Not at the working size: Pillow's draft decode and resize, still an HWC view.
    resized = load_image(path, 32)
    assert resized.shape == (3, 32, 32) and resized.permute(1, 2, 0).is_contiguous()


def test_grayscale_jpeg_at_working_size(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    path = _jpeg(tmp_path / "g.jpg", gray)
    rgb = load_image(path, 32)
    torch.testing.assert_close(rgb, _pillow_decode(path, "RGB"), atol=0, rtol=0)
    one = load_image(path, 32, channels=1)
    torch.testing.assert_close(one, _pillow_decode(path, "L"), atol=0, rtol=0)
    # An RGB JPEG as one channel uses Pillow's luma weights, as every other file does.
    path = _jpeg(tmp_path / "c.jpg", _rgb(32, 32))
    torch.testing.assert_close(
        load_image(path, 32, channels=1), _pillow_decode(path, "L"), atol=0, rtol=0
    )


def test_rotated_and_cmyk_jpegs_at_working_size_take_pillow(tmp_path: Path) -> None:
    arr = np.zeros((20, 20, 3), dtype=np.uint8)
    arr[:, :10] = [255, 0, 0]  # left half red
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW: the red half goes on top
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg", 20)
    assert out[0, 3, 10] > 200 and out[0, 16, 10] < 60
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "k.jpg", quality=95)
    out = load_image(tmp_path / "k.jpg", 20)
    assert out.shape == (3, 20, 20) and out[0, 10, 3] > 200 and out[0, 10, 16] < 60


def test_broken_jpegs_at_working_size_keep_their_errors(tmp_path: Path, monkeypatch) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format="JPEG")
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(tmp_path / "cut.jpg", 64)
    (tmp_path / "sig.jpg").write_bytes(data[:3] + b"garbage" * 10)
    with pytest.raises(ImageReadError, match="sig.jpg"):
        load_image(tmp_path / "sig.jpg", 64)
    (tmp_path / "ok.jpg").write_bytes(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 > 2 * 1000
    with pytest.raises(ImageReadError, match="MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "ok.jpg", 64)
