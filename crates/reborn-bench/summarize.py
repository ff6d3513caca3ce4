#!/usr/bin/env python3
"""Prints the Markdown tables of BENCHMARKS.md from reborn-bench's JSON reports, or with
--write FILE replaces each table in FILE between its markers
(`<!-- table: NAME -->` ... `<!-- /table -->`), so that the published tables are always
the ones the results give.

Usage: python3 crates/reborn-bench/summarize.py [--write BENCHMARKS.md] [RESULTS_DIR]
"""
import contextlib
import glob
import io
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phases as phases_mod  # noqa: E402

args = sys.argv[1:]
write = None
if args[:1] == ["--write"]:
    write, args = args[1], args[2:]
d = args[0] if args else os.path.join(os.path.dirname(__file__), "results")


def load(name):
    p = os.path.join(d, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None


def ms(x):
    return "-" if x is None else f"{x:.1f}"


def restart_table(prefix):
    print("| path | mode | requests | failed | refused | reset | timeout | other | reconnects | slow ok / old gen | handoff median / p90 / max ms | old gen exit median ms | p99 / p99.9 / max latency ms (all) | same in restart windows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in ["self", "master", "stop-start"]:
        for mode in ["keepalive", "newconn", "h2"]:
            r = load(f"{prefix}-{path}-{mode}")
            if not r:
                continue
            q = r["requests"]
            c = q["counts"]
            rc = q["reconnects"]
            rec = rc["after_connection_close"] + rc["closed_between_requests"] + rc["after_goaway"]
            extra = rc.get("refused_unprocessed_by_goaway", 0)
            recs = f"{rec}" + (f" (+{extra} GOAWAY-refused, re-sent)" if extra else "")
            s = r["slow_requests"]
            h = r["handoff"]
            la, lw = r["latency"]["all"], r["latency"]["restart_windows"]
            print(
                f"| {path} | {mode} | {q['total']:,} | **{q['failed']:,}** | {c['refused']:,} | {c['reset']:,} | {c['timed_out']:,} | {c['other'] + c['bad_status'] + c['wrong_body']:,} | {recs} "
                f"| {s['counts']['ok']}/{s['sent']} ; {s['answered_by_old_generation']} | {ms(h['median_ms'])} / {ms(h['p90_ms'])} / {ms(h['max_ms'])} "
                f"| {ms(r['drain']['median_ms'])} | {ms(la['p99_ms'])} / {ms(la['p999_ms'])} / {ms(la['max_ms'])} | {ms(lw['p99_ms'])} / {ms(lw['p999_ms'])} / {ms(lw['max_ms'])} |"
            )


def procs_table():
    print("| run | process | fds | VmRSS KiB | RssAnon KiB | RssFile KiB | PSS KiB |")
    print("|---|---|---|---|---|---|---|")
    for f in sorted(glob.glob(os.path.join(d, "restart-*.json"))):
        r = json.load(open(f))
        name = os.path.basename(f)[:-5]
        for when, key in [("start", "processes_at_start"), ("end", "processes_at_end")]:
            for p in r[key]:
                print(f"| {name} ({when}) | {p['role']} {p['pid']} | {p['fds']} | {p['rss_kib']} | {p.get('rss_anon_kib')} | {p.get('rss_file_kib')} | {p.get('pss_kib')} |")


def phases_table():
    runs = [("default build", "light-self-newconn", "light-self"), ("static non-PIE", "light-self-newconn-static", "light-self-static")]
    found = []
    for label, report, logs in runs:
        rp, lp = os.path.join(d, report + ".json"), os.path.join(d, "logs", logs, "server.log")
        if os.path.exists(rp) and os.path.exists(lp):
            found.append((label, phases_mod.phases(rp, lp)))
    if not found:
        return
    print("| phase (ms after SIGHUP) | " + " | ".join(f"{label}: median | p90" for label, _ in found) + " |")
    print("|---|" + "---|---|" * len(found))
    for k in phases_mod.ORDER:
        cells = " | ".join(f"{phases_mod.q(p[k], 0.5):.2f} | {phases_mod.q(p[k], 0.9):.2f}" for _, p in found)
        print(f"| {k} | {cells} |")


def steady_table():
    print("| mode | rounds | reborn req/s | plain axum req/s | ratio of means | median per-round ratio | reborn p50 / p99 ms | axum p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in ["keepalive", "newconn", "h2"]:
        r = load(f"steady-{mode}")
        if not r:
            continue
        a, b = r["reborn"], r["plain_axum"]
        print(
            f"| {mode} | {r['rounds']} x {r['round_seconds']:.0f} s | {a['rps']:.0f} | {b['rps']:.0f} | **{r['throughput_ratio']:.3f}** | {r.get('median_round_ratio', 0):.3f} "
            f"| {a['latency']['p50_ms']:.2f} / {a['latency']['p99_ms']:.2f} | {b['latency']['p50_ms']:.2f} / {b['latency']['p99_ms']:.2f} |"
        )


def idle_table():
    print("| path | connections | closed cleanly | handed over | reset | open, unanswered | closed after grace + 1 s | close time after signal: median / max ms | deadline ms | active answered | master RSS KiB (anon) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in sorted(glob.glob(os.path.join(d, "idle-*.json"))):
        r = json.load(open(f))
        m = [p for p in r["processes_after"] if p["role"] == "master"]
        mrss = f"{m[0]['rss_kib']} ({m[0].get('rss_anon_kib')})" if m else "-"
        s = r["close_ms_after_signal"]
        close = "-" if not r["closed_cleanly"] else f"{s['median_ms']:.0f} / {s['max_ms']:.0f}"
        print(
            f"| {r['path']} | {r['opened']} | {r['closed_cleanly']} | {r.get('handed_over', 0)} | {r['reset']} | {r['still_open']} | {r['closed_after_deadline']} "
            f"| {close} | {r['deadline_ms_after_signal']:.0f} | {r['active']['answered']}/{r['active']['sent']} | {mrss} |"
        )


def ms2(x):
    return "-" if x is None else f"{x:.2f}"


def handoff_table():
    print("| run | bench-server | requests | failed | handoff median / p90 / max ms | commit median ms |")
    print("|---|---|---|---|---|---|")
    for name, build in [
        ("light-self-newconn", "default (dynamic, PIE)"),
        ("light-self-keepalive", "default"),
        ("light-self-h2", "default"),
        ("light-self-newconn-static", "static, non-PIE"),
        ("light-master-newconn", "default, under the master"),
        ("light-master-keepalive", "default, under the master"),
        ("light-master-h2", "default, under the master"),
    ]:
        r = load(name)
        if not r:
            continue
        h, c = r["handoff"], r["commit"]
        print(
            f"| {name} | {build} | {r['requests']['total']:,} | **{r['requests']['failed']:,}** "
            f"| **{ms2(h['median_ms'])}** / {ms2(h['p90_ms'])} / {ms2(h['max_ms'])} | {ms2(c['median_ms'])} |"
        )


def master_memory_table():
    r = load("master-memory-1000")
    if not r:
        return
    print("| run | upgrades | failed | master VmRSS KiB: start / end | RssAnon KiB: start / end | RssFile KiB: start / end |")
    print("|---|---|---|---|---|---|")
    a = [p for p in r["processes_at_start"] if p["role"] == "master"][0]
    b = [p for p in r["processes_at_end"] if p["role"] == "master"][0]
    print(
        f"| master-memory-1000 | {r['handoff']['count']} | **{r['requests']['failed']:,}** | {a['rss_kib']:,} / **{b['rss_kib']:,}** "
        f"| {a.get('rss_anon_kib')} / {b.get('rss_anon_kib')} | {a.get('rss_file_kib')} / {b.get('rss_file_kib')} |"
    )


def fleet_table():
    r = load("fleet")
    if not r:
        return
    hosts = "network namespaces" if r.get("namespaces") else "loopback ports"
    print(f"| scenario ({r['instances']} bench-servers, {hosts}, behind HAProxy) | instances rolled | requests | failed | HAProxy marked down | time per instance: median / max ms | total s |")
    print("|---|---|---|---|---|---|---|")
    for x in r["runs"]:
        name = {
            "in-place": f"rolling in-place upgrade (SIGHUP), {x['rounds']} rounds",
            "replace-delay": f"rolling replacement, {x['shutdown_delay_ms']} ms shutdown delay",
            "replace-no-delay": "rolling replacement, no shutdown delay",
        }.get(x["name"], x["name"])
        p = x["per_instance"]
        print(
            f"| {name} | {p['count']} | {x['requests']:,} | **{x['failed']:,}** | {x['marked_down']} "
            f"| {p['median_ms']:.0f} / {p['max_ms']:.0f} | {x['total_ms'] / 1000:.2f} |"
        )
    for e in r.get("errors", []):
        print(f"| {e['name']} | - | - | error: {e['error'].splitlines()[0] if e['error'] else ''} | - | - | - |")


TABLES = [
    ("restart", "Restarts under closed-loop load", lambda: restart_table("restart")),
    ("paced", "Restarts under paced load (20,000 req/s)", lambda: restart_table("paced")),
    ("light", "Restarts under light load (4 clients, 4,000 req/s)", lambda: restart_table("light")),
    ("handoff", "The handoff at light load", handoff_table),
    ("phases", "The handoff's phases at light load", phases_table),
    ("master-memory", "The master's memory over 1,000 upgrades", master_memory_table),
    ("steady", "Steady state", steady_table),
    ("idle", "Idle keep-alive connections", idle_table),
    ("processes", "Processes", procs_table),
    ("fleet", "A fleet behind HAProxy", fleet_table),
]


def render(fn):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue()


if write is None:
    for i, (_, title, fn) in enumerate(TABLES):
        print(("\n" if i else "") + f"### {title}\n")
        print(render(fn), end="")
else:
    text = open(write).read()
    for name, _, fn in TABLES:
        pattern = re.compile(r"(<!-- table: %s -->\n).*?(<!-- /table -->)" % re.escape(name), re.S)
        if not pattern.search(text):
            sys.exit(f"{write}: no <!-- table: {name} --> marker")
        table = render(fn)
        text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)
    open(write, "w").write(text)
    print(f"{write}: {len(TABLES)} tables written from {d}")
