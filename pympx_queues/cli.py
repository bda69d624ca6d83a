"""The ``pympx-queues`` command line (click).  Thin: each command parses arguments, calls
one library function (:mod:`pympx_queues.admin`) and prints the result.

Output: a human table by default, ``--json`` on every read command for scripts.
Expected errors (missing folder, permission denied, not a queue, bad message name) are
one line on stderr, never a traceback.

Exit codes:

* 0 - ok.
* 1 - a problem was found or remains (``verify`` found corruption, ``status --check``
  found stale claims, ``repair`` could not fix everything), or the operation failed on the
  queue (disk full, corrupt journal, cancelled confirmation).
* 2 - usage: bad options or arguments, the path is missing, unreadable or not a queue.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import click

from . import admin
from .errors import JournalCorruptError, NotAQueueError, PympxQueueError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

PROG = "pympx-queues"


# --------------------------------------------------------------------------- errors
class CliError(click.ClickException):
    """An expected error: printed as one line on stderr, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_PROBLEM) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"{PROG}: error: {self.format_message()}", err=True)


def _os_error_line(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    return f"{where}: {what.lower()}" if where else what


def translate_error(exc: BaseException) -> Optional[CliError]:
    """Map an expected library exception to a one-line :class:`CliError` (None: a bug)."""
    if isinstance(exc, admin.NameTaken):
        return CliError(f"{exc} (pass --rename to publish under a unique name)", EXIT_PROBLEM)
    if isinstance(exc, (admin.UnsupportedOperation, admin.NotFound, NotAQueueError)):
        return CliError(str(exc), EXIT_USAGE)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return CliError(_os_error_line(exc), EXIT_USAGE)
    if isinstance(exc, JournalCorruptError):
        return CliError(f"{exc}; run `{PROG} repair` on the pickup dir to quarantine it",
                        EXIT_PROBLEM)
    if isinstance(exc, PympxQueueError):
        return CliError(str(exc), EXIT_PROBLEM)
    if isinstance(exc, OSError):
        return CliError(_os_error_line(exc), EXIT_PROBLEM)
    if isinstance(exc, ValueError):
        return CliError(str(exc), EXIT_USAGE)
    return None


class _Group(click.Group):
    """Turns expected exceptions of any subcommand into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (`watch | head`): a normal end, not an error.
            _discard_stdout()
            raise click.exceptions.Exit(EXIT_OK) from None
        except Exception as exc:  # noqa: BLE001 - translated or re-raised unchanged
            err = translate_error(exc)
            if err is None:
                raise
            raise err from exc


# --------------------------------------------------------------------------- output helpers
def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the final flush at exit does not fail again on
    the closed pipe (Python would print "Exception ignored ... BrokenPipeError")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return  # not a real file (tests capture it): nothing will be flushed to a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def stdout_is_terminal() -> bool:
    return _isatty(sys.stdout)


def stderr_is_terminal() -> bool:
    return _isatty(sys.stderr)


def fmt_age(seconds: Optional[float]) -> str:
    """``35s``, ``4m10s``, ``2h03m``, ``3d04h`` (empty for None)."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], indent: str = "") -> str:
    """Columns aligned with two spaces; numbers right-aligned."""
    rows = [list(r) for r in rows]
    cells = [list(headers)] + [[_cell(v) for v in r] for r in rows]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                   for r in rows) and bool(rows) for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return "\n".join(lines)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def emit_json_list(items: Iterable[Any], chunk: int = 256) -> None:
    """Print ``items`` as one JSON array, exactly as :func:`emit_json` would, but written
    as the items come: a listing of any size never sits in memory whole."""
    parts: List[str] = []
    first = True
    for item in items:
        text = "  " + json.dumps(item, indent=2, default=str).replace("\n", "\n  ")
        parts.append(("[\n" if first else ",\n") + text)
        first = False
        if len(parts) >= chunk:
            click.echo("".join(parts), nl=False)
            parts.clear()
    parts.append("[]" if first else "\n]")
    click.echo("".join(parts))


