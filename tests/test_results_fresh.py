"""The committed results must not outlive the library they were measured with, silently.

Every results file under ``examples/results/`` and ``benchmarks/results/`` records the library
commit it was made with (``environment.git`` in the examples' JSON, ``machine.git`` in the
benchmarks' and the evidence's, a ``commit <hash>`` / ``git <hash>`` line in a markdown
summary). A file is **stale** when

* the library's code changed after the run: ``git log <commit>..HEAD -- nanoadam_jax/`` is not
  empty and some module differs from HEAD beyond its docstrings and comments (compared as
  ASTs), so a documentation-only commit does not make every result stale;
* it recorded ``library_dirty: true`` (or the markdown's "library modified" / "uncommitted
  changes"): the run used a library that no commit holds;
* the recorded commit is not in the repository; or
* it recorded no commit at all (files written before the scripts recorded one).

Stale files are allowed only when ``benchmarks/results/STALE.md`` lists them, one bullet each,
``- `path`: reason``; the README marks their numbers as made with an older library. The test
fails on a stale file the list lacks *and* on a listed file that is fresh again (re-run) or no
longer committed, and prints the exact lines to add and to remove.

What counts as a results file: the committed (``git ls-files``) ``.json`` files, and the
``.md`` / ``.txt`` files that have no ``.json`` of the same name beside them (a table written
with a JSON is judged by its JSON); plots are not files of their own, and ``runs.json`` is the
evidence script's cache of single runs, which ``e1.json`` ... ``e5.json`` report. The files'
contents are read from git's index (what is committed or staged), not the work tree, so runs
in progress that rewrite results in place do not change the verdict until their output is
``git add``-ed; ``STALE.md`` itself is read from the work tree, so editing it takes effect at
once. Staleness is judged against ``HEAD``: uncommitted library edits are not counted.

Skips (with the reason): outside a git work tree that holds these tests (a wheel or an
sdist), without ``git``, or when HEAD has no history; and in a shallow clone whose history
lacks a recorded commit (``git fetch --unshallow`` to check), where a missing commit means "not
fetched", not "unknown". In a full clone a missing commit makes the file stale.

Fast and jax-free: one ``git ls-files``, one ``git cat-file --batch`` for the contents, one
``git cat-file --batch-check`` for the commits, and one ``git log`` per distinct commit.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_DIRS = ("examples/results", "benchmarks/results")
STALE_MD = "benchmarks/results/STALE.md"
LIBRARY = "nanoadam_jax/"
#: Committed JSON files that are not results of their own (see the module docstring).
CACHES = frozenset({"runs.json"})
TEXT_SUFFIXES = (".md", ".txt")
#: Where a results JSON keeps its ``git`` record (``{"commit": ..., "library_dirty": ...}``).
GIT_RECORDS = (("git",), ("environment", "git"), ("machine", "git"))

_MD_COMMIT = re.compile(r"\b(?:commit|git)\s*:?\s+`?([0-9a-f]{7,40})\b")
_MD_DIRTY = re.compile(r"library modified|uncommitted changes|library_dirty\W+true", re.I)
_BULLET = re.compile(r"^\s*[-*]\s+`(?P<path>[^`]+)`\s*(?::\s*(?P<reason>.*\S))?\s*$")
_HEX = re.compile(r"[0-9a-f]{7,40}")


@dataclass(frozen=True)
class Record:
    """What a results file says about the library it was made with."""

    commit: str | None  # as recorded (possibly abbreviated); None when there is none
    dirty: bool = False
    problem: str | None = None  # unreadable file, malformed record


def _as_record(git: Any, where: str) -> Record:
    if not isinstance(git, dict):
        return Record(None, problem=f"{where} is not a {{commit, library_dirty}} record")
    commit, dirty = git.get("commit"), bool(git.get("library_dirty"))
    if commit is None:
        return Record(None, dirty)
    if not isinstance(commit, str) or not _HEX.fullmatch(commit.strip().lower()):
        return Record(None, dirty, problem=f"{where}.commit is not a commit hash: {commit!r}")
    return Record(commit.strip().lower(), dirty)


def record_of(path: str, data: bytes) -> Record:
    """The recorded library commit of a results file's contents.

    JSON: the first ``git`` record of :data:`GIT_RECORDS` (or a ``library_commit`` string).
    Markdown / text: a ``commit <hash>`` or ``git <hash>`` line, and whether it says the
    library had uncommitted changes.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Record(None, problem="not UTF-8 text")
    if not path.endswith(".json"):
        m = _MD_COMMIT.search(text)
        return Record(m.group(1) if m else None, bool(_MD_DIRTY.search(text)))
    try:
        doc = json.loads(text)
    except ValueError as e:
        return Record(None, problem=f"unreadable JSON ({e})")
    if not isinstance(doc, dict):
        return Record(None)
    for keys in GIT_RECORDS:
        node: Any = doc
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            return _as_record(node, ".".join(keys))
    for parent in (doc, doc.get("machine"), doc.get("environment")):
        if isinstance(parent, dict) and "library_commit" in parent:
            return _as_record(
                {"commit": parent["library_commit"], "library_dirty": parent.get("library_dirty")},
                "library_commit",
            )
    return Record(None)


