"""The design document and the references to it: every anchor the code cites into
docs/design.md names one of its headings, and the code cites no section numbers of a
document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
CITING_DIRS = ("loopedlm", "tests", "benchmarks", "docs")
CITING_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".html", ".js"}
# the document's name and a '#' written apart, so this file's own text cites nothing
CITATION = re.compile(re.escape("design.md") + "#" + r"([A-Za-z0-9_-]+)")
SPEC_SECTION = re.compile(r"\bSPEC\s*§?\s*\d")
SECTIONS = ["backbone", "loop-modes", "attention-injection", "loss-over-loops", "kv-cache",
            "attention-variants", "residual-scaling", "training-recipe", "diagnostics",
            "evaluation", "paper-results", "decoding", "invariants",
            "differences-from-the-authors-code"]


def github_slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercase, punctuation other than '-' and
    '_' dropped, each space a '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_anchors(markdown: str, level: str = "#+") -> list[str]:
    """The anchors of the headings (outside code fences), duplicates suffixed -1, -2 ..
    as GitHub does."""
    anchors, seen, fenced = [], {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = re.fullmatch(rf"({level})\s+(.+?)\s*#*\s*", line)
        if fenced or not match or (level == "#+" and len(match.group(1)) > 6):
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.append(slug if count == 0 else f"{slug}-{count}")
    return anchors


def citing_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in CITING_DIRS:
        files += [p for p in (ROOT / folder).rglob("*")
                  if p.is_file() and p.suffix in CITING_SUFFIXES]
    return files


def test_github_slug():
    assert github_slug("Differences from the authors' code") == \
        "differences-from-the-authors-code"
    assert github_slug("KV cache") == "kv-cache"
    assert heading_anchors("# A\n```\n# not a heading\n```\n## A\n") == ["a", "a-1"]


def test_design_has_exactly_the_cited_sections_in_order():
    assert heading_anchors(DESIGN.read_text(), level="##") == SECTIONS


def test_every_cited_anchor_is_a_heading_of_the_design_document():
    anchors = set(heading_anchors(DESIGN.read_text()))
    missing = []
    for path in citing_files():
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            missing += [f"{path.relative_to(ROOT)}:{number}: #{a}"
                        for a in CITATION.findall(line) if a not in anchors]
    assert not missing, "anchors that docs/design.md has no heading for:\n" + "\n".join(missing)


def test_the_anchor_finder_sees_a_citation():
    line = "# why: see docs/" + "design.md" + "#kv-cache and docs/" + "design.md" + "#nope"
    assert CITATION.findall(line) == ["kv-cache", "nope"]


def test_nothing_cites_spec_section_numbers():
    """The code, tests, benchmarks, recipes and docs cite docs/design.md, never the sections
    of a document outside the repository (this file names such references to find them)."""
    here = Path(__file__).resolve()
    cited = [f"{p.relative_to(ROOT)}:{n}" for p in citing_files() + sorted(ROOT.glob("recipes/**/*.toml"))
             if p.resolve() != here
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if SPEC_SECTION.search(line)]
    assert not cited, f"{len(cited)} references to SPEC sections: " + ", ".join(cited[:20])


def test_the_spec_finder_sees_a_reference():
    assert SPEC_SECTION.search("(SPEC 2)") and SPEC_SECTION.search("SPEC 1-4")
    assert not SPEC_SECTION.search("SPECIFIC 2") and not SPEC_SECTION.search("the SPEC says")
