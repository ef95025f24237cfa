"""The README and docs/: every relative link names a file that exists and, with an #anchor, a heading
of that file (GitHub's heading slugs); the README stays a guide of at most 300 lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """`text` without fenced and indented code blocks and inline code, where brackets are not links."""
    out, fenced, previous_blank = [], False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        indented = line.startswith("    ") and previous_blank
        if fenced or (indented and not line.lstrip().startswith(("-", "*", "|"))):
            out.append("")
            continue  # a code block goes on while its lines stay indented, so previous_blank keeps its value
        previous_blank = not line.strip()
        out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation removed except '-' and '_',
    each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in `path`, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_headings(path.read_text()):
        base = slug(line)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose_headings(text: str) -> list[str]:
    headings, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := HEADING.match(line)):
            headings.append(match.group(2))
    return headings


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` whose file or anchor does not resolve."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... are not checked here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        shown = linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked
        if not linked.exists():
            broken.append(f"{target}: {shown} does not exist")
        elif anchor and (linked.is_dir() or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {shown}")
    return broken


def test_slugs_follow_github():
    assert slug("Sampling while training: `rollout.max_staleness`") == "sampling-while-training-rolloutmax_staleness"
    assert slug("Sampler/trainer mismatch") == "samplertrainer-mismatch"
    assert slug("Scaling note (arithmetic, not GPU measurements)") == "scaling-note-arithmetic-not-gpu-measurements"
    assert slug("The RLP recipe and `rntp plan`") == "the-rlp-recipe-and-rntp-plan"
    assert slug("Each context once: shared-prefix packs") == "each-context-once-shared-prefix-packs"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Some part: `x.y`\n\ntext\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md) [ok](a.md#some-part-xy) [ok](#here) [web](https://example.org/#x)\n"
                    "`[code](nowhere.md)`\n\n    [indented code](nowhere.md)\n\n# Here\n")
    assert broken_links(page) == []
    page.write_text("# Here\n\n[gone](missing.md) [bad anchor](a.md#nope) [own](#there)\n")
    assert len(broken_links(page)) == 3


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert page.is_file()
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken_links(page))


def test_the_readme_is_a_guide_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"
    assert lines[2].strip().startswith("make demo") and lines[3].strip().startswith("make test")


def test_every_docs_page_is_reachable_from_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(prose(index))}
    missing = {p.name for p in (ROOT / "docs").glob("*.md")} - linked - {"README.md"}
    assert not missing, f"docs/README.md does not link {sorted(missing)}"
