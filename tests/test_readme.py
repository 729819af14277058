"""The Python examples of the README and of docs/ run as written, and the documentation's relative links resolve."""

from __future__ import annotations

import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import in_background

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# A fenced block opened by ```python and closed by the next ``` at the start of a line.
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
# [text](target): the targets that are not web addresses or in-page anchors are paths in the repository.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# <!-- examples-env: NAME=value ... -->: the environment a page's examples need before JAX starts
# (e.g. several host devices); such examples run in a child Python.
_EXAMPLES_ENV = re.compile(r"<!-- examples-env: (.*?) -->")


def examples_env(path: pathlib.Path) -> dict[str, str] | None:
    """The variables of ``path``'s examples-env comment, or None when its examples run in this process."""
    env = _EXAMPLES_ENV.search(path.read_text())
    return None if env is None else dict(item.split("=", 1) for item in env.group(1).split())


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _PYTHON_BLOCK.finditer(text)]


EXAMPLES = [(path, line, source) for path in (README, *DOCS) for line, source in python_blocks(path)]


def test_readme_has_examples():
    assert python_blocks(README), "README.md should show its usage in a ```python block"


@pytest.mark.parametrize("path, line, source", EXAMPLES,
                         ids=[f"{p.relative_to(ROOT).as_posix()}:{line}" for p, line, _ in EXAMPLES])
def test_example_runs(path, line, source):
    # Each block is self-contained: its own namespace, no state from the blocks before it.
    # Padding with newlines makes a traceback point at the file's own line numbers.
    extra = examples_env(path)
    if extra is None:
        exec(compile("\n" * (line - 1) + source, str(path), "exec"), {"__name__": "__example__"})
        return
    child = in_background(("test_readme", path, line), child_job(path, line, source, extra)).result()
    assert child.returncode == 0, f"{path.relative_to(ROOT)}:{line} failed with {extra}:\n{child.stderr}"


def child_job(path, line, source, extra):
    """A function that runs one block in its own child Python with its page's examples-env ``extra``, as a
    reader would (the environment taken now, in the test's thread)."""
    padded = "\n" * (line - 1) + source
    program = f"exec(compile({padded!r}, {str(path)!r}, 'exec'), {{'__name__': '__example__'}})"
    return functools.partial(subprocess.run, [sys.executable, "-c", program], cwd=ROOT, env={**os.environ, **extra},
                             capture_output=True, text=True)


def start_in_background(items):
    """Called once collection is done (tests/conftest.py): the child of each selected block that needs one
    starts beside the tests before it; its test collects the outcome."""
    for item in items:
        if item.originalname == "test_example_runs":
            path, line, source = (item.callspec.params[name] for name in ("path", "line", "source"))
            if (extra := examples_env(path)) is not None:
                in_background(("test_readme", path, line), child_job(path, line, source, extra))


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    missing = []
    for target in _LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"
