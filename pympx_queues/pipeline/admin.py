"""``pympx-queues status DIR`` and ``retry DIR`` for a pipeline's journal directory.

Read-only status (never cuts, compacts or locks): counts per stage and state, dead
letters with their errors, runs and whether one is live.  ``retry`` re-drives dead
letters: it journals a re-drive record per key (refused while a run is live); the next
run resumes each at the stage it died in, with that stage's journaled input.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Dict, List, Optional

from .journal import fold, is_pipeline_header, pipeline_prefixes, redrive_dead, scan_pipeline

KIND = "pipeline"


def is_pipeline_dir(path: str) -> bool:
    """True when ``path`` holds at least one pipeline journal."""
    return os.path.isdir(path) and bool(pipeline_prefixes(path))


def _one(path: str, name: Optional[str]) -> List[str]:
    names = pipeline_prefixes(path)
    if name is not None:
        if name not in names:
            raise KeyError(f"{path}: no pipeline named {name!r} (found: {names})")
        return [name]
    return names


def status(path: str, name: Optional[str] = None, max_dead: int = 100) -> Dict[str, Any]:
    """The state of every pipeline journaled in ``path`` (or of ``name``)."""
    path = os.path.abspath(path)
    out: Dict[str, Any] = {"kind": KIND, "path": path, "pipelines": [], "problems": []}
    for pname in _one(path, name):
        scans, superseded = scan_pipeline(path, pname, strict=False)
        replay = fold(scans, keep_results=False)
        stages = replay.stages
        live = [s for s in scans if not s.name.is_snapshot and s.writer_alive()]
        per_stage: Dict[str, Dict[str, int]] = {
            s: {"waiting": 0, "dead": 0, "pending_sink": 0, "failed_attempts":
                replay.failed_attempts.get(i, 0)} for i, s in enumerate(stages)}
        dead = []
        for key, saved in replay.unfinished.items():
            sname = stages[saved.stage] if saved.stage < len(stages) else f"#{saved.stage}"
            row = per_stage.setdefault(sname, {"waiting": 0, "dead": 0, "pending_sink": 0,
                                               "failed_attempts": 0})
            if saved.dead is not None:
                row["dead"] += 1
                if len(dead) < max_dead:
                    e = saved.dead
                    dead.append({"key": key, "stage": sname, "type": e.get("type"),
                                 "message": e.get("message"), "attempt": e.get("attempt"),
                                 "traceback": e.get("traceback", "")})
            else:
                row["waiting"] += 1
                if saved.pending:
                    row["pending_sink"] += 1
        n_dead = sum(1 for s in replay.unfinished.values() if s.dead is not None)
        problems = []
        for scan in scans:
            for p in scan.problems:
                problems.append(f"{p.kind} record in {os.path.basename(p.path)} at byte "
                                f"{p.offset}: {p.reason}")
        info = {
            "name": pname, "stages": stages, "live": bool(live),
            "live_pid": live[0].header.get("pid") if live else None,
            "counts": {"done": len(replay.done), "unfinished":
                       len(replay.unfinished) - n_dead, "dead": n_dead},
            "per_stage": per_stage, "dead_letters": dead,
            "states": replay.states,
            "journals": [{"file": os.path.basename(s.path), "snapshot": s.name.is_snapshot,
                          "records": len(s.records), "bytes": s.size,
                          "live": not s.name.is_snapshot and s.writer_alive()}
                         for s in scans],
            "superseded": [os.path.basename(p) for p in superseded],
        }
        if n_dead:
            problems.append(f"{n_dead} dead letter(s) in pipeline {pname!r}: "
                            f"pympx-queues retry {path}")
        out["problems"] += problems
        out["pipelines"].append(info)
    return out


def retry(path: str, *, pattern: Optional[str] = None, dry_run: bool = False,
          name: Optional[str] = None, durability: str = "fsync") -> Dict[str, Any]:
    """Re-drive dead letters (keys matching the glob ``pattern``, default all) at the
    next run.  Returns ``moved`` (keys), ``skipped`` and ``dry_run``."""
    path = os.path.abspath(path)
    moved: List[str] = []
    skipped: List[Dict[str, str]] = []
    for pname in _one(path, name):
        scans, _sup = scan_pipeline(path, pname, strict=False)
        replay = fold(scans, keep_results=False)
        keys = [k for k, s in replay.unfinished.items() if s.dead is not None
                and (pattern is None or fnmatch.fnmatchcase(k, pattern))]
        live = any(not s.name.is_snapshot and s.writer_alive() for s in scans)
        if live:
            skipped += [{"name": k, "reason": "a run of the pipeline is live"} for k in keys]
            continue
        if dry_run or not keys:
            moved += keys
            continue
        moved += redrive_dead(path, pname, keys, durability=durability)
    return {"kind": KIND, "path": path, "moved": moved, "skipped": skipped,
            "dry_run": dry_run}


def render_status(report: Dict[str, Any]) -> str:
    """The text form of :func:`status` for the CLI."""
    lines = [f"{report['path']}: pipeline journal"]
    for p in report["pipelines"]:
        live = f"live (pid {p['live_pid']})" if p["live"] else "no run live"
        c = p["counts"]
        lines.append(f"pipeline {p['name']}: {live}; {c['done']} done, "
                     f"{c['unfinished']} unfinished, {c['dead']} dead")
        if p["per_stage"]:
            lines.append(f"  {'stage':<20} {'waiting':>8} {'dead':>6} {'sink pending':>13} "
                         f"{'failed attempts':>16}")
            for sname, row in p["per_stage"].items():
                lines.append(f"  {sname:<20} {row['waiting']:>8} {row['dead']:>6} "
                             f"{row['pending_sink']:>13} {row['failed_attempts']:>16}")
        for d in p["dead_letters"][:20]:
            lines.append(f"  dead {d['key']!r} at {d['stage']}: {d['type']}: "
                         f"{(d['message'] or '')[:100]}")
        if len(p["dead_letters"]) > 20:
            lines.append("  ... (--json lists them all)")
        if p["states"]:
            lines.append(f"  state: {', '.join(sorted(p['states']))}")
        lines.append(f"  journals: {len(p['journals'])} "
                     f"({sum(j['bytes'] for j in p['journals'])} bytes)")
    for prob in report["problems"]:
        lines.append(f"problem: {prob}")
    return "\n".join(lines)


__all__ = ["is_pipeline_dir", "status", "retry", "render_status", "is_pipeline_header"]
