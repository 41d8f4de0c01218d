"""Property: under the Basic Profile no planted identifier survives, whatever the data set."""

from __future__ import annotations

import io
import string

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging.deid import Deidentifier
from imaging.profile import load_profile_table
from tests.imaging.planting import REFERENCED_SERIES_SEQUENCE, SECRET, base_dataset, encode, vr_for

TEXT_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT")
ROWS = [
    (row.tag_int, vr_for(row.tag_int))
    for row in load_profile_table().rows
    if row.tag_int is not None
    and row.tag_int >> 16 not in (0x0000, 0x0002)
    and vr_for(row.tag_int) in TEXT_VRS + ("UI", "OB", "UN")
]
DEIDENTIFIER = Deidentifier(secret=SECRET)

suffixes = st.text(alphabet=string.ascii_uppercase + string.digits, min_size=3, max_size=9)


@st.composite
def planted_datasets(draw: st.DrawFn) -> tuple[Dataset, set[str], set[str]]:
    ds = base_dataset()
    texts: set[str] = set()
    uids: set[str] = set()
    chosen = draw(st.lists(st.sampled_from(ROWS), min_size=1, max_size=25, unique=True))
    for tag, vr in chosen:
        depth = draw(st.integers(min_value=0, max_value=2))
        container = ds
        for _ in range(depth):  # bury it in a new item of a sequence the profile walks through
            item = Dataset()
            if REFERENCED_SERIES_SEQUENCE in container:
                container[REFERENCED_SERIES_SEQUENCE].value.append(item)
            else:
                container.add_new(REFERENCED_SERIES_SEQUENCE, "SQ", Sequence([item]))
            container = item
        if vr == "UI":
            value: object = f"2.25.{draw(st.integers(min_value=10**20, max_value=10**30))}"
            uids.add(str(value))
        else:
            token = "QZX" + draw(suffixes)
            texts.add(token)
            value = token.encode() if vr in ("OB", "UN") else token
        container.add_new(tag, vr, value)
    if draw(st.booleans()):
        block = ds.private_block(0x0033, "QZX CREATOR", create=True)
        token = "QZX" + draw(suffixes)
        block.add_new(0x01, "LO", token)
        texts.add(token)
    return ds, texts, uids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planted_datasets())
def test_no_planted_text_or_uid_survives_the_basic_profile(case: tuple[Dataset, set[str], set[str]]) -> None:
    ds, texts, uids = case
    before = encode(ds).lower()
    assert all(t.lower().encode() in before for t in texts)  # every planted value is in the input
    encoded, _, name = DEIDENTIFIER.deidentify_bytes(encode(ds))
    lowered = encoded.lower()
    assert not [t for t in texts if t.lower().encode() in lowered]
    out = pydicom.dcmread(io.BytesIO(encoded))
    values = {str(e.value) for e in out.iterall() if e.VR == "UI"} | {str(e.value) for e in out.file_meta}
    assert not uids & values
    assert "qzx" not in name.lower()
