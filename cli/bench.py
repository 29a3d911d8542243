"""``chat bench``: measure the server under load, and this machine's own limits."""

from __future__ import annotations

import json
import sys

import click

from chatserver.bench.report import Status, document, machine_info, table
from chatserver.bench.workloads import WORKLOADS, Bench, BenchOptions


def _address(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:2023")
    return host, int(port)


@click.command()
@click.option("--target", metavar="HOST:PORT", default=None,
              callback=lambda _ctx, _param, value: _address(value),
              help="Benchmark a running server instead of starting one per workload. Start it "
                   "with --send-rate 0 --max-queued-per-account 0 --registrations-per-hour 0 "
                   "--max-connections 11000 (and cheap Argon2 for the connections workload).")
@click.option("--server-pid", type=click.IntRange(1), default=None,
              help="With --target: the server's process id, to report its CPU and memory.")
@click.option("--sync", type=click.Choice(["full", "normal"]), default="full", show_default=True,
              help="SQLite synchronous level of the servers the benchmark starts (with --target: "
                   "the one the target uses, for the limit ratios).")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(WORKLOADS),
              help="Run only this workload (repeatable). Default: all, in the order listed.")
@click.option("--duration", type=click.FloatRange(0.1, 600), default=5.0, show_default=True,
              help="Seconds of load per throughput or latency measurement.")
@click.option("--scale", type=click.FloatRange(0.0001, 100), default=1.0, show_default=True,
              help="Multiplies the workload sizes: 1.0 is 100k queued messages, 10k "
                   "connections, 1M accounts searched and sent among (and a cap of 1M "
                   "requests per measurement).")
@click.option("--processes", type=click.IntRange(0, 256), default=0,
              help="Load generator processes per workload. 0 (default): one per CPU.")
@click.option("--limits", "with_limits", is_flag=True,
              help="Also measure this machine's ceilings (SQLite commits, loopback round trip) "
                   "and report each result as a ratio to its ceiling.")
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Run the workloads this many rounds, one after another, and report for "
                   "each row the round with the median throughput (with every round's "
                   "figure in its notes): steadier on a machine whose speed drifts.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of the table.")
def bench(target, server_pid, sync, workloads, duration, scale, processes, with_limits,
          repeat, as_json) -> None:
    """Measure the server: throughput, latency, server CPU and memory per workload.

    Each workload gets its own `chat serve` on a temporary database (per-account send rate
    and queue limits off), load comes from separate processes speaking the wire protocol, and
    the server's CPU and peak memory are read from /proc. A status line is shown on stderr
    when it is a terminal. Workloads: sends-1, sends-8, sends-8x32 (durable sends, clients x
    requests in flight), live (send-to-push latency at 1,000 msgs/s and the maximum push
    rate), drain (queue 100k messages for an offline account, then fetch + ack them all),
    search (prefix and infix patterns over 1M accounts), accounts (the sends-8x32 and
    sends-1 loads against a database of 100 accounts and one of 1M, with the ratio 1M/100:
    the target is within 10%), connections (10k idle logged-in connections, then all send
    at once).

    \b
    Example:
      chat bench                                   # everything, the sizes of the issue
      chat bench --limits --sync normal --json > bench.json
      chat bench --workload sends-1 --workload drain --scale 0.01 --duration 1
      chat bench --workload sends-1 --workload sends-8 --repeat 5   # medians of 5 rounds
    """
    if server_pid and not target:
        raise click.UsageError("--server-pid goes with --target")
    options = BenchOptions(target=target, server_pid=server_pid, sync=sync,
                           workloads=tuple(workloads) or WORKLOADS, duration=duration,
                           scale=scale, processes=processes, limits=with_limits,
                           repeat=repeat)
    machine = machine_info()
    status = Status()
    runner = Bench(options, status=status)
    try:
        runner.run()
    except KeyboardInterrupt:
        status.clear()
        raise click.Abort() from None
    finally:
        status.clear()
    doc = document(runner, options, sys.argv[1:], machine)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(table(doc))
    for failure in runner.failures:
        click.echo(f"Error: {failure['workload']}: {failure['error']}", err=True)
    if runner.failures:
        sys.exit(1)
