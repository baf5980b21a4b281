"""The grey-level chain against DICOM PS3.3 C.11, on real files with edited headers.

Each test compares with pydicom's apply_modality_lut / apply_voi_lut where pydicom follows the
standard (its output range y_min..y_max mapped onto our [0, 1]), or with the standard's formula
where it does not (said in the test). Each one failed on the code before this change.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from cxr_embed.errors import MultiFrameImage, TruncatedImage, UndecodableImage
from cxr_embed.image import rgb_to_grey
from cxr_embed.ingest import load_image


def _read(dcm_dir, name: str = "RG1_UNCR.dcm") -> Dataset:
    return pydicom.dcmread(dcm_dir / name)


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _pydicom_grey(ds: Dataset, index: int = 0) -> np.ndarray:
    """pydicom's modality LUT + windowing, its output range (PS3.3 C.11.2.1.2) mapped onto [0, 1]."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=index, prefer_lut=False)
    bits = int(ds.BitsStored)
    y_min, y_max = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        y_min, y_max = (v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (y_min, y_max))
    grey = (values - y_min) / (y_max - y_min)
    return 1.0 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def _median(ds: Dataset) -> float:
    return float(np.median(ds.pixel_array))


def test_linear_window_matches_pydicom(dcm_dir):
    ds = _read(dcm_dir)
    img = load_image(_bytes(ds))
    np.testing.assert_allclose(img.pixels, _pydicom_grey(ds), atol=1e-6)


def test_sigmoid_function_is_applied(dcm_dir):
    """C.11.2.1.3.1; was treated as LINEAR."""
    ds = _read(dcm_dir)
    ds.VOILUTFunction = "SIGMOID"
    img = load_image(_bytes(ds))
    np.testing.assert_allclose(img.pixels, _pydicom_grey(ds), atol=1e-6)
    assert img.info.window == "15000/30000 SIGMOID"
    linear = load_image(dcm_dir / "RG1_UNCR.dcm").pixels
    assert np.abs(img.pixels - linear).mean() > 0.01


def test_linear_exact_has_no_half_pixel_offsets(dcm_dir):
    """C.11.2.1.3.2: a narrow window makes LINEAR's -0.5 / -1 offsets visible."""
    ds = _read(dcm_dir)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = _median(ds), 4, "LINEAR_EXACT"
    exact = load_image(_bytes(ds))
    np.testing.assert_allclose(exact.pixels, _pydicom_grey(ds), atol=1e-6)
    del ds.VOILUTFunction
    linear = load_image(_bytes(ds))
    assert np.abs(exact.pixels - linear.pixels).max() >= 0.25


def test_linear_width_one_is_a_threshold_at_the_centre(dcm_dir):
    """C.11.2.1.2.1 with width 1: x <= c - 0.5 -> min, x > c - 0.5 -> max (was a blank image)."""
    ds = _read(dcm_dir)
    centre = _median(ds)
    ds.WindowCenter, ds.WindowWidth = centre, 1
    img = load_image(_bytes(ds))
    stored = ds.pixel_array.astype(np.float64)
    expect = 1.0 - (stored > centre - 0.5)  # MONOCHROME1 inverted
    np.testing.assert_array_equal(img.pixels, expect)
    np.testing.assert_allclose(img.pixels, _pydicom_grey(ds), atol=1e-6)
    assert 0.2 < img.pixels.mean() < 0.8


def _with_voi_lut(ds: Dataset, lut: np.ndarray, bits: int = 16, first: int = 0) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(lut), first, bits])  # LUT Descriptor
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data (OW: US would exceed 64 KiB)
    ds.VOILUTSequence = [item]
    return ds


def _gamma_lut(entries: int = 1 << 15) -> np.ndarray:
    # deliberately not spanning 0..65535: the output range is the declared bit depth, not the LUT's extremes
    return (2000 + 30000 * np.linspace(0, 1, entries) ** 0.5).astype(np.int64)


def test_voi_lut_output_range_is_its_declared_bit_depth(dcm_dir):
    """C.11.2.1.1: output range is 0 .. 2**n - 1 (n = LUTDescriptor's third value); was stretched to min/max."""
    ds = _with_voi_lut(_read(dcm_dir), _gamma_lut())
    del ds.WindowCenter, ds.WindowWidth
    img = load_image(_bytes(ds))
    expect = 1.0 - apply_voi_lut(ds.pixel_array, ds) / 65535.0
    np.testing.assert_allclose(img.pixels, expect, atol=1e-6)
    assert img.info.window == "voi_lut"
    assert img.pixels.max() < 0.97  # the LUT never reaches 0 (white after inversion)


def test_window_centre_without_width_uses_the_voi_lut(dcm_dir):
    """A centre without a width is no window (C.11.2.1.2 needs both): the valid VOI LUT applies (was min/max)."""
    ds = _with_voi_lut(_read(dcm_dir), _gamma_lut())
    del ds.WindowWidth
    img = load_image(_bytes(ds))
    expect = 1.0 - apply_voi_lut(ds.pixel_array, ds) / 65535.0
    np.testing.assert_allclose(img.pixels, expect, atol=1e-6)
    assert img.info.window == "voi_lut"
    assert any("WindowWidth is missing" in w for w in img.info.warnings)


