"""Splicing: encoding an edited data set by reusing the source bytes of untouched elements.

pydicom writes an element it has not decoded (a ``RawDataElement``) as its tag, VR and
length followed by the value bytes it read. Where the output keeps the source's encoding,
those are the very bytes the element occupies in the source, so they can be copied from
it instead of being written again, and a run of neighbouring untouched elements becomes
one slice. The pixel data is usually such an element, and by far the largest. Elements
that were replaced, decoded or nested in sequences are still encoded by pydicom, one at a
time, with the same function ``dcmwrite`` uses.

:func:`splice` gives up (returns None) whenever its output could differ from what
``pydicom.dcmwrite(..., enforce_file_format=True)`` writes for the same data set: another
encoding or character set than the source's, a deflated or private transfer syntax, or
elements ``dcmwrite`` refuses. A source element is copied only when the bytes in front of
its value are exactly the tag, VR and length pydicom would write; otherwise pydicom
encodes it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import NamedTuple

from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PersonName

__all__ = ["Chunk", "ElementCache", "splice"]

Chunk = bytes | memoryview

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_DELIMITER = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}
# Values whose encoding depends only on the value, its tag and VR, and the character set.
_CACHEABLE = (str, UID, int, bytes, type(None))
_CACHE_LIMIT = 8192
_META_ENCODING = (False, True)
_META_TAGS = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)
_LARGEST_CACHED_VALUE = 256
_LARGEST_CACHED_ENCODING = 4096


class _Packers(NamedTuple):
    implicit: Callable[..., bytes]
    short: Callable[..., bytes]
    long: Callable[..., bytes]


# Element headers: implicit VR (tag, length), explicit VR with a 16-bit length, and
# explicit VR with reserved bytes and a 32-bit length; by little endianness.
_PACKERS = {
    little: _Packers(
        struct.Struct(f"{order}HHL").pack, struct.Struct(f"{order}HH2sH").pack, struct.Struct(f"{order}HH2sHL").pack
    )
    for little, order in ((True, "<"), (False, ">"))
}


class ElementCache:
    """Encoded elements by tag, value and encoding; replacement values repeat a lot.

    A pseudonym, a remapped study UID, a shifted date or an emptied attribute is the same
    in every file of a patient, and the de-identification marks are the same everywhere.
    Only values whose encoding they determine are kept (see :func:`_value_key`).
    """

    def __init__(self) -> None:
        self._encoded: dict[tuple[object, ...], bytes] = {}

    def encode(self, elem: DataElement | RawDataElement, encoding: tuple[bool, bool], charset: object) -> bytes:
        value_key = _value_key(elem, encoding)
        key = None
        if value_key is not None:
            key = (int(elem.tag), value_key, encoding, charset)
            found = self._encoded.get(key)
            if found is not None:
                return found
        buffer = DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = encoding
        write_data_element(buffer, elem, _charset_argument(charset))
        encoded = buffer.getvalue()
        if key is not None and len(encoded) <= _LARGEST_CACHED_ENCODING:
            if len(self._encoded) >= _CACHE_LIMIT:
                self._encoded.clear()
            self._encoded[key] = encoded
        return encoded


def _value_key(elem: DataElement | RawDataElement, encoding: tuple[bool, bool]) -> object | None:
    """What pydicom's encoding of ``elem`` depends on besides its tag, or None if unsure.

    Decoded elements of an unambiguous VR with a plain value (text, UID, integer, short
    bytes, empty, a person name made from text) qualify, and sequences whose items hold only such elements or raw
    elements pydicom writes as read; other raw elements, ambiguous VRs and values
    carrying their own encoding (person names as read, decimal strings keeping their
    original text, multiple values) do not.
    """
    if elem.is_raw:
        return None
    vr = elem.VR
    if vr == "SQ":
        items = []
        for item in elem.value:
            # pydicom writes an item's raw elements as read unless it must re-encode them
            raw_as_read = item.original_encoding == encoding and item.original_character_set == item._character_set
            entries = []
            for tag, child in item.items():
                if child.is_raw and raw_as_read and child.value is not None:
                    if len(child.value) > _LARGEST_CACHED_VALUE:
                        return None
                    child_key: object = ("raw", child.VR, child.value, child.length == _UNDEFINED)
                else:
                    child_key = _value_key(child, encoding)
                if child_key is None:
                    return None
                entries.append((int(tag), child_key))
            items.append((bool(getattr(item, "is_undefined_length_sequence_item", False)), tuple(entries)))
        return ("SQ", bool(elem.is_undefined_length), tuple(items))
    if elem.is_undefined_length or not isinstance(vr, str) or len(vr) != 2:
        return None
    value = elem.value
    kind = type(value)
    if kind is PersonName:
        # A name made from text (not read from a file) is encoded from its text alone.
        if value.original_string is None and value.encodings is None:
            return (vr, kind, str(value))
        return None
    if kind not in _CACHEABLE or (kind is bytes and len(value) > _LARGEST_CACHED_VALUE):
        return None
    return (vr, kind, value)


def _meta(meta: Dataset, preamble: bytes, cache: ElementCache) -> bytes:
    """Preamble, prefix and file meta information as ``dcmwrite`` writes them."""
    head = DicomBytesIO()
    head.is_implicit_VR, head.is_little_endian = False, True
    head.write(preamble)
    head.write(b"DICM")
    elements = [meta.get_item(t) for t in sorted(int(t) for t in meta.keys())]
    if [int(e.tag) for e in elements] != list(_META_TAGS) or any(e.is_raw or e.is_empty for e in elements):
        write_file_meta_info(head, meta, enforce_standard=True)  # completes or refuses it
        return head.getvalue()
    # Complete already: dcmwrite adds only the group length in front.
    rest = b"".join(cache.encode(e, _META_ENCODING, default_encoding) for e in elements)
    head.write(cache.encode(DataElement(0x00020000, "UL", len(rest)), _META_ENCODING, default_encoding))
    head.write(rest)
    return head.getvalue()


def _charset_argument(charset: object) -> str | list[str] | None:
    if charset is None or isinstance(charset, str):
        return charset
    return list(charset)  # type: ignore[call-overload]


def _charset_key(charset: object) -> object:
    if isinstance(charset, (str, type(None))):
        return charset
    return tuple(str(c) for c in charset)  # type: ignore[attr-defined]


def _span(raw: RawDataElement, source: memoryview, encoding: tuple[bool, bool]) -> tuple[int, int] | None:
    """Where ``raw`` lies in ``source``, if those bytes are what pydicom would write for it."""
    value = raw.value
    vr = raw.VR
    if raw.is_buffered or not isinstance(value, bytes):
        return None
    implicit, little = encoding
    undefined = raw.length == _UNDEFINED
    if not undefined and raw.length != len(value):
        return None
    packers = _PACKERS[little]
    tag = int(raw.tag)
    length = _UNDEFINED if undefined else len(value)
    if implicit:
        header = packers.implicit(tag >> 16, tag & 0xFFFF, length)
    elif not isinstance(vr, str) or len(vr) != 2 or not vr.isascii():
        return None
    elif vr in EXPLICIT_VR_LENGTH_32:
        header = packers.long(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)
    elif undefined or length > 0xFFFF:
        return None
    else:
        header = packers.short(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)
    start = raw.value_tell - len(header)
    end = raw.value_tell + len(value)
    if start < 0 or source[start : raw.value_tell] != header:
        return None
    if undefined:
        if source[end : end + 8] != _DELIMITER[little]:
            return None
        end += 8
    return start, end


def _decodes_to_itself(raw: RawDataElement, ts: UID, encoding: tuple[bool, bool]) -> bool:
    """Whether pixel data, which dcmwrite always decodes before writing, would come out as read."""
    value = raw.value
    if not isinstance(value, bytes) or len(value) % 2:  # OB and OW values are padded to even
        return False
    if (raw.length == _UNDEFINED) != ts.is_compressed:
        return False
    if not encoding[0] and raw.VR not in ("OB", "OW"):
        return False
    item = b"\xfe\xff\x00\xe0" if encoding[1] else b"\xff\xfe\xe0\x00"
    return not ts.is_compressed or value[:4] == item


def splice(
    ds: Dataset,
    source: memoryview,
    originals: Mapping[int, RawDataElement],
    cache: ElementCache,
) -> list[Chunk] | None:
    """The Part 10 encoding of ``ds`` as chunks, or None where only ``dcmwrite`` will do.

    Parameters
    ----------
    ds
        A data set read from ``source`` and edited since, with its new file meta.
    source
        The bytes ``ds`` was read from.
    originals
        The raw elements of ``ds`` as read; an element still identical (``is``) to its
        original is untouched and may be copied from ``source``.
    cache
        Encodings of replaced elements, shared between files.
    """
    meta = getattr(ds, "file_meta", None)
    preamble = getattr(ds, "preamble", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or not preamble or len(preamble) != 128:
        return None
    ts = UID(str(ts))
    if not ts.is_transfer_syntax or ts.is_private or ts == DeflatedExplicitVRLittleEndian:
        return None
    encoding = (bool(ts.is_implicit_VR), bool(ts.is_little_endian))
    if encoding == (True, False) or tuple(ds.original_encoding) != encoding:
        return None
    elements = {int(t): e for t, e in ds.items()}
    tags = sorted(elements)
    if tags and tags[0] >> 16 <= 2:  # command or file meta elements: dcmwrite refuses them
        return None
    if ds.original_character_set != ds._character_set:  # pydicom would decode and re-encode all
        return None
    if meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID") or meta.get(
        "MediaStorageSOPInstanceUID"
    ) != ds.get("SOPInstanceUID"):
        return None
    pixels = elements.get(_PIXEL_DATA)
    if pixels is not None:
        if pixels is not originals.get(_PIXEL_DATA) or not _decodes_to_itself(pixels, ts, encoding):
            elements[_PIXEL_DATA] = pixels = ds[_PIXEL_DATA]
            pixels.is_undefined_length = ts.is_compressed  # what dcmwrite does

    pending = bytearray(_meta(meta, preamble, cache))

    charset = ds.get("SpecificCharacterSet", default_encoding)
    charset = _charset_key(charset.value if isinstance(charset, DataElement) else charset)
    chunks: list[Chunk] = []
    run_start = run_end = -1
    for tag in tags:
        if tag & 0xFFFF == 0 and tag >> 16 > 6:  # retired group lengths are never written
            continue
        elem = elements[tag]
        if elem.is_raw and elem.value is None:  # get_item reads it as dcmwrite does
            elem = ds.get_item(tag)
        span = _span(elem, source, encoding) if elem is originals.get(tag) else None  # type: ignore[arg-type]
        if span is not None and span[0] == run_end:
            run_end = span[1]
            continue
        if run_end >= 0:
            chunks.append(source[run_start:run_end])
            run_start = run_end = -1
        if span is not None:
            if pending:
                chunks.append(bytes(pending))
                pending.clear()
            run_start, run_end = span
        else:
            pending += cache.encode(elem, encoding, charset)
    if run_end >= 0:
        chunks.append(source[run_start:run_end])
    if pending:
        chunks.append(bytes(pending))
    return chunks
