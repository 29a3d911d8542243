"""What ``chat bench`` prints: the table, the JSON document, the machine, the progress line."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

from chatserver.bench.limits import LOOPBACK, LOOPBACK_POLLING
from chatserver.bench.workloads import Row

# The machine limit each row's throughput is compared with (``--limits``):
#   sends-1      one send needs a round trip and a commit, one after the other:
#                1 / (1/commit rate + 1/loopback round trips per second), with the
#                faster of the two round trips (an echo server that sleeps or that polls)
#   sends-8      8 clients can share a commit: min(8 x the sends-1 limit, batched inserts)
#   live-1, live-8  as sends-1 and sends-8 (the push rides on the same commit)
#   sends-8x32, queue, live-max, live-max-8
#                group commit at best: rows/s of 1,000-row INSERT transactions
#   drain        rows/s of SELECT 1,000 oldest + DELETE them + COMMIT
LIMIT_DESCRIPTIONS = {
    "sends-1": "1/(1/commit + 1/fastest round trip)",
    "sends-8": "min(8 x sends-1 limit, insert x1000)",
    "sends-8x32": "sqlite insert x1000",
    "queue": "sqlite insert x1000",
    "live-max": "sqlite insert x1000",
    "live-max-8": "sqlite insert x1000",
    "live-1": "1/(1/commit + 1/fastest round trip)",
    "live-8": "min(8 x sends-1 limit, insert x1000)",
    "drain": "sqlite fetch+delete x1000",
}


def limit_value(key: str | None, limits: list[dict] | None, sync: str) -> float | None:
    """The throughput ceiling for a row (see LIMIT_DESCRIPTIONS), or None."""
    if not key or not limits:
        return None
    rate = {entry["name"]: entry["rate"] for entry in limits}
    commit = rate.get(f"sqlite commit ({sync})")
    insert = rate.get(f"sqlite insert x1000 ({sync})")
    drain = rate.get(f"sqlite fetch+delete x1000 ({sync})")
    # The chat server polls for a waiting client's next request (--busy-poll-us), so its
    # ceiling is the round trip to an echo server that polls, when that one is faster.
    rtt = max((rate[name] for name in (LOOPBACK, LOOPBACK_POLLING) if rate.get(name)),
              default=None)
    serial = 1 / (1 / commit + 1 / rtt) if commit and rtt else None
    if key in ("sends-1", "live-1"):
        return serial
    if key in ("sends-8", "live-8"):
        return min(8 * serial, insert) if serial and insert else None
    if key in ("sends-8x32", "queue", "live-max", "live-max-8"):
        return insert
    if key == "drain":
        return drain
    return None


def machine_info() -> dict:
    info = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": None,
        "memory_gib": None,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        import sqlite3

        info["sqlite"] = sqlite3.sqlite_version
    except ImportError:  # pragma: no cover
        pass
    return info


def row_dict(row: Row, limits: list[dict] | None, sync: str) -> dict:
    limit = limit_value(row.limit, limits, sync)
    throughput = row.throughput
    return {
        "name": row.name,
        "workload": row.workload,
        "description": row.description,
        "ops": row.ops,
        "seconds": row.seconds,
        "throughput_per_s": round(throughput, 1) if throughput is not None else None,
        "latency": row.latency_kind,
        "latency_ms": row.latency.summary_ms(),
        "server": row.server,
        "client_cpu_pct": row.client_cpu_pct,
        "limit": ({"basis": LIMIT_DESCRIPTIONS.get(row.limit), "per_s": round(limit, 1)}
                  if limit else None),
        "ratio_to_limit": round(throughput / limit, 3) if limit and throughput else None,
        "errors": row.errors,
        "timed_out": row.timed_out,
        "notes": row.notes,
        **row.extra,
    }


def document(bench, options, command: list[str], machine: dict | None = None) -> dict:
    """The whole run as one JSON-able dict (``machine``: taken when the run started)."""
    machine = machine or machine_info()
    machine["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return {
        "command": " ".join(["chat", *command]),
        "machine": machine,
        "options": {
            "target": f"{options.target[0]}:{options.target[1]}" if options.target else None,
            "sync": options.sync, "duration": options.duration, "scale": options.scale,
            "processes": bench.processes, "workloads": list(options.workloads),
            "limits": options.limits, "open_file_limit": bench.fd_limit,
            "repeat": options.repeat,
        },
        "limits": bench.limits,
        "results": [row_dict(row, bench.limits, options.sync) for row in bench.rows],
        "failures": bench.failures,
    }


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ms(value) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


HEADER = ("WORKLOAD", "OPS", "OPS/S", "P50 MS", "P99 MS", "MAX MS", "SRV CPU%", "SRV MIB",
          "RATIO", "OTHER%", "NOTES")


def table(doc: dict) -> str:
    """The results as an aligned text table (plus the limits, when measured)."""
    lines = []
    rows = []
    for r in doc["results"]:
        lat = r["latency_ms"]
        server = r["server"] or {}
        notes = list(r["notes"])
        if r["errors"]:
            notes.append("errors: " + ", ".join(f"{k} x{v}" for k, v in r["errors"].items()))
        rows.append((r["name"], _num(r["ops"]), _num(r["throughput_per_s"]), _ms(lat["p50"]),
                     _ms(lat["p99"]), _ms(lat["max"]), _num(server.get("cpu_pct")),
                     _num(server.get("peak_mib"), 1),
                     _num(r["ratio_to_limit"], 2) if r["ratio_to_limit"] is not None else "-",
                     _num(server.get("other_cpu_pct")), "; ".join(notes)))
    lines.extend(_align([HEADER, *rows]))
    for failure in doc["failures"]:
        first = failure["error"].strip().splitlines()[0] if failure["error"].strip() else ""
        lines.append(f"{failure['workload']}: FAILED: {first}")
    if doc["limits"]:
        lines.append("")
        limit_rows = [("LIMIT", "OPS", "PER S", "P50 MS", "P99 MS", "MAX MS", "OTHER%")]
        for entry in doc["limits"]:
            lat = entry["latency_ms"] or {}
            limit_rows.append((entry["name"], _num(entry["ops"]), _num(entry["rate"]),
                               _ms(lat.get("p50")), _ms(lat.get("p99")), _ms(lat.get("max")),
                               _num(entry.get("other_cpu_pct"))))
        lines.extend(_align(limit_rows))
    m = doc["machine"]
    o = doc["options"]
    lines.append("")
    lines.append("Latency: request to reply (live: send to push; drain: a fetch+ack round trip; "
                 "connections: from the common start). CPU %: 100 = one core. RATIO: throughput "
                 "/ this machine's limit (--limits). OTHER%: CPU used by other processes "
                 "meanwhile.")
    lines.append(f"sync={o['sync']} scale={o['scale']} duration={o['duration']}s "
                 f"load processes={o['processes']}; {m['nproc']} CPUs "
                 f"({m['cpu'] or m['machine']}), {m['memory_gib']} GiB, Python {m['python']}, "
                 f"SQLite {m.get('sqlite')}, {m['date']}")
    return "\n".join(lines)


def _align(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = []
        for i, cell in enumerate(r):
            if i == len(r) - 1 and len(r) == len(HEADER):
                cells.append(str(cell))  # notes: left-aligned, not padded
            elif i == 0:
                cells.append(str(cell).ljust(widths[i]))
            else:
                cells.append(str(cell).rjust(widths[i]))
        out.append("  ".join(cells).rstrip())
    return out


class Status:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._width = 0
        self._started = time.monotonic()

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        line = f"[{now - self._started:5.0f}s] {text}"[:120]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
