"""The repository documents itself: no references to documents outside it, and every docs/*.md link resolves.

Pure Python and fast (no model, no torch).
"""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINARY = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".pt", ".bin", ".gguf", ".safetensors", ".npy", ".npz", ".zip"}
OUTSIDE = "DES" + "IGN"  # built, so this file does not match itself

MD_LINK = re.compile(r"\]\(([^)\s#]*)(?:#([^)\s]*))?\)")  # [text](path.md#anchor) or [text](#anchor)
DOCS_REF = re.compile(r"(?<![\w./-])(docs/[\w./-]+?\.md)(?:#([\w-]+))?")  # e.g. docs/method.md#measurement, anywhere


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in names.splitlines():
        path = ROOT / name
        if path.suffix.lower() not in BINARY and path.is_file():
            yield path, path.read_text(encoding="utf-8", errors="replace")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(md_path):
    found, seen, fenced = set(), {}, False
    for line in md_path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            found.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return found


def test_no_references_to_outside_documents():
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for path, text in tracked_text_files()
            if path.resolve() != Path(__file__).resolve()
            for i, line in enumerate(text.splitlines(), 1) if OUTSIDE in line]
    assert not hits, "the repository must document itself (use docs/method.md):\n" + "\n".join(hits)


def test_docs_links_resolve():
    broken = set()
    for path, text in tracked_text_files():
        links = MD_LINK.findall(text) if path.suffix == ".md" else []
        refs = [(path.parent / t if t else path, a) for t, a in links if t.endswith(".md") or (not t and a)]
        refs += [(ROOT / t, a) for t, a in DOCS_REF.findall(text)]
        for target, anchor in refs:
            where = f"{path.relative_to(ROOT)} -> {os.path.relpath(target, ROOT)}{'#' + anchor if anchor else ''}"
            if not target.is_file():
                broken.add(f"{where}: no such file")
            elif anchor and anchor not in anchors(target):
                broken.add(f"{where}: no such heading")
    assert not broken, "broken references:\n" + "\n".join(sorted(broken))
