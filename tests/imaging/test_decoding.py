"""Pixel decoding: missing data, short data, missing decoders named."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from imaging.decoding import check_pixel_length, decode_pixels, ensure_decodable, expected_native_length
from imaging.errors import MissingPixelDataError, UnsupportedTransferSyntaxError


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name, download=False))


def test_native_pixels_decode() -> None:
    assert decode_pixels(_read("CT_small.dcm")).shape == (128, 128)


def test_a_missing_decoder_is_named_with_the_transfer_syntax() -> None:
    ds = _read("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(UnsupportedTransferSyntaxError) as info:
        ensure_decodable(ds)
    message = str(info.value)
    assert message.startswith(
        "cannot decode pixel data in transfer syntax 1.2.840.10008.1.2.4.80 (JPEG-LS Lossless Image Compression)"
    )
    assert "pyjpegls" in message and "pylibjpeg-libjpeg" in message
    assert info.value.transfer_syntax == "1.2.840.10008.1.2.4.80"
    assert info.value.code == "pixel_decoder_missing"


def test_short_native_pixel_data_is_reported_as_truncated() -> None:
    ds = _read("MR_truncated.dcm")
    with pytest.raises(MissingPixelDataError, match="holds 8130 of the 8192 bytes") as info:
        check_pixel_length(ds)
    assert info.value.code == "truncated"


def test_an_image_without_pixel_data_is_reported() -> None:
    ds = _read("CT_small.dcm")
    del ds.PixelData
    with pytest.raises(MissingPixelDataError, match="no pixel data") as info:
        decode_pixels(ds)
    assert info.value.code == "missing_pixel_data"


def test_subsampled_colour_needs_two_values_per_pixel() -> None:
    ds = _read("SC_ybr_full_422_uncompressed.dcm")
    assert expected_native_length(ds) == ds.Rows * ds.Columns * 2
    check_pixel_length(ds)
