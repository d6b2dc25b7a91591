"""User documentation stays true to the repository: every relative link in README.md, docs/*.md and
tests/README.md resolves (anchors included), every repository path they name exists, and none of them
points outside the repository (a clone has no ../shared)."""

import glob
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "tests" / "README.md"]
# a token that starts with one of the repository's own folders (or a requirements file) is a path in it
REPO_PATH = re.compile(
    r"(?<![/\w.$-])(?:configs|launch|benchmarks|ds_configs|experiments|docker|s2moe_ds|tests|docs|"
    r"gpu)/[\w./*-]*|(?<![/\w-])requirements[\w-]*\.txt"
)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def rel(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_and_paths_in_user_docs_exist(page):
    text = page.read_text()
    assert "../shared" not in text, f"{rel(page)} points outside the repository (../shared)"
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"^(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            missing.append(f"link {target}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            missing.append(f"link {target} (no such heading)")
    for tok in REPO_PATH.findall(text):
        tok = tok.rstrip(".")
        if "<" not in tok and not glob.glob(str(REPO / tok)):
            missing.append(f"path {tok}")
    assert not missing, f"{rel(page)}: " + "; ".join(missing)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages README does not link: {unlinked}"