def test_several_windows_use_the_first_and_say_so(dcm_dir):
    ds = _read(dcm_dir)
    ds.WindowCenter, ds.WindowWidth = [12000, 20000, 8000], [8000, 30000, 4000]
    img = load_image(_bytes(ds))
    np.testing.assert_allclose(img.pixels, _pydicom_grey(ds, index=0), atol=1e-6)
    assert img.info.window == "12000/8000"
    assert "3 windows; used the first" in img.info.warnings


def test_enhanced_object_reads_rescale_and_window_from_functional_groups(dcm_dir):
    """PS3.3 C.7.6.16.2.9/10: per-frame values override shared ones, which override none at top level."""
    ds = _read(dcm_dir)
    flat = _read(dcm_dir)
    flat.RescaleSlope, flat.RescaleIntercept, flat.WindowCenter, flat.WindowWidth = 2, -100, 25000, 40000

    def item(**kw) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    del ds.WindowCenter, ds.WindowWidth
    ds.NumberOfFrames = 1
    ds.SharedFunctionalGroupsSequence = [item(
        PixelValueTransformationSequence=[item(RescaleSlope=2, RescaleIntercept=-100, RescaleType="US")],
        FrameVOILUTSequence=[item(WindowCenter=1, WindowWidth=1)],  # overridden per frame
    )]
    ds.PerFrameFunctionalGroupsSequence = [item(FrameVOILUTSequence=[item(WindowCenter=25000, WindowWidth=40000)])]
    img = load_image(_bytes(ds))
    assert img.info.window == "25000/40000"
    np.testing.assert_allclose(img.pixels, _pydicom_grey(flat), atol=1e-6)


def test_multi_frame_still_refused_with_functional_groups(dcm_dir):
    ds = _read(dcm_dir, "emri_small.dcm")  # 10 frames
    with pytest.raises(MultiFrameImage, match="10 frames"):
        load_image(_bytes(ds))


def test_for_processing_is_embedded_but_flagged(dcm_dir):
    ds = _read(dcm_dir)
    ds.PresentationIntentType = "FOR PROCESSING"
    img = load_image(_bytes(ds))
    assert img.info.reliable is False
    assert any("FOR PROCESSING" in r for r in img.info.unreliable_reasons)
    assert load_image(dcm_dir / "RG1_UNCR.dcm").info.reliable is True
    assert img.info.to_dict()["reliable"] is False


def _corrupt_j2k(dcm_dir) -> bytes:
    ds = _read(dcm_dir, "MR2_J2KR.dcm")
    frame = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    cod = frame.find(b"\xff\x52")  # the COD marker: the decoder cannot read the header without it
    ds.PixelData = encapsulate([frame[:cod] + b"\xff\x99" + frame[cod + 2:]])
    return _bytes(ds)


def test_decoder_failure_that_is_not_truncation_is_undecodable(dcm_dir):
    """The decoders' RuntimeError used to be reported as TruncatedImage."""
    with pytest.raises(UndecodableImage) as exc:
        load_image(_corrupt_j2k(dcm_dir))
    assert exc.value.code == "undecodable_image"
    with pytest.raises(TruncatedImage):  # missing data is still truncation
        load_image(dcm_dir / "emri_small_jpeg_2k_lossless_too_short.dcm")


def _palette(dcm_dir, big_endian: bool) -> tuple[bytes, np.ndarray]:
    """OT-PAL-8-face (16-bit palette, OW data) re-written little or big endian, and pydicom's RGB of it."""
    ds = pydicom.dcmread(dcm_dir / "OT-PAL-8-face.dcm", force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    rgb = apply_color_lut(ds.pixel_array, ds)  # pydicom is right for little endian
    syntax = pydicom.uid.ExplicitVRBigEndian if big_endian else pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = syntax
    ds["PixelData"].VR = "OB"  # 8-bit samples: bytes, which no byte order changes
    if big_endian:  # OW data is written as given: swap it as a big-endian writer would
        for colour in ("Red", "Green", "Blue"):
            elem = ds[f"{colour}PaletteColorLookupTableData"]
            elem.value = np.frombuffer(elem.value, "<u2").astype(">u2").tobytes()
    buf = io.BytesIO()
    ds.preamble = b"\0" * 128
    dcmwrite(buf, ds, implicit_vr=False, little_endian=not big_endian, force_encoding=True)
    return buf.getvalue(), rgb


@pytest.mark.parametrize("big_endian", [False, True])
def test_palette_colour_scaled_by_declared_depth_in_either_byte_order(dcm_dir, big_endian):
    """pydicom reads non-segmented OW palette data little endian: a big-endian palette came out almost black."""
    data, rgb = _palette(dcm_dir, big_endian)
    img = load_image(data)
    expect = rgb_to_grey(rgb.astype(np.float32) / 65535.0)  # descriptor declares 16 bits
    np.testing.assert_allclose(img.pixels, expect, atol=1e-6)
    assert img.pixels.mean() > 0.2
