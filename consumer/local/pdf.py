"""A generator of small, valid one-page PDF files for the local document store and tests.

The file is written by hand (PDF 1.4, Helvetica, WinAnsi text) with a correct cross-reference
table, so real PDF readers open it and the partner sandbox's "is this a PDF" check is meaningful.
The output is deterministic: the same title and lines give the same bytes, hence the same sha256.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

_PAGE_WIDTH = 595  # A4 in points
_PAGE_HEIGHT = 842
_MARGIN = 72
_WRAP_COLUMNS = 70
_MAX_LINES = 40


def make_pdf(title: str, *, lines: Sequence[str] = ()) -> bytes:
    """Return a one-page PDF showing ``title`` (wrapped) and then ``lines``."""
    shown = [*textwrap.wrap(title, _WRAP_COLUMNS), "", *lines][:_MAX_LINES]
    content = _content_stream(shown)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>" % (_PAGE_WIDTH, _PAGE_HEIGHT),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Title %s /Producer (chouette-relay local document store) >>" % _pdf_string(title),
    ]
    # The second line is the customary binary comment telling tools the file is not text.
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref_offset = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    out += b"0000000000 65535 f\r\n"
    for offset in offsets:
        out += b"%010d 00000 n\r\n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\n" % (len(objects) + 1, len(objects))
    out += b"startxref\n%d\n%%%%EOF\n" % xref_offset
    return bytes(out)


def _content_stream(lines: Sequence[str]) -> bytes:
    ops = [b"BT", b"/F1 14 Tf", b"18 TL", b"%d %d Td" % (_MARGIN, _PAGE_HEIGHT - _MARGIN)]
    for line in lines:
        ops.append(b"%s Tj T*" % _pdf_string(line))
    ops.append(b"ET")
    return b"\n".join(ops)


def _pdf_string(text: str) -> bytes:
    """A PDF literal string in WinAnsi; characters it cannot show become '?'."""
    raw = text.encode("cp1252", errors="replace")
    escaped = bytearray(b"(")
    for byte in raw:
        if byte in b"()\\":
            escaped += b"\\" + bytes([byte])
        elif 32 <= byte < 127:
            escaped.append(byte)
        else:
            escaped += b"\\%03o" % byte
    escaped += b")"
    return bytes(escaped)
