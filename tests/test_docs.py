"""The front page and docs/ keep their promises: README's test command is the one CI runs, README
stays a front page, and every relative link in README.md, CHANGELOG.md, docs/ and slurm/README.md
points at a file (and, with #anchor, a heading) that exists."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

TEST_COMMAND = "python -m pytest -q -n 2"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Pages that other branches of the same change add; a link to one of them is not broken once they
# are merged. Remove a name here when its page lands.
PAGES_FROM_OTHER_BRANCHES: set[str] = set()


def _pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "slurm/README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or heading after '#', does not exist."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            if rel not in PAGES_FROM_OTHER_BRANCHES:
                broken.append(target)
            continue
        if frag and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            if frag not in {anchor(h) for h in headings}:
                broken.append(target)
    return broken


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert f"pip install -e \".[test]\" && {TEST_COMMAND}\n" in readme
    assert "mpiexec -n 4 python -m mpidqn\n" in readme  # the other quick-start command
    ci_lines = [ln for ln in (ROOT / ".ci/run").read_text().splitlines()
                if "-m pytest" in ln and not ln.lstrip().startswith("#")]
    assert ci_lines[0].endswith("python3 -m pytest -q -n 2"), ci_lines


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    assert {str(p.relative_to(ROOT)): broken_links(p) for p in _pages()} == {str(p.relative_to(ROOT)): []
                                                                             for p in _pages()}


def test_the_link_check_can_fail(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Run directory\n")
    page.write_text("[ok](other.md) [ok](other.md#run-directory) [web](https://example.org) "
                    "[gone](missing.md) [bad anchor](other.md#gpu-under-architecture)\n")
    monkeypatch.setattr("test_docs.ROOT", tmp_path)
    assert broken_links(page) == ["missing.md", "other.md#gpu-under-architecture"]
