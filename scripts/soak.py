#!/usr/bin/env python3
"""The soak test's sampler and chart (docs/reliability.md, "Soak").

    soak.py sample OUT.csv --interval 10 --stop-file FILE   sample until FILE exists
    soak.py plot OUT.csv CHART.png [--summary SUMMARY.md]   chart + flatness summary

`sample` needs only the standard library: every interval it records, for each of the four
services started by scripts/bench-stack, its resident memory (VmRSS), its open file descriptors
and how many of them are sockets; the pipeline backlog from ingestion's /metrics; the Postgres
connections of the benchmark database; Redis's connected clients; and, to tell what a stall
coincides with, Postgres's cumulative checkpoints (timed and requested) and the autovacuum and
autoanalyze runs on the benchmark database's tables. `plot` needs matplotlib and marks each
checkpoint and autovacuum run on the backlog chart.
"""

import argparse
import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request

SERVICES = {"ingestion": 51051, "identity": 51052, "profile": 51053, "scoring": 51054}
INGESTION_METRICS = "http://127.0.0.1:51151/metrics"


def pid_of(name, port):
    pattern = f"tessera {name} --grpc-addr 127.0.0.1:{port}"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return pids[0] if pids else None


def process_sample(pid):
    rss_kb = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    fds = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    return rss_kb, fds, sockets


def backlog():
    try:
        with urllib.request.urlopen(INGESTION_METRICS, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("tessera_ingestion_backlog_events"):
                    return float(line.split()[-1])
    except OSError:
        return None
    return None


def pg_connections(url):
    out = subprocess.run(
        ["psql", url, "-qtAc", "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return int(out) if out.isdigit() else None


def pg_counts(url):
    """Cumulative (checkpoints, autovacuum + autoanalyze runs), or (None, None)."""
    out = subprocess.run(
        [
            "psql",
            url,
            "-qtAc",
            "SELECT (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter), "
            "(SELECT COALESCE(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_user_tables)",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    parts = out.split("|")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None, None


def redis_clients(url):
    hostport = url.split("://", 1)[-1].split("/", 1)[0].split("@")[-1]
    host, _, port = hostport.partition(":")
    try:
        with socket.create_connection((host, int(port or 6379)), timeout=5) as s:
            s.sendall(b"INFO clients\r\n")
            data = b""
            while b"connected_clients" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        for line in data.decode().splitlines():
            if line.startswith("connected_clients:"):
                return int(line.split(":")[1])
    except OSError:
        return None
    return None


def sample(args):
    fields = ["t"]
    for name in SERVICES:
        fields += [f"{name}_rss_mb", f"{name}_fds", f"{name}_sockets"]
    fields += ["backlog", "pg_connections", "redis_clients", "pg_checkpoints", "pg_autovacuums"]
    start = time.time()
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        while not os.path.exists(args.stop_file):
            row = [round(time.time() - start, 1)]
            for name, port in SERVICES.items():
                pid = pid_of(name, port)
                if pid is None:
                    row += ["", "", ""]
                    continue
                try:
                    rss_kb, fds, sockets = process_sample(pid)
                    row += [round(rss_kb / 1024, 1), fds, sockets]
                except OSError:
                    row += ["", "", ""]
            row += [backlog(), pg_connections(args.database_url), redis_clients(args.redis_url)]
            row += list(pg_counts(args.database_url))
            w.writerow(row)
            f.flush()
            time.sleep(args.interval)


def load_rows(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows


def series(rows, key):
    xs, ys = [], []
    for r in rows:
        if r.get(key) not in ("", None, "None"):
            xs.append(float(r["t"]) / 60)
            ys.append(float(r[key]))
    return xs, ys


def window_mean(rows, key, lo, hi):
    _, ys = series([r for r in rows if lo <= float(r["t"]) / 60 < hi], key)
    return sum(ys) / len(ys) if ys else float("nan")


def plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(args.csv)
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    for name in SERVICES:
        axes[0].plot(*series(rows, f"{name}_rss_mb"), label=name)
        axes[1].plot(*series(rows, f"{name}_sockets"), label=f"{name} sockets")
    axes[1].plot(*series(rows, "pg_connections"), "--", label="Postgres connections")
    axes[1].plot(*series(rows, "redis_clients"), ":", label="Redis clients")
    axes[2].plot(*series(rows, "backlog"), color="tab:red", label="pipeline backlog")
    # What a stall may coincide with: the samples at which Postgres checkpointed or autovacuumed.
    for key, color, label in [
        ("pg_checkpoints", "tab:blue", "Postgres checkpoint"),
        ("pg_autovacuums", "tab:green", "autovacuum / autoanalyze"),
    ]:
        xs, ys = series(rows, key)
        marks = [x for x, y, prev in zip(xs[1:], ys[1:], ys) if y > prev]
        for i, x in enumerate(marks):
            axes[2].axvline(x, color=color, alpha=0.4, linewidth=0.8, label=label if i == 0 else None)
    axes[0].set_ylabel("resident memory (MB)")
    axes[1].set_ylabel("open connections")
    axes[2].set_ylabel("events waiting")
    axes[2].set_xlabel("minutes")
    if args.load_minutes:
        for ax in axes:
            ax.axvline(args.load_minutes, color="grey", linewidth=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.png, dpi=90)

    if args.summary:
        end = args.load_minutes or max(float(r["t"]) for r in rows) / 60
        lines = [
            "| measure | minutes 5-10 | last 5 minutes of the load | change |",
            "| --- | --- | --- | --- |",
        ]
        keys = [f"{n}_rss_mb" for n in SERVICES] + [f"{n}_sockets" for n in SERVICES]
        keys += ["pg_connections", "redis_clients", "backlog"]
        for key in keys:
            a = window_mean(rows, key, 5, 10)
            b = window_mean(rows, key, end - 5, end)
            change = f"{(b - a) / a * 100:+.1f} %" if a else "—"
            lines.append(f"| {key} | {a:.1f} | {b:.1f} | {change} |")
        with open(args.summary, "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("out")
    s.add_argument("--interval", type=float, default=10)
    s.add_argument("--stop-file", required=True)
    s.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    s.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    q = sub.add_parser("plot")
    q.add_argument("csv")
    q.add_argument("png")
    q.add_argument("--summary")
    q.add_argument("--load-minutes", type=float)
    q.add_argument("--title", default="Tessera soak")
    args = p.parse_args()
    if args.cmd == "sample":
        sample(args)
    else:
        plot(args)


if __name__ == "__main__":
    sys.exit(main())
