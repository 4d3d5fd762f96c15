"""The repository stands alone: no citations of files outside it, and every pointer into our docs
(a docs file name, optionally followed by a quoted section heading) names a file and a heading
that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("fsvfm_jax", "tools", "tests", "configs", "benchmarks", "docs", "README.md")
# Spelled in pieces so this file does not match itself.
OUTSIDE_REFERENCE = re.compile("|".join(["SP" + "EC", "DES" + "IGN.md", r"\.\./sha" + "red"]))
# A docs file name, optionally followed by a section heading in quotes or in italics (asterisks).
DOC_POINTER = re.compile(r"docs/([\w-]+\.md)(?:,? (?:\"([^\"]+)\"|\*([^*]+)\*))?")


def _files():
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in candidates:
            if f.is_file() and f.suffix in (".py", ".md", ".cfg", ".txt", ".json", ".toml"):
                yield f


def _headings(doc: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")}


def test_no_references_outside_the_repository():
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
            for f in _files() for i, line in enumerate(f.read_text().splitlines(), 1)
            if OUTSIDE_REFERENCE.search(line)]
    assert not hits, "citations of files users do not have:\n" + "\n".join(hits)


def test_doc_pointers_resolve():
    broken, seen = [], 0
    for f in _files():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            for doc_name, quoted, italic in DOC_POINTER.findall(line):
                seen += 1
                section = quoted or italic
                doc = ROOT / "docs" / doc_name
                if not doc.is_file():
                    broken.append(f"{f.relative_to(ROOT)}:{i}: docs/{doc_name} does not exist")
                elif section and section not in _headings(doc):
                    broken.append(f"{f.relative_to(ROOT)}:{i}: docs/{doc_name} has no heading {section!r}")
    assert seen > 20, f"only {seen} doc pointers found; the pattern no longer matches the code's style"
    assert not broken, "\n".join(broken)
