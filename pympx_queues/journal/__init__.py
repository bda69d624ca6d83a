"""Pickup journals of :class:`~pympx_queues.persistent.PersistentQueue`: format, writer, reader.

On-disk layout (DESIGN.md section 3).  A pickup dir holds, per queue prefix, one
append-only journal per writer process and run::

    {prefix}.{run}.{pid}.{rand}.journal      a writer (producer and/or consumer process)
    {prefix}.{run}.snap.{rand}.journal       a compacted snapshot of earlier runs
    {prefix}.lock                            filelock: serialises recovery and compaction
    {prefix}.{...}.journal.torn-{offset}     bytes cut from a torn tail (kept, never lost)
    {prefix}.{...}.journal.quarantined       a corrupt journal after ``repair`` (kept)

``run`` is ``YYYYmmddTHHMMSSffffff-xxxxxx`` (sortable by start time), ``pid`` the writer's
process id and ``rand`` a random hex id: a reused pid never reopens an old journal, and a
journal is only ever created with ``O_EXCL`` (never ``'w'``).

Each record is one UTF-8 line::

    {crc32:08x} {seq} {kind} {json}\\n

``crc32`` covers ``{seq} {kind} {json}``; ``seq`` counts from 0 (the header) in each file
without gaps.  Kinds: ``H`` header, ``P`` put (work requested), ``D`` done (completed),
``X`` cancel (a put that never reached the queue), ``K`` key completed (snapshots only),
``C`` closed (DONE put), ``F`` failed (FAILED put).

A writer in ``flush`` mode maps its journal into memory and copies records into it (no
system call per record, see :class:`JournalWriter`); the space it has reserved but not
written yet reads as NUL bytes.  A run of NUL bytes up to the end of the file is that
reserved tail: readers stop there, it is neither a torn record nor corruption, and it is
cut when the writer closes the journal or, after a crash, at recovery.  Records never
contain a NUL byte (JSON escapes it).  Header ``v`` 2 marks journals that may carry such
a tail; version 1 journals never do and read the same way.

Recovery reads records until the first bad one.  A bad record with no good record after
it is a torn tail: it is ignored, and cut off (saved to a side file first) once its writer
is gone.  A bad record followed by good ones is corruption: reading fails closed with
:class:`~pympx_queues.errors.JournalCorruptError` naming the file and byte offset.

Payloads are JSON, never pickle.  Messages are encoded with :func:`encode_value` (tuples,
bytes, sets and dicts with any keys survive the round trip) unless the queue has
``formatter_list``/``converter_list`` hooks.

Modules: :mod:`.names` (file names), :mod:`.format` (record layout, value codec),
:mod:`.writer` (:class:`JournalWriter`), :mod:`.scan` (reading one journal),
:mod:`.history` (the replay across runs), :mod:`.compact` (recovery and compaction).
Every name is re-exported here: ``from pympx_queues import journal as jr``.
"""

from __future__ import annotations

from .compact import compact, directory_lock, lock_path, write_snapshot
from .format import (
    FORMAT_VERSION,
    KIND_CANCEL,
    KIND_CLOSE,
    KIND_DONE,
    KIND_FAIL,
    KIND_HEADER,
    KIND_KEY,
    KIND_PUT,
    KINDS,
    PIPELINE_KINDS,
    QUEUE_KINDS,
    RECORD_BODY_FORMAT,
    RECORD_FORMAT,
    TAG_BYTES,
    TAG_DICT,
    TAG_FORMATTED,
    TAG_FROZENSET,
    TAG_SET,
    TAG_TUPLE,
    TAGS,
    RecordError,
    decode_value,
    dumps,
    dumps_value,
    encode_value,
    format_record,
    parse_record,
)
from .history import History, Requested, RunState, scan_dirs
from .names import (
    CORRUPT_SUFFIX_FORMAT,
    JOURNAL_NAME_FORMAT,
    JOURNAL_SUFFIX,
    LOCK_NAME_FORMAT,
    QUARANTINE_SUFFIX,
    SNAPSHOT_PID,
    TEMP_NAME_FORMAT,
    TORN_SUFFIX_FORMAT,
    JournalName,
    check_prefix,
    format_journal_name,
    list_journals,
    new_run_id,
    parse_journal_name,
)
from .scan import JournalScan, Problem, cut_torn_tail, scan_journal, valid_line, writer_alive
from .writer import JournalBroken, JournalWriter

__all__ = [
    # names
    "JOURNAL_SUFFIX", "JOURNAL_NAME_FORMAT", "SNAPSHOT_PID", "LOCK_NAME_FORMAT",
    "TEMP_NAME_FORMAT", "TORN_SUFFIX_FORMAT", "QUARANTINE_SUFFIX", "CORRUPT_SUFFIX_FORMAT",
    "new_run_id", "JournalName", "format_journal_name", "parse_journal_name",
    "check_prefix", "list_journals",
    # records and values
    "KIND_HEADER", "KIND_PUT", "KIND_DONE", "KIND_CANCEL", "KIND_KEY", "KIND_CLOSE",
    "KIND_FAIL", "QUEUE_KINDS", "PIPELINE_KINDS", "KINDS", "FORMAT_VERSION",
    "RECORD_FORMAT", "RECORD_BODY_FORMAT", "RecordError", "format_record", "parse_record",
    "TAG_TUPLE", "TAG_BYTES", "TAG_SET", "TAG_FROZENSET", "TAG_DICT", "TAG_FORMATTED",
    "TAGS", "encode_value", "decode_value", "dumps_value", "dumps",
    # writer, reader, history, compaction
    "JournalBroken", "JournalWriter", "Problem", "JournalScan", "writer_alive", "valid_line",
    "scan_journal", "cut_torn_tail", "Requested", "RunState", "History", "scan_dirs",
    "lock_path", "directory_lock", "write_snapshot", "compact",
]