def emit(data: Any, as_json: bool, render: Any) -> None:
    """Print ``data`` as JSON or through the human ``render(data) -> str`` function."""
    if as_json:
        emit_json(data)
    else:
        text = render(data)
        if text:
            click.echo(text)


class ProgressBar:
    """``progress(done, total)`` callback drawing a bar on stderr, only on a terminal.

    Piped or redirected (and under ``--json``), it prints nothing at all.
    """

    def __init__(self, label: str, enabled: Optional[bool] = None, file: Any = None) -> None:
        self.label = label
        self.file = sys.stderr if file is None else file
        self.enabled = _isatty(self.file) if enabled is None else enabled
        self._bar: Any = None
        self._pos = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self.label, file=self.file)
            self._bar.__enter__()
        self._bar.update(max(0, done - self._pos))
        self._pos = max(self._pos, done)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


# --------------------------------------------------------------------------- renderers
#: Human output shows at most this many rows per table (``--json`` shows everything).
MAX_ROWS = 20


def _limited(rows: List[Any], hint: str, limit: int = MAX_ROWS) -> "tuple[List[Any], str]":
    if len(rows) <= limit:
        return rows, ""
    return rows[:limit], f"  ... and {len(rows) - limit} more ({hint})"


_COUNT_LABELS = [
    ("ready", "ready"), ("wip", "in progress"), ("done", "done"), ("failed", "dead letters"),
    ("tmp", "temp files"), ("trash", "acknowledged, deleting"), ("requested", "requested"), ("completed", "completed"),
    ("outstanding", "outstanding"),
]


def render_counts(report: Dict[str, Any]) -> List[str]:
    counts = report.get("counts", {})
    labels = dict(_COUNT_LABELS)
    order = [k for k, _ in _COUNT_LABELS if k in counts]
    order += [k for k in counts if k not in labels and not k.startswith("wip_")]
    width = max([len(labels.get(k, k)) for k in order] or [0])
    lines = []
    for key in order:
        line = f"  {labels.get(key, key).ljust(width)}  {counts[key]:>7}"
        if key == "wip" and ("wip_live" in counts or "wip_stale" in counts):
            line += f"  ({counts.get('wip_live', 0)} live, {counts.get('wip_stale', 0)} stale)"
        lines.append(line)
    return lines


def _alive(alive: Optional[bool]) -> str:
    return {True: "running", False: "gone", None: "other host"}[alive]


def render_status(report: Dict[str, Any]) -> str:
    kind = {"folder": "folder queue", "pickup": "PersistentQueue pickup dir"}.get(
        report.get("kind", ""), str(report.get("kind")))
    title = f"{kind} {report.get('path', '')}"
    if report.get("message_extension"):
        title += f" (messages *{report['message_extension']})"
    out = [title]
    out += render_counts(report)
    claims = report.get("claims") or []
    if claims:
        # stale ones first: they are what a person after a crash is looking for
        claims = sorted(claims, key=lambda c: (c.get("state") != "stale", c.get("name", "")))
        shown, more = _limited(claims, "ls --state wip, or --json")
        out.append("claims")
        out.append(table(
            [(c.get("name"), c.get("state"), c.get("host"), c.get("pid"), fmt_age(c.get("age")))
             for c in shown],
            ["NAME", "STATE", "HOST", "PID", "AGE"], indent="  "))
        out += [more] if more else []
    producers = report.get("producers") or []
    if producers:
        # newest runs first (run ids sort by start time)
        producers = sorted(producers, key=lambda p: p.get("run", ""), reverse=True)
        shown, more = _limited(producers, "--json")
        out.append("producers")
        out.append(table(
            [(p.get("id"), p.get("run"), p.get("state"), _alive(p.get("alive")))
             for p in shown],
            ["PRODUCER", "RUN", "STATE", "PROCESS"], indent="  "))
        out += [more] if more else []
    runs = report.get("runs") or []
    if runs:
        shown, more = _limited(runs, "--json")
        out.append("runs")
        out.append(table(
            [(r.get("prefix"), r.get("run"), r.get("requested"), r.get("completed"),
              r.get("outstanding"), r.get("state", "")) for r in shown],
            ["PREFIX", "RUN", "REQUESTED", "COMPLETED", "OUTSTANDING", "STATE"],
            indent="  "))
        out += [more] if more else []
    errors = report.get("journal_errors") or []
    if errors:
        shown, more = _limited(errors, "verify --json")
        out.append("journal errors")
        out.append(table([(e.get("kind"), e.get("path"), e.get("offset"), e.get("detail"))
                          for e in shown], ["KIND", "FILE", "OFFSET", "DETAIL"], indent="  "))
        out += [more] if more else []
    problems = report.get("problems") or []
    out.append("problems" if problems else "no problems found")
    out += [f"  {p}" for p in problems]
    return "\n".join(out)


