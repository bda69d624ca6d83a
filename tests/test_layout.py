"""The package's layout: no import cycles, and the public import paths keep working."""

import ast
import importlib
import os

import pympx_queues

PACKAGE_DIR = os.path.dirname(os.path.abspath(pympx_queues.__file__))


def _modules():
    """{dotted module name: file path} of every module in the package."""
    found = {}
    root = os.path.dirname(PACKAGE_DIR)
    for dirpath, dirnames, filenames in os.walk(PACKAGE_DIR):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for f in filenames:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(dirpath, f)
    return found


def _import_graph():
    """{module: {modules it imports}}, inside the package only, counting every import
    statement (function-level ones too: a lazy import cycle is still a cycle)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    targets.append(sub if sub in modules else mod)
            for t in targets:
                while t and t not in modules:  # "a.b.c" of a package module: its nearest
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycles():
    graph = _import_graph()
    assert "pympx_queues.folder.reader" in graph and "pympx_queues.journal.writer" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_public_import_paths_keep_working():
    from pympx_queues import (  # noqa: F401
        DONE,
        FAILED,
        PersistentQueue,
        ReadableFolderQueue,
        ReadableGroupedFileFolderQueue,
        WritableFolderQueue,
    )
    from pympx_queues.compat import PersistentQueue as P2  # noqa: F401
    from pympx_queues.compat import ReadableFolderQueue as R2  # noqa: F401
    from pympx_queues.folder import ReadableFolderQueue as R  # noqa: F401
    from pympx_queues.persistent import Message, PersistentQueue as P  # noqa: F401

    assert R is ReadableFolderQueue and P is PersistentQueue
    assert issubclass(ReadableGroupedFileFolderQueue, ReadableFolderQueue)


def test_the_journal_package_exports_what_the_old_module_had():
    jr = importlib.import_module("pympx_queues.journal")
    for name in ("format_record", "parse_record", "JournalWriter", "scan_journal",
                 "encode_value", "decode_value", "dumps", "dumps_value", "KINDS",
                 "QUEUE_KINDS", "PIPELINE_KINDS", "new_run_id", "scan_dirs", "History",
                 "compact", "cut_torn_tail", "write_snapshot", "directory_lock",
                 "list_journals", "parse_journal_name", "JournalBroken", "RecordError"):
        assert hasattr(jr, name), name
    assert set(jr.__all__) <= set(dir(jr))
