import io

import numpy as np
import pytest
from PIL import Image

from cxr_embed import (
    ImageTooSmall,
    MultiFrameImage,
    NoPixelData,
    NotAnImage,
    TruncatedImage,
    load_image,
    preprocess,
)
from cxr_embed.errors import EmptyInput, InputError
from cxr_embed.preprocess import PREPROCESS_VERSION, PreprocessConfig


def test_real_chest_cr_monochrome1(dcm_dir):
    img = load_image(dcm_dir / "RG1_UNCR.dcm")
    info = img.info
    assert img.pixels.shape == (1955, 1841)
    assert img.pixels.dtype == np.float32
    assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0
    assert info.modality == "CR" and info.view_position == "PA" and info.body_part == "CHEST"
    assert info.photometric_interpretation == "MONOCHROME1"
    assert info.original_size == (1955, 1841) and info.bits_stored == 15
    assert info.window == "15000/30000"
    # MONOCHROME1 is inverted: the lungs (air) must end up darker than the mediastinum/spine
    rows, cols = img.pixels.shape
    lung = img.pixels[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    spine = img.pixels[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40].mean()
    assert lung < spine


def test_lossless_jpeg2000_gives_identical_tensor(dcm_dir):
    a = preprocess(load_image(dcm_dir / "RG1_UNCR.dcm"))
    b = preprocess(load_image(dcm_dir / "RG1_J2KR.dcm"))
    c = preprocess(load_image(dcm_dir / "RG1_J2KI.dcm"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and np.abs(a - c).max() < 0.05  # lossy: close, not equal


def test_tibia_is_read_and_reported(dcm_dir):
    img = load_image(dcm_dir / "RG3_UNCR.dcm")
    assert img.info.body_part == "EXTREMITY" and img.info.view_position == "AP"


@pytest.mark.parametrize(
    "name, modality",
    [("693_UNCR.dcm", "CT"), ("US1_UNCR.dcm", "US"), ("JPEG-LL.dcm", "NM"), ("vlut_04.dcm", "OT"), ("mlut_18.dcm", "OT")],
)
def test_other_modalities_decode_with_their_modality(dcm_dir, name, modality):
    img = load_image(dcm_dir / name)
    assert img.info.modality == modality
    assert np.isfinite(img.pixels).all() and img.pixels.max() <= 1.0 and img.pixels.min() >= 0.0
    assert img.pixels.std() > 0.01


def test_signed_ct_uses_rescale_and_window(dcm_dir):
    img = load_image(dcm_dir / "693_UNCR.dcm")
    assert img.info.window == "40/100"


def test_voi_lut_sequence_is_applied(dcm_dir):
    assert load_image(dcm_dir / "vlut_04.dcm").info.window == "voi_lut"


@pytest.mark.parametrize("name", ["emri_small_RLE.dcm", "liver.dcm", "OBXXXX1A_2frame.dcm", "SC_rgb_2frame.dcm"])
def test_multi_frame_refused(dcm_dir, name):
    with pytest.raises(MultiFrameImage, match="multi-frame"):
        load_image(dcm_dir / name)


def test_truncated_dicom_refused(dcm_dir):
    with pytest.raises(TruncatedImage):
        load_image(dcm_dir / "emri_small_jpeg_2k_lossless_too_short.dcm")
    data = (dcm_dir / "RG1_UNCR.dcm").read_bytes()
    with pytest.raises(TruncatedImage):
        load_image(data[: len(data) // 2])


def test_dicom_without_pixel_data_refused(dcm_dir):
    import pydicom

    ds = pydicom.dcmread(dcm_dir / "RG1_UNCR.dcm")
    del ds.PixelData
    del ds.Rows
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(NoPixelData, match="no pixel data"):
        load_image(buf.getvalue())


def test_small_images_refused(dcm_dir):
    with pytest.raises(ImageTooSmall, match="100x100"):
        load_image(dcm_dir / "SC_rgb.dcm")


@pytest.mark.parametrize("data, err", [(b"", EmptyInput), (b"hello world, not an image" * 10, NotAnImage),
                                       (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, TruncatedImage),
                                       (b"\xff\xd8\xff\xe0" + b"\x13" * 100, TruncatedImage)])
def test_broken_bytes_give_typed_errors(data, err):
    with pytest.raises(err):
        load_image(data)


def test_errors_are_input_errors_with_codes():
    with pytest.raises(InputError) as exc:
        load_image(b"%PDF-1.4 not an image")
    assert exc.value.code == "not_an_image"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.dcm")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_real_cxr_jpeg(samples):
    path = next(samples.glob("*.jpg"))
    img = load_image(path)
    assert img.info.source_format == "jpeg" and img.info.original_size == (256, 256)
    assert preprocess(img).shape == (3, 224, 224)


def _png_bytes(arr: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_png_8_and_16_bit_and_rgb_agree(samples):
    grey8 = np.asarray(Image.open(next(samples.glob("*.jpg"))).convert("L"))
    g8 = load_image(_png_bytes(grey8))
    g16 = load_image(_png_bytes((grey8.astype(np.uint16) * 257)))
    rgb = load_image(_png_bytes(np.stack([grey8] * 3, -1)))
    assert g16.info.bits_stored == 16 and g8.info.bits_stored == 8
    np.testing.assert_allclose(g8.pixels, g16.pixels, atol=1e-6)
    np.testing.assert_allclose(g8.pixels, rgb.pixels, atol=1.5 / 255)
    assert "colour" in rgb.info.warnings[0]


def test_arrays_accepted(samples):
    grey8 = np.asarray(Image.open(next(samples.glob("*.jpg"))).convert("L"))
    a = load_image(grey8)
    b = load_image(grey8.astype(np.float32) / 255.0)
    np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-6)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(grey8.astype(np.float32))


def test_preprocess_is_letterboxed_and_versioned():
    tall = np.ones((400, 200), np.float32)
    t = preprocess(tall, PreprocessConfig(size=224))
    assert t.shape == (3, 224, 224)
    # content is 224 tall and 112 wide in the middle; the rest is black padding (-1 after normalisation)
    assert t.dtype == np.float32 and isinstance(t, np.ndarray)  # numpy: a slim install has no torch
    assert np.all(t[:, :, :50] == -1.0) and np.allclose(t[:, :, 60:160], 1.0, atol=1e-5)
    assert PREPROCESS_VERSION in PreprocessConfig().identity


def test_fast_native_pixel_path_matches_pydicom(dcm_dir):
    import pydicom

    from cxr_embed.dicom import _native_pixels

    checked = 0
    for name in ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "MR2_UNCR.dcm", "mlut_18.dcm", "vlut_04.dcm", "JPEG2000_UNC.dcm"]:
        ds = pydicom.dcmread(dcm_dir / name)
        fast = _native_pixels(ds)
        if fast is not None:
            assert np.array_equal(fast, ds.pixel_array), name
            checked += 1
    assert checked >= 3


def test_decoder_failures_become_input_errors(monkeypatch, samples):
    """Whatever a decoder library raises on odd input is reported as an InputError, never a crash."""
    import cxr_embed.ingest as ingest

    def boom(data, *limits):
        raise RecursionError("decoder blew up")

    monkeypatch.setattr(ingest, "read_raster", boom)
    with pytest.raises(InputError, match="could not be decoded: RecursionError"):
        load_image(next(samples.glob("*.jpg")))


def test_rle_compressed_radiograph_matches_uncompressed(dcm_dir):
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(dcm_dir / "RG3_UNCR.dcm")
    ds.compress(RLELossless)  # pydicom's own RLE encoder: a real RLE Lossless file
    buf = io.BytesIO()
    ds.save_as(buf)
    rle = load_image(buf.getvalue())
    assert rle.info.transfer_syntax == "RLE Lossless"
    assert np.array_equal(rle.pixels, load_image(dcm_dir / "RG3_UNCR.dcm").pixels)


def test_jpeg_ls_frame_decodes_like_uncompressed(dcm_dir):
    """JPEG-LS (pylibjpeg-libjpeg): first frame of the multi-frame file, re-wrapped as a single frame."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    from cxr_embed.dicom import read_dicom

    ls = pydicom.dcmread(dcm_dir / "emri_small_jpeg_ls_lossless.dcm")
    ref = pydicom.dcmread(dcm_dir / "emri_small.dcm").pixel_array[0]
    first = next(generate_frames(ls.PixelData, number_of_frames=int(ls.NumberOfFrames)))
    ls.PixelData = encapsulate([first])
    ls.NumberOfFrames = 1
    buf = io.BytesIO()
    ls.save_as(buf)
    img = read_dicom(buf.getvalue())  # 64x64: below the radiograph minimum, so read without that check
    assert img.info.transfer_syntax.startswith("JPEG-LS")
    expect = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(img.pixels, expect, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_the_stepped_gather_gives_what_one_take_gives(monkeypatch, dtype):
    """The grey-level table is gathered in steps (no 8-byte-per-pixel index copy of the whole image):
    every pixel gets the value one np.take gives, at any size, shape or stride, and an index outside
    the table still fails loudly."""
    from cxr_embed import dicom

    monkeypatch.setattr(dicom, "GATHER_STEP", 1000)  # many steps, the last one short
    rng = np.random.default_rng(7)
    table = rng.random(40_000).astype(np.float32)
    index = rng.integers(0, len(table), size=(301, 257)).astype(dtype)
    for view in (index, index[::2, 1::3], index.T):
        got = dicom.gather(table, view)
        assert got.shape == view.shape and got.dtype == table.dtype
        assert np.array_equal(got, np.take(table, view))
    with pytest.raises(IndexError):
        dicom.gather(table, np.array([[0, len(table)]], dtype=dtype))
