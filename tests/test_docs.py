"""The README fits a screen and links every page of docs/; no relative link is dead."""

import re
from pathlib import Path

import pytest

from helpers.repo import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    links = [m.group(1).split("#")[0] for m in LINK.finditer(page.read_text())]
    return [link for link in links if link and "://" not in link and not link.startswith("mailto:")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    dead = [link for link in relative_links(page) if not (page.parent / link).exists()]
    assert not dead, f"{page.relative_to(REPO_ROOT)}: dead links {dead}"


def test_the_checker_finds_a_dead_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md#part) [web](https://example.org)")
    assert relative_links(page) == ["page.md", "missing.md"]


def test_the_readme_fits_a_screen_and_links_every_page() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    linked = set(relative_links(REPO_ROOT / "README.md"))
    assert {f"docs/{page.name}" for page in PAGES[1:]} <= linked
