"""Every document and repository path that the code or the docs cite exists in the repository.

What counts as a citation:

* a path that starts with one of the repository's top-level folders (``qstar/``, ``qstar_kernels/``,
  ``csrc/``, ``tests/``, ``benchmarks/``, ``scripts/``, ``examples/``, ``docs/``), found in the
  ``*.py``, ``*.md``, ``*.cpp``, ``*.cu``, ``*.h`` files and the ``Makefile``, and written as a path:
  with a suffix, a trailing slash, a wildcard, or in quotes or backticks (so that prose such as
  "tests/tuning" is not one). A wildcard must match a file; ``{a,b}`` is expanded; a path template
  (``..._<device>``, ``[_quick]``, an f-string field ``{name}``) names a file written at run time, so
  only its folder must exist;
* a design note named without its folder (the old notes lived outside the repository): it must be
  written as ``docs/<page>.md`` (or, inside ``docs/``, as a sibling link);
* an absolute path of a development machine, which is never a valid citation;
* a relative link in ``README.md`` or ``docs/*.md``, including its ``#anchor``;
* a heading cited beside a page, as in ``docs/kernels.md``, "Contract: thought attention" or
  docs/kernels.md ("Contract: thought attention"): the page must have that heading (case and
  backticks aside).

The README is the front door and stays short.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

TOP_DIRS = ("qstar_kernels", "qstar", "csrc", "tests", "benchmarks", "scripts", "examples", "docs")
SCANNED_SUFFIXES = {".py", ".md", ".cpp", ".cu", ".h", ".cuh"}
SCANNED_NAMES = {"Makefile"}
SKIPPED_DIRS = {
    ".git",
    "build",
    "dist",
    "runs",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".benchmarks",
    ".ruff_cache",
    ".venv",
    "venv",
    "node_modules",
}
README_MAX_LINES = 260

# A path that starts at a top-level folder and is not the tail of a longer path or a URL.
_PATH = re.compile(
    r"(?<![\w./\-~:])(?:" + "|".join(TOP_DIRS) + r")/[\w./*{},\-]*",
)
# The design notes that used to live outside the repository, cited by bare name.
_NOTE = re.compile(r"(?<![\w\-])([\w./\-]*?)\b(kernels|quietstar|style|environment)\.md\b")
# An absolute path on a development machine.
_ABSOLUTE = re.compile(r"(?<![\w.:/~\-])/(?:work|home|Users|root|mnt)/[\w.\-]+")
# A Markdown link or image: [text](target) with an optional "title".
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A page cited with a heading on the same line: docs/x.md``, "Heading" or docs/x.md ("Heading").
_HEADING_CITE = re.compile(r"(?<![\w./\-])(docs/[\w\-]+\.md)`*,?\s*\(?\s*\"([^\"]+)\"")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def scanned_files(root: Path = ROOT) -> list[Path]:
    """The source and documentation files of the repository (build products and this file left out)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.resolve() == THIS:
                continue
            if path.suffix in SCANNED_SUFFIXES or name in SCANNED_NAMES:
                found.append(path)
    return found


def _expand_braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if m is None:
        return [text]
    out = []
    for part in m.group(1).split(","):
        out.extend(_expand_braces(text[: m.start()] + part + text[m.end() :]))
    return out


def cited_paths(text: str) -> list[tuple[int, str, str]]:
    """``(line, path, kind)`` for every repository path in ``text``.

    ``kind`` is ``"path"`` (must exist; wildcards must match) or ``"template"`` (a file written at
    run time: only its folder must exist).
    """
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _PATH.finditer(line):
            path = m.group(0).rstrip(".,")
            if path.count("{") != path.count("}"):  # a brace group cut by the pattern: keep the head
                path = path[: path.index("{")] if "{" in path else path
            after = line[m.end() : m.end() + 1]
            quoted = line[m.start() - 1 : m.start()] in ("`", "'", '"')
            last = path.rstrip("/").rsplit("/", 1)[-1]
            # "tests/tuning" in prose is a pair of words; a path has a suffix, a slash, a wildcard,
            # a template or quotes.
            if not (quoted or path.endswith("/") or "." in last or "*" in last or after in ("<", "[")):
                continue
            kind = "template" if after in ("<", "[") else "path"
            placeholder = re.search(r"\{[^{},]*\}", path)  # an f-string field such as {name}
            if placeholder:
                path, kind = path[: placeholder.start()], "template"
            found.append((lineno, path, kind))
    return found


