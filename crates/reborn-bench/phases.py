#!/usr/bin/env python3
"""Splits each self-upgrade's handoff into phases, from a reborn-bench JSON report and the
log of the servers it started (run reborn-bench with --work-dir DIR: the log is
DIR/server.log). Times are ms after the bench sent SIGHUP; the table gives, for each
phase, the median and 90th percentile over the restarts.

  signal received   the old process's signal handler task ran (reborn's log)
  new process exec  spawn() returned in the old process: the child has exec'd
  new main          bench-server's main() started (its log line)
  runtime built     bench-server has its listener and tokio runtime
  ready             the new process reported ready (PID file written, old one told)
  old drains        the old process stopped accepting
  first answer      the bench got the first response from the new PID (the handoff)

Usage: python3 crates/reborn-bench/phases.py REPORT.json DIR/server.log
"""
import datetime
import json
import re
import sys

ORDER = ["signal received", "new process exec", "new main", "runtime built", "ready", "old drains", "first answer"]


def stamp(line):
    m = re.match(r"(\d{4}-\d\d-\d\dT[\d:.]+)Z", line)
    if not m:
        return None
    return datetime.datetime.fromisoformat(m.group(1) + "+00:00").timestamp() * 1e6


def phases(report_path, log_path):
    """Returns {phase: [ms after SIGHUP, one per restart]}."""
    report = json.load(open(report_path))
    lines = open(log_path).read().splitlines()
    events = []
    for line in lines:
        m = re.search(r"bench-server\[(\d+)\]: started at (\d+) µs.*runtime (\d+) µs", line)
        if m:
            events.append((int(m.group(2)), "new main"))
            events.append((int(m.group(2)) + int(m.group(3)), "runtime built"))
            continue
        t = stamp(line)
        if t is None:
            continue
        for key, name in [
            ("signal received", "signal received"),
            ("new process started", "new process exec"),
            ("ready: serving", "ready"),
            ("handed over to pid", "old drains"),
        ]:
            if key in line:
                events.append((t, name))
    events.sort()
    out = {k: [] for k in ORDER}
    for r in report["restarts"]:
        if r.get("handoff_ms") is None:
            continue
        t0 = r["at_unix_us"]
        end = t0 + r["handoff_ms"] * 1000 + 200_000
        seen = {}
        for t, name in events:
            if t0 - 200 <= t <= end and name not in seen:
                seen[name] = (t - t0) / 1000
        seen["first answer"] = r["handoff_ms"]
        for k, v in seen.items():
            out[k].append(v)
    return out


def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round((len(v) - 1) * p)))] if v else float("nan")


if __name__ == "__main__":
    found = phases(sys.argv[1], sys.argv[2])
    print("| phase (ms after SIGHUP) | median | p90 | max | n |")
    print("|---|---|---|---|---|")
    for k in ORDER:
        v = found[k]
        print(f"| {k} | {q(v, 0.5):.2f} | {q(v, 0.9):.2f} | {max(v) if v else float('nan'):.2f} | {len(v)} |")