def _preview(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def render_messages(messages: List[Dict[str, Any]]) -> str:
    if not messages:
        return "(no messages)"
    if any("prefix" in m for m in messages):  # pickup dir: outstanding journal messages
        return table([(m.get("name"), m.get("prefix"), m.get("run"), m.get("key"),
                       _preview(m.get("body"))) for m in messages],
                     ["ID", "PREFIX", "RUN", "KEY", "BODY"])
    return table(
        [(m.get("name"), m.get("state"), m.get("size"), fmt_age(m.get("age")),
          m.get("retries"), m.get("owner")) for m in messages],
        ["NAME", "STATE", "SIZE", "AGE", "RETRIES", "OWNER"])


def render_mapping(data: Dict[str, Any]) -> str:
    width = max([len(k) for k in data] or [0])
    lines = []
    for key, value in data.items():
        if value is None or value == "":
            continue
        if key.endswith("age") and isinstance(value, (int, float)):
            value = fmt_age(value)
        if isinstance(value, dict):
            value = json.dumps(value, default=str)
        text = _cell(value)
        if "\n" in text:
            text = text.replace("\n", "\n" + " " * (width + 2))
        lines.append(f"{key.ljust(width)}  {text}")
    return "\n".join(lines)


def render_moves(result: Dict[str, Any], verb: str, done: str) -> str:
    """One line per message moved ("requeued: x"; a dry run says "would requeue: x")."""
    moved = sorted(result.get("moved", []))
    dry = result.get("dry_run")
    label = f"would {verb}" if dry else done
    shown, more = _limited(moved, "--json lists all", limit=50)
    lines = [f"{label}: {name}" for name in shown] + ([more.strip()] if more else [])
    skipped, more = _limited(list(result.get("skipped", [])), "--json lists all", limit=50)
    for item in skipped:
        if isinstance(item, dict):
            lines.append(f"skipped: {item.get('name')} ({item.get('reason')})")
        else:
            lines.append(f"skipped: {item}")
    lines += [more.strip()] if more else []
    n = len(moved)
    summary = f"{n} message{'s' if n != 1 else ''} {'would be ' if dry else ''}{done}"
    lines.append(summary)
    return "\n".join(lines)


def render_requeue(result: Dict[str, Any]) -> str:
    if result.get("kind") != "pickup":
        return render_moves(result, "requeue", "requeued")
    # A pickup dir: nothing moves now; the next run's requeue_unprocessed_work() does it.
    ids = sorted(result.get("moved", []))
    shown, more = _limited(ids, "--json lists all", limit=50)
    lines = [f"outstanding: {i}" for i in shown] + ([more.strip()] if more else [])
    lines += [f"skipped: {s.get('name')} ({s.get('reason')})" for s in result.get("skipped", [])]
    n = len(ids)
    lines.append(f"{n} message{'s' if n != 1 else ''} ready for the next run "
                 "(its requeue_unprocessed_work() puts them back)"
                 + ("; dry run: journals not consolidated" if result.get("dry_run") else ""))
    return "\n".join(lines)


def render_check(result: Dict[str, Any]) -> str:
    lines = [f"{a}" for a in result.get("actions", [])]
    for issue in result.get("issues", []):
        where = issue.get("path", "")
        if issue.get("offset") is not None:
            where += f" @{issue['offset']}"
        lines.append(f"{issue.get('kind')}: {where}: {issue.get('detail', '')}".rstrip(": "))
    lines.append("ok" if result.get("ok") else
                 f"{len(result.get('issues', []))} problem(s) found")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the group
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pympx_queues")
@click.option("-v", "--verbose", count=True,
              help="Show the library's log on stderr (-v info, -vv debug; default: errors).")
def main(verbose: int = 0) -> None:
    """Inspect, requeue and repair pympx_queues folder queues and pickup journals.

    PATH is a folder queue directory or a PersistentQueue pickup dir; the kind is
    detected.  Exit codes: 0 ok, 1 problem found, 2 usage error (bad arguments, missing
    path, not a queue).
    """
    setup_logging(verbose)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: int) -> None:
    """Library log records go to stderr; by default only errors (the commands report
    what they did themselves, so the library's warnings would repeat it).

    The ``pympx_queues`` logger's own level is changed only for ``-v``/``-vv``; records
    still propagate, so an embedding program's logging sees them as before.
    """
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logger = logging.getLogger("pympx_queues")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    handler.setLevel(level)
    if verbose and logger.getEffectiveLevel() > level:
        logger.setLevel(level)


