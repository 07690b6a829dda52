"""The README and docs/ link to each other and to result files: every relative link must land.

A link names a file relative to the page (and maybe a heading, as GitHub turns it into an anchor);
a moved page or a renamed section breaks it silently, so the test reads every page's links.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", target)]


def test_anchor_follows_github():
    assert anchor("Fidelity on thirty held-out samples, teacher-forced, and a loop control (stop 34)") == \
        "fidelity-on-thirty-held-out-samples-teacher-forced-and-a-loop-control-stop-34"
    assert anchor("More tokens through 4-bit rows (`kvc-4bit`; measured, not the default)") == \
        "more-tokens-through-4-bit-rows-kvc-4bit-measured-not-the-default"


def test_the_readme_links_to_the_docs():
    targets = {target.split("#")[0] for target in relative_links(ROOT / "README.md")}
    assert {"docs/results.md", "docs/benchmarks.md"} <= targets


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_lands(page):
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_file(), f"{page.name}: link to missing {target}"
        if fragment:
            anchors = {anchor(heading) for heading in HEADING.findall(file.read_text())}
            assert fragment in anchors, f"{page.name}: no heading in {path or page.name} for #{fragment}"
