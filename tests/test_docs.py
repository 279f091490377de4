"""The docs ship with the code: every Markdown file the code or the README cites is in the
repository, every "Eq N" the code cites is one of the paper's equations indexed in
``docs/conventions.md``, and every conventions section a docstring names exists there."""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONVENTIONS = ROOT / "docs" / "conventions.md"
CODE_DIRS = ("causalnet", "adapters", "benchmarks", "examples", "tests")
PAPER_EQUATIONS = set(range(1, 40))  # the paper numbers its equations (1) .. (39)


_MD_PATH = re.compile(r"(?<![\w./-])((?:\.{1,2}/)?[\w./-]*\w\.md)\b")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_EQ = re.compile(
    r"\bEqs?\.?\s+(\d+(?:\s*[-\u2013]\s*\d+)?(?:\s*(?:,|and)\s*\d+(?:\s*[-\u2013]\s*\d+)?)*)"
)
_STATEMENT_START = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
_SECTION = re.compile(r"conventions\.md`*\s*,\s*\"([^\"]+)\"")


def _python_files() -> list[Path]:
    """Every Python file of the repository but this one (whose examples cite on purpose)."""
    here = Path(__file__).resolve()
    return sorted(
        p
        for d in CODE_DIRS
        for p in (ROOT / d).rglob("*.py")
        if "__pycache__" not in p.parts and p.resolve() != here
    )


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _resolves(ref: str, source: Path) -> bool:
    """A path resolves relative to the repository root or to the citing file's folder."""
    return (ROOT / ref).exists() or (source.parent / ref).exists()


def prose(path: Path) -> str:
    """The comments and docstrings (strings standing as statements) of a Python file: where a
    file cites documents, as opposed to code that happens to spell ``args.md``."""
    parts: list[str] = []
    previous = tokenize.NEWLINE
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type == tokenize.COMMENT:
                parts.append(tok.string)
            elif tok.type == tokenize.STRING and previous in _STATEMENT_START:
                parts.append(tok.string)
            if tok.type not in (tokenize.COMMENT, tokenize.NL):
                previous = tok.type
    return "\n".join(parts)


def cited_equations(text: str) -> set[int]:
    """Equation numbers cited as ``Eq N``, ``Eqs N, M`` or ``Eqs N-M`` (ranges expanded)."""
    found: set[int] = set()
    for group in _EQ.findall(text):
        for part in re.split(r"\s*(?:,|and)\s*", group):
            ends = [int(x) for x in re.split(r"\s*[-\u2013]\s*", part)]
            if len(ends) == 2:
                if ends[0] >= ends[1]:
                    raise ValueError(f"descending equation range {part!r}")
                found.update(range(ends[0], ends[1] + 1))
            else:
                found.add(ends[0])
    return found


def indexed_equations() -> set[int]:
    """The equation numbers in the table under ``## Equation index`` of docs/conventions.md."""
    text = CONVENTIONS.read_text(encoding="utf-8")
    index = text.split("## Equation index", 1)[1]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", index, re.M)}


def conventions_sections() -> set[str]:
    return {m.strip() for m in re.findall(r"^#+ (.+)$", CONVENTIONS.read_text("utf-8"), re.M)}


def test_the_citation_parsers_find_what_they_should():
    cited = cited_equations("(Eqs 9, 10, 24-28) and Eq 33; Eqs 35 and 36")
    assert cited == {9, 10, 33, 35, 36} | set(range(24, 29))
    assert cited_equations("Equation 12, Eq. 40") == {40}
    with pytest.raises(ValueError, match="descending"):
        cited_equations("Eqs 28-24")
    refs = _MD_PATH.findall("see ``docs/conventions.md``, README.md here and ../x/CONVENTIONS.md")
    assert refs == ["docs/conventions.md", "README.md", "../x/CONVENTIONS.md"]
    assert _SECTION.findall('(``docs/conventions.md``, "Which sigma")') == ["Which sigma"]


def test_prose_is_the_comments_and_docstrings_only(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        '"""See docs/a.md."""\n\n\ndef f(args):\n    """And b.md."""\n'
        '    return args.md, "c.md"  # d.md\n',
        encoding="utf-8",
    )
    assert _MD_PATH.findall(prose(source)) == ["docs/a.md", "b.md", "d.md"]


def test_every_markdown_file_cited_in_code_or_the_readme_is_in_the_repository():
    missing: set[tuple[str, str]] = set()
    for path in _python_files():
        text = prose(path)
        for ref in _MD_PATH.findall(text):
            if not _resolves(ref, path):
                missing.add((_rel(path), ref))
        if re.search(r"\bCONVENTIONS\b(?!\.md)", text):  # cited without the .md
            missing.add((_rel(path), "CONVENTIONS"))
    readme = README.read_text(encoding="utf-8")
    for ref in _MD_PATH.findall(readme) + _LINK.findall(readme):
        target = ref.split("#", 1)[0]
        if target and "://" not in ref and not _resolves(target, README):
            missing.add(("README.md", ref))
    assert missing == set(), "cited but not in the repository"


def test_the_equation_index_lists_exactly_the_papers_equations():
    assert indexed_equations() == PAPER_EQUATIONS


def test_every_equation_cited_in_code_is_in_the_conventions_index():
    index = indexed_equations()
    cited: dict[int, str] = {}
    for path in [*_python_files(), README]:
        for n in cited_equations(path.read_text(encoding="utf-8")):
            cited.setdefault(n, _rel(path))
    assert len(cited) >= 20, "the code cites many equations: the parser must be finding them"
    unknown = {n: where for n, where in cited.items() if n not in index}
    assert unknown == {}, "cited as 'Eq N' but not an equation of the paper"


def test_every_conventions_section_named_in_code_exists():
    sections = conventions_sections()
    named = {
        (_rel(path), name)
        for path in _python_files()
        for name in _SECTION.findall(path.read_text(encoding="utf-8"))
    }
    assert named, "docstrings name conventions sections (e.g. 'Which sigma')"
    assert {(where, name) for where, name in named if name not in sections} == set()