def is_results_file(path: str, committed: set[str]) -> bool:
    """Whether a committed path under the results folders is a results file of its own."""
    p = PurePosixPath(path)
    if path == STALE_MD:
        return False
    if p.suffix == ".json":
        return p.name not in CACHES
    return p.suffix in TEXT_SUFFIXES and str(p.with_suffix(".json")) not in committed


def parse_stale_md(text: str) -> tuple[dict[str, str], list[str]]:
    """``STALE.md``'s bullets as ``{path: line}``, and the problems with its bullets.

    Lines that are not bullets (the intro, headings) are ignored. A bullet must name one
    backticked path and give a reason after a colon; a path may be listed once.
    """
    listed: dict[str, str] = {}
    problems: list[str] = []
    for line in text.splitlines():
        if not re.match(r"^\s*[-*]\s", line):
            continue
        m = _BULLET.match(line)
        if not m:
            problems.append(f"not a '- `path`: reason' bullet: {line!r}")
        elif not m["reason"]:
            problems.append(f"no reason given: {line!r}")
        elif m["path"] in listed:
            problems.append(f"listed twice: {m['path']}")
        else:
            listed[m["path"]] = line
    return listed, problems


# ------------------------------------------------------------------ git


def _git(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], input=stdin, capture_output=True, check=True, timeout=120
    ).stdout


def _repository() -> bool:
    """Skips unless the tests sit in a git work tree with a HEAD; returns whether it is shallow."""
    try:
        out = _git("rev-parse", "--show-toplevel", "--is-shallow-repository", "HEAD")
    except FileNotFoundError:
        pytest.skip("git is not installed")
    except subprocess.CalledProcessError:
        pytest.skip(f"{ROOT} is not a git work tree with history (an installed wheel or sdist?)")
    top, shallow, _head = out.decode().split("\n")[:3]
    if Path(top).resolve() != ROOT:
        pytest.skip(f"the tests are not in the repository's work tree (its top is {top})")
    return shallow == "true"


def _blobs(paths: list[str]) -> dict[str, bytes]:
    """The index's contents of ``paths`` (one ``git cat-file --batch``)."""
    out = _git("cat-file", "--batch", stdin="".join(f":{p}\n" for p in paths).encode())
    blobs, pos = {}, 0
    for p in paths:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if header[-1] == b"missing":  # listed by ls-files but not in the index's object store
            continue
        size = int(header[2])
        blobs[p], pos = out[pos : pos + size], pos + size + 1
    return blobs


def _resolve(commits: set[str]) -> dict[str, str | None]:
    """Full hashes of the recorded (possibly abbreviated) commits; None where unknown."""
    order = sorted(commits)
    stdin = "".join(f"{c}^{{commit}}\n" for c in order).encode()
    lines = _git("cat-file", "--batch-check", stdin=stdin).decode().splitlines()
    resolved: dict[str, str | None] = {}
    for c, line in zip(order, lines, strict=True):
        parts = line.split()
        resolved[c] = parts[0] if len(parts) == 3 and parts[1] == "commit" else None
    return resolved


def _library_changes(commit: str) -> list[str]:
    """``<short hash> <subject>`` of the commits after ``commit`` to HEAD that touch the library."""
    out = _git("log", "--format=%h %s", f"{commit}..HEAD", "--", LIBRARY)
    return out.decode().splitlines()


def _code(source: bytes) -> str:
    """A module's code without its docstrings and comments (its AST, dumped)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _code_changed(commit: str) -> bool:
    """Whether the library's code (not only docstrings or comments) differs from HEAD."""
    names = _git("diff", "--name-only", commit, "HEAD", "--", LIBRARY).decode().split()
    for name in names:
        if not name.endswith(".py"):
            return True
        try:
            old = _git("show", f"{commit}:{name}")
            new = _git("show", f"HEAD:{name}")
        except subprocess.CalledProcessError:
            return True  # added or removed module
        if _code(old) != _code(new):
            return True
    return False


def _headline(subject: str, width: int = 60) -> str:
    """A commit subject's first clause, at most ``width`` characters."""
    head = re.split(r"; | \(", subject, maxsplit=1)[0].strip()
    return head if len(head) <= width else head[: width - 3].rstrip() + "..."