def missing_path(path: str, kind: str, root: Path = ROOT) -> str | None:
    """Why ``path`` does not resolve in ``root``, or None when it does."""
    if kind == "template":
        folder = path[: path.rfind("/") + 1]
        return None if (root / folder).is_dir() else f"folder {folder} of a template path"
    for one in _expand_braces(path):
        if any(c in one for c in "*?"):
            if not glob.glob(str(root / one)):
                return f"nothing matches {one}"
        elif one.endswith("/"):
            if not (root / one).is_dir():
                return f"no folder {one}"
        elif not (root / one).exists():
            return f"no file {one}"
    return None


def bare_note_citations(text: str, in_docs: bool) -> list[tuple[int, str]]:
    """Citations of a design note that do not point into ``docs/``."""
    bad = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _NOTE.finditer(line):
            prefix = m.group(1)
            if prefix.endswith("docs/") or (in_docs and prefix in ("", "./")):
                continue
            bad.append((lineno, m.group(0)))
    return bad


def absolute_paths(text: str) -> list[tuple[int, str]]:
    return [
        (lineno, m.group(0))
        for lineno, line in enumerate(text.splitlines(), 1)
        for m in _ABSOLUTE.finditer(line)
    ]


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else _HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(md: Path, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """``(line, target, why)`` for each relative link in ``md`` that does not resolve."""
    root = root.resolve()
    bad = []
    in_fence = False
    for lineno, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in _LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md.resolve()
            if root not in dest.parents and dest != root:
                bad.append((lineno, target, "points outside the repository"))
            elif not dest.exists():
                bad.append((lineno, target, "no such file"))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append((lineno, target, f"no heading #{anchor} in {dest.relative_to(root)}"))
    return bad


def headings(md: Path) -> set[str]:
    """The headings of a Markdown page, lower-cased, backticks removed."""
    out = set()
    in_fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := _HEADING.match(line)):
            out.add(m.group(2).replace("`", "").strip().lower())
    return out


def cited_headings(text: str) -> list[tuple[int, str, str]]:
    """``(line, page, heading)`` for every page cited together with one of its headings."""
    return [
        (lineno, m.group(1), m.group(2))
        for lineno, line in enumerate(text.splitlines(), 1)
        for m in _HEADING_CITE.finditer(line)
    ]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------
# The checks on the repository.


def test_every_cited_repository_path_exists():
    problems = []
    for path in scanned_files():
        for lineno, cited, kind in cited_paths(path.read_text(encoding="utf-8", errors="replace")):
            why = missing_path(cited, kind)
            if why:
                problems.append(f"{_rel(path)}:{lineno}: {cited} ({why})")
    assert not problems, _report(problems)


def test_design_notes_are_cited_in_docs():
    problems = []
    for path in scanned_files():
        in_docs = _rel(path).startswith("docs/")
        for lineno, cited in bare_note_citations(path.read_text(encoding="utf-8", errors="replace"), in_docs):
            problems.append(
                f"{_rel(path)}:{lineno}: {cited} (cite the page in docs/, e.g. docs/algorithm.md)"
            )
    assert not problems, _report(problems)


def test_no_absolute_paths():
    problems = []
    for path in scanned_files():
        for lineno, cited in absolute_paths(path.read_text(encoding="utf-8", errors="replace")):
            problems.append(f"{_rel(path)}:{lineno}: {cited}")
    assert not problems, _report(problems)


def test_cited_headings_exist():
    problems = []
    for path in scanned_files():
        for lineno, page, heading in cited_headings(path.read_text(encoding="utf-8", errors="replace")):
            target = ROOT / page
            if target.exists() and heading.replace("`", "").strip().lower() not in headings(target):
                problems.append(f'{_rel(path)}:{lineno}: {page} has no heading "{heading}"')
    assert not problems, _report(problems)


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [
        f"{_rel(md)}:{lineno}: ({target}) {why}" for md in pages for lineno, target, why in broken_links(md)
    ]
    assert not problems, _report(problems)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.partition("#")[0]).name for t in _LINK.findall(index)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages, "docs/ holds no page"
    assert not pages - linked, f"pages missing from docs/README.md: {sorted(pages - linked)}"


