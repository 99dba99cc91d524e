"""The repository stands alone: no file cites a document that is not in it, and every
`docs/NAME.md §N` citation points at a section that exists."""

import re
import subprocess

from tests.conftest import ROOT

MARKDOWN = re.compile(r"[\w./-]*\w\.md\b")  # a document named by its file
CLIMBS_OUT = re.compile(r"(?:^|[\s\"'`(=])\.\./")  # a path that leaves the repository
CITATION = re.compile(r"(docs/[\w-]+\.md)(?:\s+§(\d+))?")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".sh", ".sbatch", ".txt", ".toml", ".cfg"))
            and n != "tests/test_docs.py"]


def outside_citations(path, text: str) -> list[str]:
    """Markdown documents the text names that are not in the repository (from its root or the
    file's folder), and paths that climb out of it."""
    missing = [m for m in MARKDOWN.findall(text) if not ((ROOT / m).exists() or (path.parent / m).exists())]
    return missing + [f"line {i}: ../" for i, line in enumerate(text.splitlines(), 1) if CLIMBS_OUT.search(line)]


def test_no_file_cites_a_document_outside_the_repository():
    offenders = {str(p.relative_to(ROOT)): found for p in tracked_text_files()
                 if (found := outside_citations(p, p.read_text()))}
    assert not offenders, offenders


def test_the_check_catches_a_note_kept_outside_the_repository():
    here = ROOT / "parcae_jax" / "model" / "config.py"
    assert outside_citations(here, "# as NOTES.md §3 says") == ["NOTES.md"]
    assert outside_citations(here, "see the spec in ../notes/") == ["line 1: ../"]
    assert outside_citations(here, "docs/design.md §1 and launch/README.md") == []


def test_every_docs_citation_points_at_an_existing_section():
    seen = 0
    for path in tracked_text_files():
        text = re.sub(r"\s*\n\s*", " ", path.read_text())  # a citation may wrap a line
        for doc, section in CITATION.findall(text):
            target = ROOT / doc
            assert target.exists(), f"{path.relative_to(ROOT)} cites {doc}, which is not in the repository"
            if section:
                assert re.search(rf"^## §{section} ", target.read_text(), re.M), \
                    f"{path.relative_to(ROOT)}: {doc} §{section}"
            seen += 1
    assert seen >= 10  # the model and optimizer modules cite the design notes