path_argument = click.argument("path", type=click.Path(path_type=str))
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable JSON on stdout.")


def queue_options(f: Any) -> Any:
    """--ext / --lease-timeout (folder queues) and --prefix (pickup dirs), gathered into
    one ``opts`` dict of :mod:`pympx_queues.admin` keyword options."""
    def collect(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        ctx.ensure_object(dict)
        if value is not None:
            ctx.obj.setdefault("opts", {})[param.name] = value
        return value

    opts = [
        click.option("--ext", "message_extension", default=None, metavar="EXT",
                     expose_value=False, callback=collect,
                     help="Folder queue: message extension [default: .tsv]."),
        click.option("--lease-timeout", "lease_timeout", type=click.FloatRange(min=0.001),
                     default=None, metavar="SECONDS", expose_value=False, callback=collect,
                     help="Folder queue: a claim of another host without heartbeat for "
                          "this long is stale [default: 600]."),
        click.option("--prefix", "prefix", default=None, expose_value=False,
                     callback=collect, help="Pickup dir: only this queue prefix."),
    ]
    for option in reversed(opts):
        f = option(f)
    return f


def _opts() -> Dict[str, Any]:
    ctx = click.get_current_context()
    return dict((ctx.obj or {}).get("opts", {}))


@main.command(short_help="Counts, claims, producers, runs and problems of a queue.")
@path_argument
@json_option
@queue_options
@click.option("--check", is_flag=True,
              help="Exit 1 when a problem is found (stale claims, corrupt journal records...).")
def status(path: str, as_json: bool, check: bool) -> None:
    """Kind of queue, counts per state, claims, producers, journal runs and problems."""
    report = admin.status(path, **_opts())
    if report.get("kind") == "pipeline":  # a pipeline's journal dir (issue 11)
        from .pipeline.admin import render_status as render_pipeline

        emit(report, as_json, render_pipeline)
    else:
        emit(report, as_json, render_status)
    if check and report.get("problems"):
        sys.exit(EXIT_PROBLEM)


@main.command(name="ls", short_help="List messages (state, size, age, retries, owner).")
@path_argument
@click.option("--state", type=click.Choice(admin.STATES), default=None,
              help="Only messages in this state (default: all).")
@json_option
@queue_options
def ls_command(path: str, state: Optional[str], as_json: bool) -> None:
    """List messages with state, size, age, retries and owner (--json: streamed, so a
    queue of any size lists in little memory)."""
    if as_json:
        emit_json_list(admin.iter_messages(path, state, **_opts()))
    else:
        emit(admin.list_messages(path, state, **_opts()), as_json, render_messages)


@main.command(short_help="Everything about one message (retries, error, owner, lease).")
@path_argument
@click.argument("message")
@json_option
@queue_options
def show(path: str, message: str, as_json: bool) -> None:
    """Everything known about one MESSAGE (name or id): retries, last error, owner, lease."""
    emit(admin.show_message(path, message, **_opts()), as_json, render_mapping)


@main.command(short_help="Enqueue files, or --data TEXT --name NAME.")
@path_argument
@click.argument("files", nargs=-1, type=click.Path(path_type=str))
@click.option("--data", default=None, help="Message content ('-' reads stdin).")
@click.option("--name", default=None, help="Message name for --data.")
@click.option("--copy", is_flag=True, help="Copy FILEs in and keep them (default: move).")
@click.option("--rename", is_flag=True,
              help="If a message of that name is waiting, publish as NAME~<hex>.EXT "
                   "(default: refuse).")
@json_option
@queue_options
def put(path: str, files: Sequence[str], data: Optional[str], name: Optional[str],
        copy: bool, rename: bool, as_json: bool) -> None:
    """Enqueue files (moved in, or copied with --copy), or --data TEXT --name NAME."""
    if data is not None or name is not None:
        if files or data is None or name is None:
            raise CliError("use either FILE... or --data TEXT --name NAME", EXIT_USAGE)
        payload: "bytes | str" = sys.stdin.buffer.read() if data == "-" else data
        published = [admin.put_data(path, name, payload, rename=rename, **_opts())]
    elif not files:
        raise CliError("nothing to put: give FILE... or --data TEXT --name NAME", EXIT_USAGE)
    else:
        with ProgressBar("put", enabled=None if not as_json else False) as bar:
            published = admin.put_files(path, list(files), copy=copy, rename=rename,
                                        progress=bar, **_opts())
    emit({"published": published}, as_json, lambda r: "\n".join(r["published"]))


@main.command(short_help="Return stale claims / earlier runs' work to the queue.")
@path_argument
@click.option("--all", "include_live", is_flag=True,
              help="Also take claims whose owner is alive (requires --force).")
@click.option("--force", is_flag=True, help="Confirm --all.")
@click.option("--dry-run", is_flag=True, help="Show what would move; change nothing.")
@click.option("--dead-host", "dead_hosts", multiple=True, metavar="HOST",
              help="Pickup dirs on a shared folder: treat journals written on HOST as "
              "abandoned (you know that host is down for good); repeatable. Sets "
              "PYMPX_QUEUES_DEAD_HOSTS for this command.")
@json_option
@queue_options
def requeue(path: str, include_live: bool, force: bool, dry_run: bool,
            dead_hosts: Tuple[str, ...], as_json: bool) -> None:
    """Return stale claims to the queue (folder) or requeue earlier runs' work (pickup)."""
    if include_live and not force:
        raise CliError("--all also takes claims whose owner is alive; add --force", EXIT_USAGE)
    if dead_hosts:
        from .journal.scan import DEAD_HOSTS_ENV
        from ._fs import hostname

        if hostname() in dead_hosts:
            raise CliError(f"--dead-host {hostname()!r} is this host; its own journals are "
                           "judged by their writers' processes", EXIT_USAGE)
        declared = [h for h in os.environ.get(DEAD_HOSTS_ENV, "").split(",") if h]
        os.environ[DEAD_HOSTS_ENV] = ",".join(declared + list(dead_hosts))
    with ProgressBar("requeue", enabled=None if not as_json else False) as bar:
        result = admin.requeue(path, include_live=include_live, dry_run=dry_run, progress=bar,
                               **_opts())
    emit(result, as_json, render_requeue)


@main.command(short_help="Move dead letters back to ready.")
@path_argument
@click.option("--pattern", default=None, metavar="GLOB",
              help="Only dead letters whose name matches GLOB (default: all).")
@click.option("--dry-run", is_flag=True, help="Show what would move; change nothing.")
@json_option
@queue_options
def retry(path: str, pattern: Optional[str], dry_run: bool, as_json: bool) -> None:
    """Move dead letters back to ready."""
    with ProgressBar("retry", enabled=None if not as_json else False) as bar:
        result = admin.retry(path, pattern=pattern, dry_run=dry_run, progress=bar, **_opts())
    emit(result, as_json, lambda r: render_moves(r, "retry", "retried"))


def _render_written(result: Dict[str, Any]) -> str:
    written = result.get("written", [])
    if not written:
        return "nothing to do: no producer is left open"
    return "\n".join(f"wrote {w.get('sentinel')} for producer {w.get('producer')}"
                     for w in written)


@main.command(short_help="Write DONE for producers that died before closing.")
@path_argument
@click.option("--producer", default=None, help="Only this producer id (default: every "
              "producer that registered and died without closing).")
@click.option("--force", is_flag=True, help="Even if that producer is still running.")
@json_option
@queue_options
def close(path: str, producer: Optional[str], force: bool, as_json: bool) -> None:
    """Write DONE for a producer that died before closing the stream."""
    emit(admin.close(path, producer=producer, force=force, **_opts()), as_json,
         _render_written)


@main.command(short_help="Write FAILED for producers that died before closing.")
@path_argument
@click.option("--producer", default=None, help="Only this producer id (default: every "
              "producer that registered and died without closing).")
@click.option("--force", is_flag=True, help="Even if that producer is still running.")
@json_option
@queue_options
def fail(path: str, producer: Optional[str], force: bool, as_json: bool) -> None:
    """Write FAILED for a producer that died before closing; consumers stop."""
    emit(admin.fail(path, producer=producer, force=force, **_opts()), as_json,
         _render_written)


def _confirm(what: str, path: str, yes: bool) -> None:
    if yes:
        return
    question = f"{what} {admin.describe_destruction(path, **_opts())}?"
    try:
        ok = click.confirm(question, default=False, err=True)
    except click.Abort:  # end of input (nothing piped in) or Ctrl-C
        click.echo("", err=True)
        ok = False
    if not ok:
        raise CliError(f"{what.lower()} cancelled; nothing was changed (use --yes to skip "
                       "this question)", EXIT_PROBLEM)


def _render_summary(result: Dict[str, Any]) -> str:
    return render_mapping({k: (len(v) if isinstance(v, list) else v)
                           for k, v in result.items()})


@main.command(short_help="pympx reset: requeue stale claims, drop ended runs' control files.")
@path_argument
@click.option("--force", is_flag=True, help="Also return claims whose owner is alive.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@queue_options
def reset(path: str, force: bool, yes: bool, as_json: bool) -> None:
    """pympx reset: stale claims back to ready, control files of ended runs removed.

    A run's control files go only once a consumer saw it end (so consumers still draining
    a closed run are not affected); --force also takes live claims and every control file.
    Never deletes a message.
    """
    _confirm("Reset", path, yes)
    with ProgressBar("reset", enabled=None if not as_json else False) as bar:
        result = admin.reset(path, force=force, progress=bar, **_opts())
    emit(result, as_json, _render_summary)


@main.command(short_help="pympx purge: delete every message (asks first).")
@path_argument
@click.option("--force", is_flag=True,
              help="Even while a live consumer holds a claim (or a journal writer runs).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@queue_options
def purge(path: str, force: bool, yes: bool, as_json: bool) -> None:
    """pympx purge: delete every message (pickup dir: give up on outstanding work)."""
    _confirm("Purge", path, yes)
    with ProgressBar("purge", enabled=None if not as_json else False) as bar:
        result = admin.purge(path, force=force, progress=bar, **_opts())
    emit(result, as_json, _render_summary)


@main.command(short_help="Check journals and folder consistency (exit 1 on problems).")
@path_argument
@json_option
@queue_options
def verify(path: str, as_json: bool) -> None:
    """Check journal checksums and folder consistency; exit 1 if anything is wrong.

    Folder queues: files no consumer will ever see (a name with a control character
    such as a newline, shown escaped), leftovers, stale claims.  Exit 2 (usage) when
    --prefix names no journal in a pickup dir (a typo checks nothing).
    """
    result = admin.verify(path, **_opts())
    emit(result, as_json, render_check)
    if not result.get("ok"):
        sys.exit(EXIT_PROBLEM)


@main.command(short_help="Quarantine corrupt records, clean leftovers; keeps messages.")
@path_argument
@click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
@json_option
@queue_options
def repair(path: str, dry_run: bool, as_json: bool) -> None:
    """Quarantine corrupt journal records, clean leftovers; never deletes a message."""
    result = admin.repair(path, dry_run=dry_run, **_opts())
    emit(result, as_json, render_check)
    if not result.get("ok"):
        sys.exit(EXIT_PROBLEM)


def render_watch(report: Dict[str, Any], rates: Dict[str, float], interval: float) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(report.get("wall_time", time.time())))
    lines = [f"{stamp}  every {interval:g}s  (Ctrl-C to stop)", render_status(report)]
    if rates:
        shown = {k: v for k, v in rates.items() if not k.startswith("wip_")}
        lines.append("rates (per second)")
        lines += [f"  {k.ljust(12)} {v:+9.1f}" for k, v in shown.items()]
    return "\n".join(lines)


@main.command(short_help="Live counts and rates until Ctrl-C.")
@path_argument
@click.option("--interval", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after N refreshes (default: until Ctrl-C).")
@click.option("--once", is_flag=True, help="One refresh, then exit (same as --count 1).")
@json_option
@queue_options
def watch(path: str, interval: float, count: Optional[int], once: bool, as_json: bool) -> None:
    """Live view of counts and rates, refreshed until Ctrl-C (one JSON line per refresh)."""
    if once:
        count = 1
    redraw = stdout_is_terminal() and not as_json
    previous: Optional[Dict[str, Any]] = None
    shown = 0
    try:
        while True:
            current = admin.snapshot(path, **_opts())
            rates = admin.rates(previous, current)
            if as_json:
                click.echo(json.dumps({"status": current, "rates": rates}, default=str))
            else:
                if redraw:
                    click.clear()
                elif shown:
                    click.echo("")
                click.echo(render_watch(current, rates, interval))
            shown += 1
            previous = current
            if count is not None and shown >= count:
                break
            time.sleep(interval)  # pacing of the display, not a wait for a condition
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- demo
@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=str),
              default=None, help="Work in this directory (default: a temp dir, removed "
              "afterwards).")
@click.option("--messages", type=click.IntRange(min=10), default=200, show_default=True,
              help="Messages the producer puts.")
@click.option("--consumers", type=click.IntRange(min=2), default=3, show_default=True,
              help="Consumer processes (one of them is killed).")
@click.option("--queue", type=click.Choice(["persistent", "folder", "pipeline", "both", "all"]),
              default="all", show_default=True, help="What to crash: the journaled "
              "PersistentQueue, a folder queue, a durable pipeline, both queues, or all "
              "three one after the other.")
@json_option
def demo(directory: Optional[str], messages: int, consumers: int, queue: str,
         as_json: bool) -> None:
    """Crash a consumer (and a pipeline's coordinator) with SIGKILL mid-run, recover,
    prove nothing was lost.

    Exit 0 when nothing was lost or done twice, 1 otherwise.
    """
    from .demo import format_report, run_demo

    report = run_demo(directory, messages=messages, consumers=consumers, queue=queue)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(format_report(report))
    if not report.ok:
        sys.exit(EXIT_PROBLEM)


@main.command(name="reset-switch",
              short_help="Reset a batch_map's tripped kill switch (issue 12).")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--run-id", default=None, help="The map's run id (default: batch_map).")
@click.option("--keep-failed", is_flag=True,
              help="Do not re-run the failed calls at the next run.")
@json_option
def reset_switch(path: str, run_id: Optional[str], keep_failed: bool, as_json: bool) -> None:
    """Clear the kill-switch state of a durable batch_map in PATH."""
    from .pipeline.batch_map import reset_kill_switch

    result = reset_kill_switch(path, run_id, retry_failed=not keep_failed)
    emit(result, as_json, lambda r: (
        ("kill switch reset" if r["cleared"] else "no kill-switch state to reset")
        + (f"; {len(r['retried'])} failed call(s) will re-run" if r["retried"] else "")))


if __name__ == "__main__":  # pragma: no cover - ``python -m pympx_queues.cli``
    main(prog_name=PROG)
