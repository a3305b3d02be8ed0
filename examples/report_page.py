"""Results pages whose numbers a script regenerates and whose verdict and reading a person writes."""

from __future__ import annotations

from pathlib import Path

READING_MARKER = "<!-- reading: written by hand, kept by reruns -->"
# The page's one-line verdict sits right under its title, above this marker, so that a reader sees the
# answer before the method; it is written by hand from the numbers, like the reading.
VERDICT_MARKER = "<!-- verdict: written by hand, kept by reruns -->"


def kept_verdict(old_page: str) -> str:
    """The verdict block of an existing page (from below its title to the marker, inclusive), or ''."""
    if VERDICT_MARKER not in old_page:
        return ""
    _, after_title = old_page.split("\n", 1)
    return after_title.split(VERDICT_MARKER, 1)[0].strip("\n") + f"\n{VERDICT_MARKER}\n\n"


def with_verdict(generated: str, verdict: str) -> str:
    """`generated` with `verdict` inserted right after its title line."""
    if not verdict:
        return generated
    title, rest = generated.split("\n", 1)
    return f"{title}\n\n{verdict}{rest.lstrip(chr(10))}"


def write_page_keeping_reading(page: Path, generated: str) -> Path:
    """Write `generated` to `page`, then the marker, then the reading already below the marker in the
    old page (a placeholder the first time): a rerun refreshes the numbers without erasing what a person
    wrote about them. The old page's verdict, under its title, is kept the same way."""
    reading, verdict = "## Reading\n\n(not written yet)\n", ""
    if page.is_file():
        old = page.read_text()
        verdict = kept_verdict(old)
        if READING_MARKER in old:
            reading = old.split(READING_MARKER, 1)[1].lstrip("\n")
    page.write_text(f"{with_verdict(generated, verdict)}\n{READING_MARKER}\n\n{reading}")
    return page
