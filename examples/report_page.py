"""Results pages whose numbers a script regenerates and whose reading a person writes."""

from __future__ import annotations

from pathlib import Path

READING_MARKER = "<!-- reading: written by hand, kept by reruns -->"


def write_page_keeping_reading(page: Path, generated: str) -> Path:
    """Write `generated` to `page`, then the marker, then the reading already below the marker in the
    old page (a placeholder the first time): a rerun refreshes the numbers without erasing what a person
    wrote about them."""
    reading = "## Reading\n\n(not written yet)\n"
    if page.is_file() and READING_MARKER in page.read_text():
        reading = page.read_text().split(READING_MARKER, 1)[1].lstrip("\n")
    page.write_text(f"{generated}\n{READING_MARKER}\n\n{reading}")
    return page
