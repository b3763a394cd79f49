"""The generated PDFs are structurally valid: header, objects where the xref says, trailer, EOF."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from consumer.local.pdf import make_pdf


def _xref_offsets(pdf: bytes) -> list[int]:
    startxref = re.search(rb"startxref\n(\d+)\n%%EOF\n\Z", pdf)
    assert startxref is not None, "trailer must end with startxref and %%EOF"
    xref_at = int(startxref.group(1))
    assert pdf[xref_at:].startswith(b"xref\n"), "startxref must point at the xref table"
    header = re.match(rb"xref\n0 (\d+)\n", pdf[xref_at:])
    assert header is not None
    count = int(header.group(1))
    table_at = xref_at + header.end()
    entries = [pdf[table_at + 20 * i : table_at + 20 * (i + 1)] for i in range(count)]
    assert entries[0] == b"0000000000 65535 f\r\n"
    offsets = []
    for entry in entries[1:]:
        assert re.fullmatch(rb"\d{10} 00000 n\r\n", entry), entry
        offsets.append(int(entry[:10]))
    assert pdf[table_at + 20 * count :].startswith(b"trailer\n<< /Size %d " % count)
    return offsets


def _assert_valid(pdf: bytes) -> None:
    assert pdf.startswith(b"%PDF-1.4\n%")
    assert pdf.endswith(b"%%EOF\n")
    offsets = _xref_offsets(pdf)
    for number, offset in enumerate(offsets, start=1):
        assert pdf[offset:].startswith(b"%d 0 obj\n" % number), f"object {number} misplaced"
    stream = re.search(rb"<< /Length (\d+) >>\nstream\n", pdf)
    assert stream is not None
    length = int(stream.group(1))
    assert pdf[stream.end() + length :].startswith(b"\nendstream"), "stream /Length is wrong"


def test_pdf_has_header_correct_xref_and_eof() -> None:
    pdf = make_pdf("Procès-verbal de l'AG du 12 mars 2024")

    _assert_valid(pdf)
    assert b"/Type /Catalog" in pdf
    assert b"/Count 1" in pdf


def test_title_is_shown_on_the_page_and_in_the_info_dictionary() -> None:
    pdf = make_pdf("Contrat d'entretien (ascenseur)")

    assert pdf.count(rb"(Contrat d'entretien \(ascenseur\))") == 2


def test_same_title_gives_same_bytes_and_extra_lines_change_them() -> None:
    assert make_pdf("Budget 2025") == make_pdf("Budget 2025")
    assert make_pdf("Budget 2025") != make_pdf("Budget 2025", lines=["version 2"])


@given(
    title=st.text(min_size=1, max_size=500),
    lines=st.lists(st.text(max_size=80), max_size=5),
)
def test_any_title_gives_a_valid_pdf(title: str, lines: list[str]) -> None:
    _assert_valid(make_pdf(title, lines=lines))