# ---------------------------------------------------------------------------------------------
# The checks can fail: each rule on hand-made text.


def test_cited_paths_finds_what_it_should(tmp_path):
    text = (
        "see qstar/model.py, `csrc/cpu/blas.h`; results in benchmarks/results/x_cpu.{csv,json}.\n"
        "written to benchmarks/results/gpu_check_<device>/ and benchmarks/results/y_<device>[_quick].csv\n"
        "not: github.com/owner/qstar/model.py, runs/qstar/x, my_tests/a.py, qstar.model, tests_x/y\n"
        "knobs for tests/tuning, but `csrc/cpu` and 'tests/fixtures' are folders\n"
        'out = f"benchmarks/results/{name}_cpu.csv"\n'
    )
    assert cited_paths(text) == [
        (1, "qstar/model.py", "path"),
        (1, "csrc/cpu/blas.h", "path"),
        (1, "benchmarks/results/x_cpu.{csv,json}", "path"),
        (2, "benchmarks/results/gpu_check_", "template"),
        (2, "benchmarks/results/y_", "template"),
        (4, "csrc/cpu", "path"),
        (4, "tests/fixtures", "path"),
        (5, "benchmarks/results/", "template"),
    ]
    (tmp_path / "qstar").mkdir()
    (tmp_path / "qstar" / "model.py").write_text("")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x_cpu.csv").write_text("")
    assert missing_path("qstar/model.py", "path", tmp_path) is None
    assert missing_path("qstar/", "path", tmp_path) is None
    assert missing_path("qstar/gone.py", "path", tmp_path) == "no file qstar/gone.py"
    assert missing_path("qstar/eval/", "path", tmp_path) == "no folder qstar/eval/"
    assert missing_path("benchmarks/results/x_cpu.*", "path", tmp_path) is None
    assert missing_path("benchmarks/results/x_cpu.{csv,json}", "path", tmp_path) == (
        "no file benchmarks/results/x_cpu.json"
    )
    assert missing_path("benchmarks/results/gpu_check_", "template", tmp_path) is None
    assert missing_path("benchmarks/gone/y_", "template", tmp_path) is not None


def test_note_and_absolute_rules_can_fail():
    text = (
        "(``kernels.md`` section 2) and design/quietstar.md; ok: docs/kernels.md, ../docs/algorithm.md\n"
        'x = "/work/main/qstar"; y = "/home/me/x"; ok: https://example.com/home/x\n'
    )
    assert bare_note_citations(text, in_docs=False) == [(1, "kernels.md"), (1, "design/quietstar.md")]
    assert bare_note_citations("[the kernels](kernels.md)", in_docs=True) == []
    assert bare_note_citations("[the kernels](kernels.md)", in_docs=False) == [(1, "kernels.md")]
    assert absolute_paths(text) == [(2, "/work/main"), (2, "/home/me")]


def test_cited_headings_can_fail(tmp_path):
    text = (
        'see ``docs/kernels.md``, "Contract: thought attention" and docs/algorithm.md ("The mixing head")\n'
        'docs/kernels.md, "Thought attention"; not a heading: docs/kernels.md for what was run, "x"\n'
    )
    assert cited_headings(text) == [
        (1, "docs/kernels.md", "Contract: thought attention"),
        (1, "docs/algorithm.md", "The mixing head"),
        (2, "docs/kernels.md", "Thought attention"),
    ]
    page = tmp_path / "kernels.md"
    page.write_text("# Kernels\n\n## Contract: `thought_attention`\n```\n# not a heading\n```\n")
    assert headings(page) == {"kernels", "contract: thought_attention"}


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The two commands", "the-two-commands"),
        ("`thought_attention`: the contract", "thought_attention-the-contract"),
        ("Measured: one training step (CPU)", "measured-one-training-step-cpu"),
    ],
)
def test_slug(heading, anchor):
    assert slug(heading) == anchor


def test_broken_links_can_fail(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some part\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-part) [web](https://x.org/y) [self](#top)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#nope)\n```\n[in a fence](nowhere.md)\n```\n# Top\n"
    )
    assert broken_links(page, tmp_path) == [
        (2, "docs/b.md", "no such file"),
        (2, "docs/a.md#nope", "no heading #nope in docs/a.md"),
    ]
