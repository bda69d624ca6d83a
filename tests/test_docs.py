"""The documentation builds in strict mode, and the command output it shows is current.

* ``mkdocs build --strict`` must pass without a warning: a broken link or anchor, a page
  missing from the nav, an API reference (mkdocstrings) that does not resolve or a CLI
  reference (mkdocs-click) that fails all fail the build.
* ``docs/generated/*.txt`` are transcripts of real runs written by
  ``scripts/gen_docs_output.py``; regenerated now, they must be what is committed.
* The README's two set-up commands are the ones ``.ci/run`` runs.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
GENERATED = os.path.join(DOCS, "generated")
MAIN_COMMAND = "pip install -e . && pympx-queues demo"
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest"


def _env() -> dict:
    env = dict(os.environ)
    env["NO_MKDOCS_2_WARNING"] = "1"  # Material's banner about its successor, not ours
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_docs_build_in_strict_mode_without_warnings(tmp_path):
    pytest.importorskip("mkdocs", reason="install the test extra: pip install -e '.[test]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert not warnings, "mkdocs build warned:\n" + "\n".join(warnings)
    html = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="pympx_queues.persistent.PersistentQueue.put"' in html
    assert 'id="pympx_queues.folder.ReadableFolderQueue.nack"' in html
    cli_html = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "pympx-queues status [OPTIONS] PATH" in cli_html


def test_generated_command_output_matches_what_the_commands_print_today(tmp_path):
    out = tmp_path / "generated"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gen_docs_output.py"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, f"scripts/gen_docs_output.py failed:\n{proc.stderr}"
    fresh = sorted(os.listdir(out))
    committed = sorted(n for n in os.listdir(GENERATED) if n.endswith(".txt"))
    hint = "run `python scripts/gen_docs_output.py` and commit docs/generated/"
    assert fresh == committed, f"generated files differ ({fresh} vs {committed}): {hint}"
    stale = []
    for name in fresh:
        with open(os.path.join(GENERATED, name), encoding="utf-8") as f:
            old = f.read()
        new = (out / name).read_text(encoding="utf-8")
        if old != new:
            stale.append("".join(difflib.unified_diff(
                old.splitlines(True), new.splitlines(True),
                f"docs/generated/{name} (committed)", f"{name} (printed now)")))
    assert not stale, (f"the docs show output the commands no longer print: {hint}\n"
                       + "\n".join(stale))


def test_every_generated_transcript_is_shown_by_a_page():
    pages = ""
    for name in os.listdir(DOCS):
        if name.endswith(".md"):
            with open(os.path.join(DOCS, name), encoding="utf-8") as f:
                pages += f.read()
    included = set(re.findall(r'--8<-- "generated/([^"]+)"', pages))
    on_disk = {n for n in os.listdir(GENERATED) if n.endswith(".txt")}
    assert on_disk <= included, f"not shown by any page: {sorted(on_disk - included)}"
    assert included <= on_disk, f"pages include missing files: {sorted(included - on_disk)}"


def test_readme_set_up_commands_are_what_ci_runs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert MAIN_COMMAND in readme.splitlines()
    assert TEST_COMMAND in readme.splitlines()
    assert TEST_COMMAND in ci.splitlines(), ".ci/run must run the README's test command verbatim"
