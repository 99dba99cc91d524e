"""The repository stands alone: no file cites a document that is not in it, and every
`docs/NAME.md §N` citation points at a section that exists."""

import re
import subprocess

from tests.conftest import ROOT

OUTSIDE = re.compile(r"REFERENCE_SPEC|\.\./shared|JAX_STACK_NOTES")
CITATION = re.compile(r"(docs/[\w-]+\.md)(?:\s+§(\d+))?")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".sh", ".sbatch", ".txt", ".toml", ".cfg"))
            and n != "tests/test_docs.py"]


def test_no_file_cites_a_document_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in tracked_text_files()
                 for i, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not offenders, offenders


def test_every_docs_citation_points_at_an_existing_section():
    seen = 0
    for path in tracked_text_files():
        text = re.sub(r"\s*\n\s*", " ", path.read_text())  # a citation may wrap a line
        for doc, section in CITATION.findall(text):
            target = ROOT / doc
            assert target.exists(), f"{path.relative_to(ROOT)} cites {doc}, which is not in the repository"
            if section:
                assert re.search(rf"^## §{section} ", target.read_text(), re.M), f"{path.relative_to(ROOT)}: {doc} §{section}"
            seen += 1
    assert seen >= 10  # the model and optimizer modules cite the design notes