def _stale_now() -> dict[str, str]:
    """``{path: suggested reason}`` for every stale committed results file."""
    shallow = _repository()
    listed = _git("ls-files", "-z", "--", *RESULT_DIRS).decode().split("\0")
    committed = {p for p in listed if p}
    paths = sorted(p for p in committed if is_results_file(p, committed))
    if not paths:
        pytest.skip(f"no committed results files under {', '.join(RESULT_DIRS)}")
    blobs = _blobs(paths)
    records = {p: record_of(p, blobs[p]) for p in paths if p in blobs}
    resolved = _resolve({r.commit for r in records.values() if r.commit})
    missing = sorted({c[:12] for c, full in resolved.items() if full is None})
    if shallow and missing:
        pytest.skip(f"shallow clone without the recorded commit(s) {', '.join(missing)}")
    changes = {full: _library_changes(full) for full in set(resolved.values()) if full}
    # Commits that only touched docstrings or comments do not change any number.
    changes = {full: ch if ch and _code_changed(full) else [] for full, ch in changes.items()}

    stale: dict[str, str] = {}
    for p, r in records.items():
        full = resolved.get(r.commit) if r.commit else None
        made = f"made at {r.commit[:7]}" if r.commit else ""
        if r.problem:
            stale[p] = r.problem
        elif r.commit is None:
            stale[p] = "no commit recorded" + (" (library modified)" if r.dirty else "")
        elif full is None:
            stale[p] = f"recorded commit {r.commit} is not in this repository"
        elif r.dirty:
            stale[p] = f"{made} with uncommitted library changes (library_dirty)"
        elif changes[full]:
            first, n = changes[full][-1].split(" ", 1), len(changes[full])
            later = f" and {n - 1} later library commit{'s' * (n > 2)}" if n > 1 else ""
            stale[p] = f"{made}, before {first[0]} ({_headline(first[1])}){later}"
    return stale


# ------------------------------------------------------------------ tests


def test_stale_results_are_listed_exactly():
    stale = _stale_now()
    stale_md = ROOT / STALE_MD
    listed, problems = parse_stale_md(stale_md.read_text() if stale_md.is_file() else "")
    add = [f"- `{p}`: {reason}" for p, reason in sorted(stale.items()) if p not in listed]
    remove = [line for p, line in sorted(listed.items()) if p not in stale]
    if add or remove or problems:
        msg = [f"{STALE_MD} is out of date with the committed results (judged against HEAD):"]
        if add:
            msg += ["", "ADD (stale: re-run them, or list them and mark their README numbers):"]
            msg += add
        if remove:
            msg += ["", "REMOVE (fresh again, or no longer a committed results file):", *remove]
        if problems:
            msg += ["", "FIX:", *problems]
        pytest.fail("\n".join(msg), pytrace=False)


@pytest.mark.parametrize(
    ("path", "text", "expected"),
    [
        (
            "examples/results/x.json",
            {"environment": {"git": {"commit": "ABCDEF0123", "library_dirty": False}}},
            Record("abcdef0123"),
        ),
        (
            "benchmarks/results/results.json",
            {"machine": {"git": {"commit": "abcdef0", "library_dirty": True}}},
            Record("abcdef0", dirty=True),
        ),
        (
            "benchmarks/results/gpu/results.json",
            {"machine": {"git": {"commit": None, "library_dirty": None}}},
            Record(None),
        ),
        ("benchmarks/results/sharding/a.json", {"args": {}, "rows": []}, Record(None)),
        ("b/x.json", {"library_commit": "1234567890"}, Record("1234567890")),
        ("b/x.json", {"machine": {"git": {"commit": "HEAD"}}}, None),
        ("b/x.json", "{not json", None),
        (
            "b/diag.md",
            "- date: 2026; commit 9830f9b06c68, library modified",
            Record("9830f9b06c68", True),
        ),
        ("b/summary.md", "- Versions: jax 0.10.2; git d510d1b11b79\n", Record("d510d1b11b79")),
        ("b/results.md", "nanoadam_jax 0.1.0 (commit None)", Record(None)),
        ("b/table.md", "| a | b |", Record(None)),
    ],
)
def test_recorded_commit_of_each_format(path, text, expected):
    data = (text if isinstance(text, str) else json.dumps(text)).encode()
    got = record_of(path, data)
    if expected is None:  # a malformed record is a problem, hence stale
        assert got.commit is None and got.problem, got
    else:
        assert got == expected


def test_which_committed_files_are_results():
    committed = {
        "examples/results/a.json",
        "examples/results/a.md",
        "examples/results/a.png",
        "benchmarks/results/diag.md",
        "benchmarks/results/evidence/runs.json",
        "benchmarks/results/evidence/summary.md",
        "benchmarks/results/sharding/fsdp-auto.txt",
        STALE_MD,
    }
    assert sorted(p for p in committed if is_results_file(p, committed)) == [
        "benchmarks/results/diag.md",
        "benchmarks/results/evidence/summary.md",
        "benchmarks/results/sharding/fsdp-auto.txt",
        "examples/results/a.json",
    ]


def test_stale_md_bullets():
    text = (
        "# Stale results\n\nIntro with `code` - and a dash.\n\n"
        "- `examples/results/a.json`: made at 1234567, before the chunked layout\n"
        "* `b.json`: no commit recorded\n"
        "- `c.json`\n"
        "- `b.json`: again\n"
        "- c.json: no backticks\n"
    )
    listed, problems = parse_stale_md(text)
    assert sorted(listed) == ["b.json", "examples/results/a.json"]
    assert len(problems) == 3 and "no reason" in problems[0] and "twice" in problems[1]
