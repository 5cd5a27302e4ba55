"""Decoding, sniffing, size limits and DICOM handling of training.imaging (synthetic files)."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from training.imaging import (
    CorruptImageError,
    ImageError,
    ImageFormat,
    ImageTooLargeError,
    UnsupportedImageError,
    clean_for_storage,
    decode_image,
    find_identifying_content,
    read_image_size,
    sniff_format,
)

# ------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A tiny PNG whose IHDR (with a correct CRC) claims ``width x height`` 8-bit gray."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def dicom_bytes(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    bits_stored: int | None = None,
    preamble: bool = True,
    frames: int = 1,
    **attrs: object,
) -> bytes:
    """An uncompressed DICOM file written by pydicom around ``pixels``."""
    rgb = pixels.ndim == 3 and frames == 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19700101"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        ds.file_meta = FileMetaDataset()
        ds.save_as(buf, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def gradient(h: int = 16, w: int = 24, dtype: type = np.uint8, top: int = 255) -> np.ndarray:
    values = np.linspace(0, top, h * w).reshape(h, w)
    return np.round(values).astype(dtype)


# ------------------------------------------------------------------------------------------
# Sniffing
# ------------------------------------------------------------------------------------------


def test_sniff_recognises_the_three_formats_by_content() -> None:
    assert sniff_format(png_bytes(gradient())) is ImageFormat.PNG
    assert sniff_format(jpeg_bytes(gradient())) is ImageFormat.JPEG
    assert sniff_format(dicom_bytes(gradient(dtype=np.uint16))) is ImageFormat.DICOM
    assert sniff_format(b"GIF89a" + b"\x00" * 200) is None
    assert sniff_format(b"hello, this is text\n" * 20) is None
    assert sniff_format(b"") is None


def test_sniff_accepts_dicom_without_preamble_but_not_random_bytes() -> None:
    raw = dicom_bytes(gradient(dtype=np.uint16), preamble=False)
    assert raw[128:132] != b"DICM"
    assert sniff_format(raw) is ImageFormat.DICOM
    assert decode_image(raw).shape == (16, 24)
    # starts like a group-0x0008 element but is garbage: must not be taken for DICOM
    assert sniff_format(b"\x08\x00" + bytes(range(256)) * 2) is None


def test_errors_are_value_errors() -> None:
    for cls in (CorruptImageError, UnsupportedImageError, ImageTooLargeError):
        assert issubclass(cls, ImageError)
    assert issubclass(ImageError, ValueError)


# ------------------------------------------------------------------------------------------
# PNG / JPEG
# ------------------------------------------------------------------------------------------


def test_decode_8bit_png_exact(tmp_path: Path) -> None:
    arr = gradient()
    out = decode_image(png_bytes(arr))
    assert out.dtype == np.float32 and out.shape == arr.shape
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-6)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(arr))
    np.testing.assert_array_equal(decode_image(path), out)


def test_decode_16bit_png_keeps_precision() -> None:
    arr = gradient(dtype=np.uint16, top=65535)
    out = decode_image(png_bytes(arr))
    np.testing.assert_allclose(out, arr / 65535.0, atol=1e-6)
    assert len(np.unique(out)) > 256  # not squeezed to 8 bits


def test_decode_12bit_data_in_16bit_png_uses_its_real_range() -> None:
    arr = gradient(dtype=np.uint16, top=4095)
    out = decode_image(png_bytes(arr))
    assert out.max() == pytest.approx(1.0)
    np.testing.assert_allclose(out, arr / 4095.0, atol=1e-6)


def test_decode_rgb_jpeg_and_rgba_palette_png_to_gray() -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, 15:] = (200, 200, 200)
    out = decode_image(jpeg_bytes(rgb))
    assert out.shape == (20, 30) and out.dtype == np.float32
    assert out[:, :10].mean() < 0.05 and abs(out[:, 20:].mean() - 200 / 255) < 0.03

    rgba = np.dstack([rgb, np.full((20, 30), 128, np.uint8)])
    out = decode_image(png_bytes(rgba))
    assert out.shape == (20, 30)
    assert out[0, 29] == pytest.approx(200 / 255, abs=1e-6)

    palette = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (20, 30) and out.min() >= 0.0 and out.max() <= 1.0


def test_read_image_size_from_header() -> None:
    assert read_image_size(png_bytes(gradient(10, 30))) == (30, 10)
    assert read_image_size(jpeg_bytes(gradient(12, 8))) == (8, 12)
    assert read_image_size(dicom_bytes(gradient(7, 9, dtype=np.uint16))) == (9, 7)
    assert read_image_size(bomb_png()) == (50000, 50000)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_empty_bytes_is_corrupt() -> None:
    with pytest.raises(CorruptImageError, match="empty"):
        decode_image(b"")


def test_text_renamed_png_and_gif_are_unsupported(tmp_path: Path) -> None:
    fake = tmp_path / "scan.png"
    fake.write_text("definitely not an image\n" * 10)
    with pytest.raises(UnsupportedImageError, match="PNG, JPEG or DICOM"):
        decode_image(fake)
    gif = io.BytesIO()
    Image.fromarray(gradient()).save(gif, format="GIF")
    with pytest.raises(UnsupportedImageError, match="GIF"):
        decode_image(gif.getvalue())


def test_truncated_png_and_jpeg_are_corrupt() -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    for data in (png_bytes(noisy), jpeg_bytes(noisy)):
        with pytest.raises(CorruptImageError):
            decode_image(data[: len(data) // 2])
    with pytest.raises(CorruptImageError):
        decode_image(png_bytes(noisy)[:30])


def _noisy_png_and_jpeg() -> dict[str, bytes]:
    noisy = np.random.default_rng(1).integers(0, 256, (64, 48), dtype=np.uint8)
    return {"png": png_bytes(noisy), "jpeg": jpeg_bytes(noisy)}


def _header_length(kind: str, data: bytes) -> int:
    """Bytes up to the first pixel data: PNG signature + IHDR, JPEG up to the SOS segment."""
    if kind == "png":
        return 8 + 25
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]


@pytest.mark.parametrize("kind", ["png", "jpeg"])
@pytest.mark.parametrize("cut", ["magic", "20 bytes", "header only", "10%", "50%", "90%"])
def test_every_truncation_is_corrupt_never_another_exception(kind: str, cut: str) -> None:
    # A JPEG cut inside its header used to escape as KeyError('MPO') from Pillow.
    data = _noisy_png_and_jpeg()[kind]
    length = {
        "magic": 3 if kind == "jpeg" else 8,
        "20 bytes": 20,
        "header only": _header_length(kind, data),
        "10%": len(data) // 10,
        "50%": len(data) // 2,
        "90%": len(data) * 9 // 10,
    }[cut]
    truncated = data[:length]
    with pytest.raises(CorruptImageError):
        decode_image(truncated)
    try:  # the size is in the header: either it is read, or the file is refused as corrupt
        size = read_image_size(truncated)
    except CorruptImageError:
        assert length <= _header_length(kind, data)
    else:
        assert size == (48, 64)


def test_unexpected_decoder_exceptions_become_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    from training.imaging import dicom

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyError("MPO")

    data = _noisy_png_and_jpeg()["jpeg"]
    monkeypatch.setattr(Image, "open", boom)
    with pytest.raises(CorruptImageError, match="KeyError"):
        decode_image(data)
    with pytest.raises(CorruptImageError):
        read_image_size(data)
    monkeypatch.setattr(dicom, "bounded_dcmread", boom)
    with pytest.raises(CorruptImageError):
        decode_image(dicom_bytes(gradient()))


def test_too_large_and_unsupported_stay_distinct_from_corrupt() -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb_png())
    with pytest.raises(UnsupportedImageError):
        decode_image(b"GIF89a" + b"\x00" * 64)
    data = _noisy_png_and_jpeg()["jpeg"]
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=100)


def test_png_bomb_header_is_refused_fast_without_decoding() -> None:
    data = bomb_png()
    assert len(data) < 200
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(data, max_pixels=20_000_000)
    with pytest.raises(ImageTooLargeError):  # Pillow's own guard, no explicit limit
        decode_image(data)
    assert time.perf_counter() - start < 1.0


def test_jpeg_bomb_header_is_refused_fast() -> None:
    data = bytearray(jpeg_bytes(gradient(8, 8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        decode_image(bytes(data), max_pixels=20_000_000)
    assert read_image_size(bytes(data)) == (60000, 60000)
    assert time.perf_counter() - start < 1.0


def test_max_pixels_applies_to_every_format() -> None:
    with pytest.raises(ImageTooLargeError, match="16x16"):
        decode_image(png_bytes(gradient(16, 16)), max_pixels=100)
    with pytest.raises(ImageTooLargeError):
        decode_image(jpeg_bytes(gradient(16, 16)), max_pixels=100)
    with pytest.raises(ImageTooLargeError):
        decode_image(dicom_bytes(gradient(16, 16, dtype=np.uint16)), max_pixels=100)
    assert decode_image(png_bytes(gradient(16, 16)), max_pixels=256).shape == (16, 16)


def test_dicom_bomb_header_is_refused_before_pixels() -> None:
    # Header claims 40000x40000 while the pixel data is tiny.
    raw = dicom_bytes(gradient(4, 4, dtype=np.uint16))
    small = dicom_bytes(gradient(4, 4, dtype=np.uint16), Rows=40000, Columns=40000)
    assert len(small) < 2 * len(raw)
    with pytest.raises(ImageTooLargeError):
        decode_image(small, max_pixels=50_000_000)


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------


def test_dicom_16bit_monochrome2_with_rescale() -> None:
    arr = gradient(dtype=np.uint16, top=4000)
    data = dicom_bytes(arr, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    out = decode_image(data)
    assert out.dtype == np.float32 and out.shape == arr.shape
    expected = (arr * 2.0 - 1024 - (-1024)) / (4000 * 2.0)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out[0, 0] == 0.0 and out[-1, -1] == pytest.approx(1.0)


def test_dicom_signed_pixels() -> None:
    arr = np.linspace(-1000, 1000, 16 * 24).reshape(16, 24).astype(np.int16)
    out = decode_image(dicom_bytes(arr, signed=True))
    assert out[0, 0] == 0.0 and out[-1, -1] == pytest.approx(1.0)
    assert np.all(np.diff(out.ravel()) >= 0)  # monotone: sign handled, no wrap-around


def test_dicom_monochrome1_is_inverted() -> None:
    arr = gradient(dtype=np.uint16, top=1000)
    out = decode_image(dicom_bytes(arr, photometric="MONOCHROME1"))
    brightest_stored = np.unravel_index(np.argmax(arr), arr.shape)
    # max value in MONOCHROME1 is displayed darkest: 1 - 1000/1023 on the fixed 10-bit scale
    # (no window: scaled by bit depth like a PNG of the same pixels, not stretched)
    assert out[brightest_stored] == pytest.approx(1 - 1000 / 1023) == out.min()
    assert out[0, 0] == pytest.approx(1.0)


def test_dicom_window_is_applied() -> None:
    arr = gradient(dtype=np.uint16, top=1000)
    out = decode_image(dicom_bytes(arr, WindowCenter=500, WindowWidth=200))
    # values below 400 saturate to black, above 600 to white; in between a linear ramp
    assert np.all(out[arr <= 390] == 0.0)
    assert np.all(out[arr >= 610] == pytest.approx(1.0))
    mid = (arr > 420) & (arr < 580)
    assert np.all((out[mid] > 0.05) & (out[mid] < 0.95))


def test_dicom_multiframe_gives_first_frame_and_rgb_gives_gray() -> None:
    frames = np.stack([gradient(dtype=np.uint16, top=100), np.zeros((16, 24), np.uint16)])
    out = decode_image(dicom_bytes(frames, frames=2))
    # the first frame (the second is black), on the fixed 8-bit scale a PNG would get
    assert out.shape == (16, 24) and out.max() == pytest.approx(100 / 255)

    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[:, 5:] = 255
    out = decode_image(dicom_bytes(rgb))
    assert out.shape == (8, 10) and out[0, 0] == 0.0 and out[0, 9] == pytest.approx(1.0)


def test_malformed_dicom_is_corrupt() -> None:
    data = dicom_bytes(gradient(32, 32, dtype=np.uint16))
    with pytest.raises(CorruptImageError):
        decode_image(data[:-300])  # pixel data cut short
    with pytest.raises(CorruptImageError):
        decode_image(b"\x00" * 128 + b"DICM" + b"\xff" * 64)  # garbage after the marker
    no_pixels = dicom_bytes(gradient(dtype=np.uint16))
    cut = no_pixels[: no_pixels.rfind(b"\xe0\x7f\x10\x00")]  # drop the PixelData element
    with pytest.raises(CorruptImageError, match="no pixel data"):
        decode_image(cut)


def test_dicom_with_undecodable_compression_is_reported_clearly() -> None:
    data = dicom_bytes(gradient(dtype=np.uint16))
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 40])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises((UnsupportedImageError, CorruptImageError), match=r"(?i)export"):
        decode_image(buf.getvalue())


# ------------------------------------------------------------------------------------------
# De-identification
# ------------------------------------------------------------------------------------------


def test_deidentify_removes_patient_identifiers_and_keeps_pixels() -> None:
    from pydicom import dcmread

    arr = gradient(dtype=np.uint16, top=3000)
    data = dicom_bytes(
        arr,
        OtherPatientIDs="OTHER-777",
        InstitutionName="Saint Nobody Hospital",
        AccessionNumber="ACC123",
        ReferringPhysicianName="House^Gregory",
    )
    ds = dcmread(io.BytesIO(data))
    ds.add_new(0x00091010, "LO", "Jane Doe private copy")  # private tag
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    assert b"Doe^Jane" in data and b"PID-0042" in data
    assert "PatientName" in find_identifying_content(data)

    clean = clean_for_storage(data)
    for secret in (b"Doe^Jane", b"PID-0042", b"OTHER-777", b"Saint Nobody", b"ACC123"):
        assert secret not in clean
    assert b"House" not in clean and b"private copy" not in clean and b"19700101" not in clean
    assert find_identifying_content(clean) == []
    out = dcmread(io.BytesIO(clean))
    assert out.PatientIdentityRemoved == "YES"
    assert out.SOPInstanceUID != ds.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    np.testing.assert_array_equal(decode_image(clean), decode_image(data))
    # deterministic, so duplicate uploads stay recognisable after de-identification
    assert clean_for_storage(data) == clean


def test_cleaning_refuses_what_is_not_an_image() -> None:
    with pytest.raises(UnsupportedImageError):
        clean_for_storage(b"GIF89a not accepted")
    with pytest.raises(CorruptImageError):
        clean_for_storage(b"")
