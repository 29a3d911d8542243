"""The workloads of ``chat bench`` and the orchestration around them.

For each workload the benchmark starts its own ``chat serve`` on a fresh temporary database
(or uses ``--target``), creates the accounts it needs, starts load generator processes
(``loadgen.py``), waits until every connection is logged in, starts them all at one instant,
and collects counts and latency histograms. Server CPU time and peak memory are read from
/proc over the measured interval only (VmHWM is reset just before it).

Workload sizes scale with ``scale`` (1.0 = the sizes of the issue: 100k queued messages, 10k
connections, 1M accounts); throughput workloads run for ``duration`` seconds and are also
capped in count; every phase has a hard time limit.

The workloads that need many accounts (search, accounts) insert them straight into the
database file before its server starts (``populate_accounts``): registering 1M accounts
through the protocol would take hours.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from chatserver.bench.histogram import Histogram
from chatserver.bench.loadgen import raise_nofile_limit, run_worker
from chatserver.bench.target import BenchServer, ProcessProbe, machine_busy_seconds

# Run in this order; connections comes last because 10k server threads leave the machine
# busy for a while after they are gone.
WORKLOADS = ("sends-1", "sends-8", "sends-8x32", "live", "drain", "search", "accounts",
             "connections")
PASSWORD = "bench-password-1"
# Cheap Argon2 for the workloads with many accounts (connections, search, accounts):
# 10k logins at the default cost (64 MiB, t=3: ~0.2 s of CPU each) would take most of an
# hour on 2 cores. No workload measures password hashing.
CHEAP_HASH_ARGS = ["--argon2-time-cost", "1", "--argon2-memory-kib", "64"]
LIVE_RATE = 1000  # messages per second offered in the send-to-push latency workload
QUEUED_MESSAGES = 100_000  # store-and-forward, at scale 1
CONNECTIONS = 10_000  # idle logged-in connections, at scale 1
ACCOUNTS = 1_000_000  # accounts searched, and in the big database of "accounts", at scale 1
FEW_ACCOUNTS = 100  # the small database of "accounts" (not scaled)
ACCOUNTS_TARGET = 0.9  # the issue: a send with 1M accounts within 10% of one with 100
# The load shapes of the accounts workload: (row suffix, clients, window, same as).
ACCOUNT_SHAPES = (("8x32", 8, 32, "sends-8x32"), ("1", 1, 1, "sends-1"))
MAX_OPS = 1_000_000  # count cap of a time-bounded phase, at scale 1
BURST_TIMEOUT_S = 60.0
BURST_TARGET_S = 2.0  # the target: every connection's send answered within 2 s  # connections: how long the replies to the burst are waited for
START_DELAY_NS = 150_000_000  # "go" is sent this long before the common start instant


class BenchError(Exception):
    """The benchmark could not run (the message says why)."""


@dataclass
class BenchOptions:
    target: tuple[str, int] | None = None
    server_pid: int | None = None
    sync: str = "full"
    workloads: tuple[str, ...] = WORKLOADS
    duration: float = 5.0
    scale: float = 1.0
    processes: int = 0  # load generator processes per workload (0: the number of CPUs)
    limits: bool = False
    repeat: int = 1  # rounds over the workloads; each row reports its median round

    def scaled(self, n: int, minimum: int = 1) -> int:
        return max(minimum, round(n * self.scale))

    @property
    def phase_timeout(self) -> float:
        """The hard time limit of one phase (set-up and load), in seconds."""
        return max(60.0, 60.0 * self.duration)


@dataclass
class Row:
    """One line of the table: a measured phase."""

    name: str
    workload: str
    description: str
    ops: int = 0
    seconds: float = 0.0
    latency: Histogram = field(default_factory=Histogram)
    latency_kind: str = "request"  # what the latency columns measure
    server: dict = field(default_factory=dict)
    client_cpu_pct: float | None = None
    limit: str | None = None  # which machine limit the ratio compares with
    errors: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    timed_out: bool = False

    @property
    def throughput(self) -> float | None:
        return self.ops / self.seconds if self.seconds > 0 else None


@dataclass
class Endpoint:
    host: str
    port: int
    probe: ProcessProbe | None
    own: bool  # a server this benchmark started (fresh database)


# ---------------------------------------------------------------------------------------
# Measuring the server over an interval


class Meter:
    """Server CPU % (100 = one core) and peak RSS between ``start()`` and ``stop()``.

    It also takes the whole machine's busy CPU time over the interval, so that the phase can
    tell how much CPU went to processes other than the server, the load generators and the
    benchmark itself (``other_cpu_pct``): on a shared machine, that is what skews the figures.
    """

    def __init__(self, probe: ProcessProbe | None):
        self.probe = probe
        self.peak_reset = False
        self._cpu0: tuple[float, float] | None = None
        self._t0 = 0.0
        self._busy0: float | None = None
        self._self0 = 0.0
        self.machine_busy: float | None = None  # CPU seconds, over the interval
        self.own_cpu = 0.0  # this process's CPU seconds over the interval
        self.wall = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = machine_busy_seconds()
        self._self0 = _own_cpu()
        if self.probe is not None:
            self.peak_reset = self.probe.reset_peak()
            self._cpu0 = self.probe.cpu_times()

    def stop(self) -> dict:
        wall = self.wall = time.monotonic() - self._t0
        busy = machine_busy_seconds()
        if busy is not None and self._busy0 is not None:
            self.machine_busy = busy - self._busy0
        self.own_cpu = _own_cpu() - self._self0
        load = round(os.getloadavg()[0], 2)
        if self.probe is None:
            return {"cpu_pct": None, "peak_mib": None, "rss_mib": None, "threads": None,
                    "loadavg_1m": load}
        cpu1 = self.probe.cpu_times()
        cpu = sys_cpu = None
        if cpu1 is not None and self._cpu0 is not None:
            cpu = sum(cpu1) - sum(self._cpu0)
            sys_cpu = cpu1[1] - self._cpu0[1]
        peak = self.probe.peak_rss_bytes()
        rss = self.probe.rss_bytes()
        return {
            "cpu_pct": round(100.0 * cpu / wall, 1) if cpu is not None and wall > 0 else None,
            "cpu_seconds": round(cpu, 3) if cpu is not None else None,
            "cpu_system_pct": (round(100.0 * sys_cpu / wall, 1)
                               if sys_cpu is not None and wall > 0 else None),
            "peak_mib": round(peak / 2**20, 1) if peak is not None else None,
            "peak_since": "phase start" if self.peak_reset else "server start",
            "rss_mib": round(rss / 2**20, 1) if rss is not None else None,
            "threads": self.probe.threads(),
            "loadavg_1m": load,
        }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------
# Load generator processes


class Pool:
    """Load generator processes (spawned), one spec each, and their control pipes."""

    def __init__(self, specs: list[dict]):
        ctx = multiprocessing.get_context("spawn")
        self.procs = []
        self.pipes = []
        self.progress = []
        for spec in specs:
            parent, child = ctx.Pipe()
            progress = ctx.RawValue("q", 0)
            proc = ctx.Process(target=run_worker, args=(spec, child, progress), daemon=True,
                               name="chat-bench-load")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)
            self.progress.append(progress)

    def total_progress(self, which: list[int] | None = None) -> int:
        idx = range(len(self.procs)) if which is None else which
        return sum(self.progress[i].value for i in idx)

    def send(self, msg, which: list[int] | None = None) -> None:
        for i in range(len(self.pipes)) if which is None else which:
            try:
                self.pipes[i].send(msg)
            except OSError:
                pass

    def wait(self, kind: str, which: list[int], timeout: float,
             tick: Callable[[], None] | None = None) -> dict[int, dict]:
        """Wait for message ``kind`` from each process in ``which``; {index: payload}."""
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(which):
            left = [self.pipes[i] for i in which if i not in got]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"load generators did not report '{kind}' within "
                                 f"{timeout:.0f} s")
            for pipe in multiprocessing.connection.wait(left, timeout=min(0.2, remaining)):
                i = self.pipes.index(pipe)
                try:
                    msg = pipe.recv()
                except EOFError:
                    raise BenchError("a load generator process died "
                                     f"(exit code {self.procs[i].exitcode})") from None
                if msg[0] == "error":
                    raise BenchError(f"a load generator failed:\n{msg[1]}")
                if msg[0] == kind:
                    got[i] = msg[1]
            if tick is not None:
                tick()
        return got

    def close(self) -> None:
        self.send(("stop",))
        for proc in self.procs:
            proc.join(10)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


@dataclass
class PhaseResult:
    ready: dict[int, dict]
    results: dict[int, dict]
    start_ns: int
    end_ns: int
    server: dict
    load_indexes: list[int]
    receiver_indexes: list[int]
    load_timeout: float

    def merged(self, key: str, which: list[int] | None = None) -> Histogram:
        h = Histogram()
        for i in self.results if which is None else which:
            h.merge(Histogram.from_dict(self.results[i][key]))
        return h

    def total(self, key: str, which: list[int] | None = None) -> int:
        return sum(self.results[i][key] for i in (self.results if which is None else which))

    def latest(self, key: str, which: list[int] | None = None) -> int:
        return max((self.results[i][key] for i in (self.results if which is None else which)),
                   default=0)

    def sum_dicts(self, key: str, source: str = "results") -> dict:
        out: dict[str, int] = {}
        for payload in getattr(self, source).values():
            for k, v in payload.get(key, {}).items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def client_cpu_s(self) -> float:
        return sum(r["cpu_s"] for r in self.results.values())

    @property
    def timed_out(self) -> bool:
        return any(r["timed_out"] for r in self.results.values())


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """One row per name (in first-seen order): the round with the median throughput (the
    lower middle of an even count), noted with every round's figure. On a machine whose
    speed drifts, alternating whole rounds and taking each row's median is steadier than one
    run; rows without a throughput keep their first round. A row compared with another
    (the accounts workload's 1M/100 ratios) is compared again with that row's median, so
    its ratios and verdict match the figures printed beside them."""
    by_name: dict[str, list[Row]] = {}
    for rows in rounds:
        for row in rows:
            by_name.setdefault(row.name, []).append(row)
    out = []
    for runs in by_name.values():
        measured = sorted((r for r in runs if r.throughput is not None),
                          key=lambda r: r.throughput)
        if not measured:
            out.append(runs[0])
            continue
        chosen = measured[(len(measured) - 1) // 2]
        figures = [round(r.throughput, 1) for r in runs if r.throughput is not None]
        chosen.extra["rounds_per_s"] = figures
        chosen.notes.insert(0, f"median of {len(figures)} rounds "
                               f"({min(figures):,.0f}-{max(figures):,.0f}/s)")
        out.append(chosen)
    by_chosen = {row.name: row for row in out}
    for row in out:
        few = by_chosen.get(row.extra.get("compared_with"))
        if few is not None:
            _compare(few, row)
    return out


def split(items: list, parts: int) -> list[list]:
    """``items`` dealt round-robin into at most ``parts`` non-empty lists."""
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


# ---------------------------------------------------------------------------------------
# Account names and search patterns

_SYLLABLES = (
    "ba", "be", "bi", "bo", "bu", "da", "de", "di", "do", "du", "ka", "ke", "ki", "ko", "ku",
    "la", "le", "li", "lo", "lu", "ma", "me", "mi", "mo", "mu", "na", "ne", "ni", "no", "nu",
    "ra", "re", "ri", "ro", "ru", "sa", "se", "si", "so", "su", "ta", "te", "ti", "to", "tu",
    "va", "ve", "vi", "vo", "za", "ze", "zi", "zo", "an", "el", "in", "on", "ar", "er", "or",
    "ax", "ix", "yo",
)


def account_names(n: int, seed: int = 2024) -> list[str]:
    """``n`` distinct, name-like account names, the same ones for the same seed."""
    rng = random.Random(seed)
    names = []
    for i in range(n):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.3:
            word = word.capitalize()
        names.append(f"{word}_{i}")
    return names


def search_patterns(names: list[str], kind: str, n: int = 200, seed: int = 7) -> list[str]:
    """Prefix patterns (``kar*``) or infix ones (``*imo*``) taken from existing names."""
    rng = random.Random(seed)
    patterns = []
    for _ in range(n):
        word = rng.choice(names).split("_")[0].lower()
        if kind == "prefix":
            patterns.append(word[:rng.randint(2, 4)] + "*")
        else:
            start = rng.randint(1, max(1, len(word) - 3))
            patterns.append("*" + word[start:start + 3] + "*")
    return patterns


def spread_names(names: list[str], n: int) -> list[str]:
    """``n`` of ``names`` spread evenly over the order of their keys, from the last one down.

    The accounts a workload uses are picked this way, not as the first rows inserted, so that
    looking them up walks the whole unique index on ``name_key`` (and their ids, the numbers
    in the names, land all over the table).
    """
    if n > len(names):
        raise ValueError(f"{n} names wanted from {len(names)}")
    ordered = sorted(names, key=str.casefold)
    step = len(ordered) / n
    return [ordered[len(ordered) - 1 - int(i * step)] for i in range(n)]


def count_label(n: int) -> str:
    """1000000 -> '1M', 5000 -> '5k', 100 -> '100' (for row names)."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def populate_accounts(db_path: str, names: list[str], status=None) -> None:
    """Insert accounts straight into a (new) chat database, with one precomputed hash."""
    from sqlalchemy import insert

    from chatserver.passwords import HashParameters, PasswordHasher
    from chatserver.storage.database import Database, create_private_file
    from chatserver.storage.migrate import ensure_schema
    from chatserver.storage.tables import accounts

    create_private_file(db_path)
    db = Database(db_path, sync="normal")
    try:
        ensure_schema(db)
        db.enable_wal()
        password_hash = PasswordHasher(HashParameters(time_cost=1, memory_kib=64)).hash(PASSWORD)
        now = time.time_ns() // 1_000_000
        chunk = 50_000
        for start in range(0, len(names), chunk):
            rows = [{"name": name, "name_key": name.casefold(), "password_hash": password_hash,
                     "created_at": now, "last_login_at": None}
                    for name in names[start:start + chunk]]
            with db.write_engine.begin() as conn:
                conn.execute(insert(accounts), rows)
            if status:
                status(f"inserting accounts {min(start + chunk, len(names)):,}/{len(names):,}")
    finally:
        db.dispose()


# ---------------------------------------------------------------------------------------
# The benchmark


class Bench:
    """Runs the selected workloads; ``run()`` returns the rows and the limits."""

    def __init__(self, options: BenchOptions, status: Callable[[str], None] | None = None):
        self.o = options
        self.status = status or (lambda text: None)
        self.processes = options.processes or os.cpu_count() or 1
        self.tag = "b" + "".join(random.choice(string.ascii_lowercase + string.digits)
                                 for _ in range(5))
        self._names = 0
        self.rows: list[Row] = []
        self.failures: list[dict] = []
        self.limits: list[dict] | None = None
        self.fd_limit = raise_nofile_limit()
        self._current = ""
        self._round = ""  # "round 2/5: " with --repeat

    # -- helpers ----------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        where = self._round + self._current
        self.status(f"{where}: {text}" if where else text)

    def name(self, kind: str) -> str:
        self._names += 1
        return f"{self.tag}{kind}{self._names}"

    @contextmanager
    def endpoint(self, *, cheap_hash: bool = False, max_connections: int = 1000,
                 prepare: Callable[[str], None] | None = None) -> Iterator[Endpoint]:
        """The server for one workload: a fresh ``chat serve`` or the target."""
        if self.o.target is not None:
            probe = ProcessProbe(self.o.server_pid) if self.o.server_pid else None
            yield Endpoint(self.o.target[0], self.o.target[1], probe, own=False)
            return
        with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
            db_path = os.path.join(tmp, "chat.db")
            if prepare is not None:
                prepare(db_path)
            extra = ["--send-rate", "0", "--max-queued-per-account", "0",
                     "--registrations-per-hour", "0", "--max-connections", str(max_connections),
                     "--log-level", "warning"]
            if cheap_hash:
                extra += CHEAP_HASH_ARGS
            server = BenchServer(db_path, sync=self.o.sync, extra_args=extra)
            self._say("starting the server")
            server.start()
            try:
                yield Endpoint(server.host, server.port, server.probe, own=True)
                if not server.alive():
                    raise BenchError("the server exited during the workload:\n"
                                     + server.log_tail())
            finally:
                self._say("stopping the server")
                server.stop()

    def accounts_prepare(self, names: list[str]) -> Callable[[str], None] | None:
        """The ``prepare`` of ``endpoint()`` that inserts ``names`` as accounts, all with the
        password PASSWORD (None with --target: a running server keeps its own accounts).

        Its server should use ``cheap_hash``: the hash inserted is made with those cheap
        parameters, so that logins neither cost 0.2 s each nor rehash.
        """
        if self.o.target is not None:
            return None

        def prepare(db_path: str) -> None:
            populate_accounts(db_path, names, status=self._say)

        return prepare

    def register(self, ep: Endpoint, names: list[str]) -> None:
        """Create accounts that stay offline (message sinks), through the protocol."""
        from chatserver.client import ChatClient, ServerError

        for name in names:
            self._say(f"registering {name}")
            with ChatClient(ep.host, ep.port, timeout=120) as client:
                try:
                    client.register(name, PASSWORD)
                except ServerError as exc:
                    raise BenchError(f"cannot register {name}: {exc}") from None

    def phase(self, ep: Endpoint, groups: list[list[dict]], *, duration: float,
              receivers: int = 0, on_ready: Callable[[dict[int, dict]], None] | None = None,
              label: str = "", load_timeout: float | None = None) -> PhaseResult:
        """Run one measured phase.

        ``groups``: the connections of each load generator process; the first ``receivers``
        processes hold push receivers, which finish once the senders are done and the pushes
        they reported have arrived. ``load_timeout``: the hard limit of the load itself
        (default: the phase time limit).
        """
        load_timeout = load_timeout or self.o.phase_timeout
        specs = [{"host": ep.host, "port": ep.port, "conns": conns,
                  "hard_timeout": load_timeout,
                  "setup_timeout": self.o.phase_timeout,
                  "setup_concurrency": 128} for conns in groups]
        total_conns = sum(len(g) for g in groups)
        pool = Pool(specs)
        try:
            everyone = list(range(len(specs)))
            receiver_idx = everyone[:receivers]
            load_idx = everyone[receivers:]
            ready = pool.wait("ready", everyone, self.o.phase_timeout, tick=lambda: self._say(
                f"{label}connecting {pool.total_progress():,}/{total_conns:,}"))
            failures: dict[str, int] = {}
            for info in ready.values():
                for k, v in info["failures"].items():
                    failures[k] = failures.get(k, 0) + v
            if failures and not on_ready:
                raise BenchError(f"connections failed during set-up: {failures}")
            if on_ready is not None:
                on_ready(ready)
            meter = Meter(ep.probe)
            meter.start()
            start_ns = time.monotonic_ns() + START_DELAY_NS
            end_ns = start_ns + int(duration * 1e9)
            pool.send(("go", start_ns, end_ns))
            t0 = time.monotonic()

            def tick() -> None:
                elapsed = time.monotonic() - t0 - START_DELAY_NS / 1e9
                self._say(f"{label}{max(0.0, elapsed):.1f} s, "
                          f"{pool.total_progress(load_idx or receiver_idx):,} done")

            results = pool.wait("done", load_idx, load_timeout + 30, tick=tick)
            if receiver_idx:
                expected = sum(results[i]["pushed"] for i in load_idx)
                pool.send(("finish", expected), receiver_idx)
                results.update(pool.wait("done", receiver_idx, 60, tick=tick))
            server = meter.stop()
            clients = sum(r["cpu_s"] for r in results.values())
            if meter.machine_busy is not None and server.get("cpu_seconds") is not None:
                other = meter.machine_busy - server["cpu_seconds"] - clients - meter.own_cpu
                server["other_cpu_pct"] = round(max(0.0, 100.0 * other / meter.wall), 1)
            else:
                server["other_cpu_pct"] = None
            return PhaseResult(ready, results, start_ns, end_ns, server, load_idx, receiver_idx,
                               load_timeout)
        finally:
            pool.close()

    def _row(self, name: str, workload: str, description: str, result: PhaseResult, *,
             ops: int, last_ns: int, latency: Histogram, latency_kind: str = "request",
             limit: str | None = None) -> Row:
        seconds = max(0.0, (last_ns - result.start_ns) / 1e9) if ops else 0.0
        wall = max(seconds, 1e-9)
        row = Row(name=name, workload=workload, description=description, ops=ops,
                  seconds=round(seconds, 4), latency=latency, latency_kind=latency_kind,
                  server=result.server,
                  client_cpu_pct=round(100 * result.client_cpu_s / wall, 1) if ops else None,
                  limit=limit, errors=result.sum_dicts("errors"), timed_out=result.timed_out)
        lost = result.sum_dicts("failures")
        if lost:
            row.errors.update({f"connection: {k}": v for k, v in lost.items()})
        if row.timed_out:
            row.notes.append(f"stopped at the {result.load_timeout:.0f} s time limit")
        return row

    # -- workloads --------------------------------------------------------------------------

    def run(self) -> None:
        if self.o.limits:
            from chatserver.bench.limits import measure_limits

            self._current = "limits"
            seconds = min(2.0, max(0.2, self.o.duration))
            self.limits = measure_limits(["full", "normal"], seconds, progress=self._say)
        rounds: list[list[Row]] = []
        for index in range(self.o.repeat):
            rows: list[Row] = []
            for workload in self.o.workloads:
                self._current = workload
                if self.o.repeat > 1:
                    self._round = f"round {index + 1}/{self.o.repeat}: "
                method = getattr(self, "w_" + workload.replace("-", "_"))
                try:
                    rows.extend(method())
                except BenchError as exc:
                    self.failures.append({"workload": workload, "error": str(exc)})
            rounds.append(rows)
        self._current = self._round = ""
        self.rows = rounds[0] if len(rounds) == 1 else median_rows(rounds)

    def _send_load(self, ep: Endpoint, auths: list[list[str]], sink: str,
                   window: int) -> PhaseResult:
        """Durable sends to the offline account ``sink``: one connection per ``auths`` entry
        (``["register"|"login", name, password]``), ``window`` requests in flight each."""
        cap = math.ceil(self.o.scaled(MAX_OPS, 100) / len(auths))
        conns = [{"auth": auth, "role": "sender", "to": sink, "window": window, "count": cap}
                 for auth in auths]
        return self.phase(ep, split(conns, self.processes), duration=self.o.duration)

    def _send_row(self, name: str, workload: str, description: str, result: PhaseResult,
                  limit: str) -> Row:
        return self._row(name, workload, description, result, ops=result.total("ops"),
                         last_ns=result.latest("last_ns"), latency=result.merged("hist"),
                         limit=limit)

    def _sends(self, workload: str, clients: int, window: int, description: str) -> list[Row]:
        with self.endpoint() as ep:
            sink = self.name("sink")
            self.register(ep, [sink])
            auths = [["register", self.name("s"), PASSWORD] for _ in range(clients)]
            result = self._send_load(ep, auths, sink, window)
        return [self._send_row(workload, workload, description, result, limit=workload)]

    def w_sends_1(self) -> list[Row]:
        return self._sends("sends-1", 1, 1, "durable sends, 1 client, 1 in flight")

    def w_sends_8(self) -> list[Row]:
        return self._sends("sends-8", 8, 1, "durable sends, 8 clients, 1 in flight each")

    def w_sends_8x32(self) -> list[Row]:
        return self._sends("sends-8x32", 8, 32, "durable sends, 8 clients, 32 in flight each")

    def w_live(self) -> list[Row]:
        rows = []
        with self.endpoint() as ep:
            for name, senders, rate, window, description in (
                (f"live-{LIVE_RATE}/s", 1, LIVE_RATE, 1,
                 f"send-to-push latency, {LIVE_RATE:,} msgs/s offered to 1 online recipient"),
                ("live-max", 1, None, 32, "pushes/s to 1 online recipient, 1 sender x 32"),
                ("live-max-8", 8, None, 32, "pushes/s to 1 online recipient, 8 senders x 32"),
                # The figures for the in-memory original were taken this way.
                ("live-1", 1, None, 1,
                 "pushes/s to 1 online recipient, 1 sender waiting for each reply"),
                ("live-8", 8, None, 1,
                 "pushes/s to 1 online recipient, 8 senders waiting for each reply"),
            ):
                self._current = f"live ({name})"
                recipient = self.name("r")
                receiver = [{"auth": ["register", recipient, PASSWORD], "role": "receiver"}]
                if rate:
                    count = max(1, int(rate * self.o.duration))
                    conns = [{"auth": ["register", self.name("s"), PASSWORD], "role": "rate",
                              "to": recipient, "rate": rate, "count": count}]
                else:
                    cap = math.ceil(self.o.scaled(MAX_OPS, 100) / senders)
                    conns = [{"auth": ["register", self.name("s"), PASSWORD], "role": "sender",
                              "to": recipient, "window": window, "count": cap}
                             for _ in range(senders)]
                groups = [receiver, *split(conns, max(1, self.processes - 1))]
                result = self.phase(ep, groups, duration=self.o.duration, receivers=1)
                pushes = result.total("pushes", result.receiver_indexes)
                row = self._row(name, "live", description, result, ops=pushes,
                                last_ns=result.latest("last_push_ns", result.receiver_indexes),
                                latency=result.merged("push_hist", result.receiver_indexes),
                                latency_kind="send-to-push",
                                limit=None if rate else name)
                sent = result.total("ops", result.load_indexes)
                pushed = result.total("pushed", result.load_indexes)
                sent_lat = result.merged("hist", result.load_indexes).summary_ms()
                row.extra.update({"sent": sent, "pushed": pushed, "sent_latency_ms": sent_lat})
                if rate:
                    row.notes.append(f"offered {rate:,}/s; Sent reply p50 {sent_lat['p50'] or 0:.2f} ms")
                if pushes < pushed:
                    row.notes.append(f"{pushed - pushes:,} pushes missing")
                rows.append(row)
        return rows

    def w_drain(self) -> list[Row]:
        n = self.o.scaled(QUEUED_MESSAGES, 10)
        with self.endpoint() as ep:
            recipient = self.name("r")
            self.register(ep, [recipient])
            senders = 8
            per = [n // senders + (1 if i < n % senders else 0) for i in range(senders)]
            conns = [{"auth": ["register", self.name("s"), PASSWORD], "role": "sender",
                      "to": recipient, "window": 32, "count": count, "timed": False}
                     for count in per if count]
            self._current = "drain (queue)"
            queued = self.phase(ep, split(conns, self.processes), duration=self.o.phase_timeout)
            stored = queued.total("ops")
            queue_row = self._row("queue", "drain",
                                  f"store {n:,} messages for 1 offline account, 8 x 32",
                                  queued, ops=stored, last_ns=queued.latest("last_ns"),
                                  latency=queued.merged("hist"), limit="queue")
            self._current = "drain (fetch + ack)"
            drainer = [{"auth": ["login", recipient, PASSWORD], "role": "drainer",
                        "batch": 1000}]
            drained = self.phase(ep, [drainer], duration=self.o.phase_timeout)
            pending = [p for info in drained.ready.values() for p in info["pending"]]
            row = self._row("drain", "drain",
                            f"log in, fetch 1,000 + ack until empty ({n:,} queued)",
                            drained, ops=drained.total("ops"), last_ns=drained.latest("last_ns"),
                            latency=drained.merged("hist"), latency_kind="fetch+ack round trip",
                            limit="drain")
            row.extra.update({"pending_at_login": pending[0] if pending else None,
                              "fetched": drained.total("items")})
            if pending and pending[0] != stored:
                row.notes.append(f"{pending[0]:,} pending at login, {stored:,} stored")
            if row.ops != stored:
                row.notes.append(f"drained {row.ops:,} of {stored:,}")
        return [queue_row, row]

    def w_connections(self) -> list[Row]:
        wanted = self.o.scaled(CONNECTIONS, 2)
        # The server needs a descriptor per connection (plus its database and some spare);
        # if the hard limit is lower, hold fewer connections and say so.
        capacity = self.fd_limit - 256
        n = min(wanted, capacity)
        # Each load generator process holds at most its own descriptor limit of connections.
        procs = max(self.processes, math.ceil(n / max(1, capacity)))
        with self.endpoint(cheap_hash=True, max_connections=n + 64) as ep:
            sink = self.name("sink")
            self.register(ep, [sink])
            time.sleep(0.5)
            probe = ep.probe
            base_rss = probe.rss_bytes() if probe else None
            conns = [{"auth": ["register", self.name("c"), PASSWORD], "role": "burst",
                      "to": sink} for _ in range(n)]
            idle: dict = {}

            def on_ready(ready: dict[int, dict]) -> None:
                held = sum(info["ready"] for info in ready.values())
                idle["held"] = held
                self._say(f"{held:,} connections logged in; letting the server settle")
                time.sleep(1.0)
                if probe is not None:
                    idle["rss"] = probe.rss_bytes()
                    idle["threads"] = probe.threads()

            # The target is "all answered within 2 s"; waiting minutes for a server that
            # cannot get there would only make the run long.
            result = self.phase(ep, split(conns, procs), duration=0.0, on_ready=on_ready,
                                load_timeout=BURST_TIMEOUT_S)
        held = idle.get("held", 0)
        row = self._row("connections", "connections",
                        f"{n:,} idle logged-in connections, then all send at once", result,
                        ops=result.total("ops"), last_ns=result.latest("last_ns"),
                        latency=result.merged("hist"), latency_kind="from the common start")
        per_conn = None
        if base_rss is not None and idle.get("rss") is not None and held:
            per_conn = (idle["rss"] - base_rss) / held
        row.extra.update({
            "wanted": wanted, "held": held, "sends_written": result.total("requests") - 2 * held, "rss_before_mib": _mib(base_rss),
            "rss_idle_mib": _mib(idle.get("rss")), "threads_idle": idle.get("threads"),
            "bytes_per_connection": round(per_conn) if per_conn is not None else None,
            "all_answered_s": row.seconds if row.ops == held and held else None,
            "answered_within_2s": row.latency.count_at_most(int(BURST_TARGET_S * 1e9)),
            "request_latency_ms": result.merged("hist2").summary_ms(),
        })
        if n < wanted:
            row.notes.append(f"capped at {n:,} by the open-file limit ({self.fd_limit:,})")
        if held < n:
            row.notes.append(f"only {held:,} of {n:,} logged in")
        if per_conn is not None:
            row.notes.append(f"{per_conn / 1024:.1f} KiB/conn idle")
        if row.ops == held and held:
            row.notes.append(f"all {row.ops:,} answered in {row.seconds:.2f} s")
        else:
            row.notes.append(f"{row.ops:,} of {held:,} answered")
        row.notes.append(f"{row.extra['answered_within_2s']:,} within {BURST_TARGET_S:.0f} s")
        return [row]

    def w_search(self) -> list[Row]:
        n = self.o.scaled(ACCOUNTS, 100)
        self._say(f"making {n:,} account names")
        names = account_names(n)
        rows = []
        with self.endpoint(cheap_hash=True, prepare=self.accounts_prepare(names)) as ep:
            for kind in ("prefix", "infix"):
                self._current = f"search ({kind})"
                patterns = search_patterns(names, kind)
                cap = self.o.scaled(MAX_OPS, 100)
                conns = [{"role": "searcher", "patterns": patterns, "count": cap}]
                result = self.phase(ep, [conns], duration=self.o.duration)
                row = self._row(f"search-{kind}", "search",
                                f"ListAccounts, {kind} patterns ('{patterns[0]}'), "
                                f"over {n:,} accounts", result, ops=result.total("ops"),
                                last_ns=result.latest("last_ns"), latency=result.merged("hist"))
                matches = result.total("items") / row.ops if row.ops else 0
                row.extra.update({"accounts": n, "patterns": patterns[:5],
                                  "mean_results_per_page": round(matches, 1)})
                row.notes.append(f"{matches:.1f} results/page (limit 50)")
                if self.o.target is not None:
                    row.notes.append("over the target's own accounts (none inserted)")
                rows.append(row)
        return rows

    def w_accounts(self) -> list[Row]:
        """Durable sends (the sends-8x32 and sends-1 shapes) against a database of 100
        accounts and one of 1M; the 1M rows carry the ratio to the 100 ones.

        Both servers run at once (each on its own database, idle but for the phase being
        measured) and each shape is measured on the small one then at once on the big one,
        so that a pair sees the same machine. The recipient is the account with the last
        key and the senders are spread over the key order.
        """
        if self.o.target is not None:
            return self._accounts_on_target()
        clients = max(shape[1] for shape in ACCOUNT_SHAPES)
        big = self.o.scaled(ACCOUNTS, FEW_ACCOUNTS)
        sizes = (FEW_ACCOUNTS, big)
        with ExitStack() as stack:
            eps: list[tuple[int, Endpoint, str, list[str]]] = []
            for n in sizes:
                self._current = f"accounts ({n:,})"
                self._say(f"making {n:,} account names")
                names = account_names(n)
                sink, *senders = spread_names(names, 1 + clients)
                ep = stack.enter_context(self.endpoint(cheap_hash=True,
                                                       prepare=self.accounts_prepare(names)))
                eps.append((n, ep, sink, senders))
            rows = []
            for suffix, shape_clients, window, same_as in ACCOUNT_SHAPES:
                pair = []
                for n, ep, sink, senders in eps:
                    self._current = f"accounts ({n:,}, {suffix})"
                    auths = [["login", name, PASSWORD] for name in senders[:shape_clients]]
                    result = self._send_load(ep, auths, sink, window)
                    row = self._send_row(
                        f"accounts-{count_label(n)}-{suffix}", "accounts",
                        f"durable sends, {shape_clients} clients x {window} in flight "
                        f"(as {same_as}), {n:,} accounts in the database", result,
                        limit=same_as)
                    row.extra.update({"accounts": n, "shape": same_as, "recipient": sink})
                    pair.append(row)
                _compare(*pair)
                rows.extend(pair)
        return rows

    def _accounts_on_target(self) -> list[Row]:
        """With --target the database is the target's: the shapes once, nothing compared."""
        rows = []
        with self.endpoint() as ep:
            sink = self.name("sink")
            self.register(ep, [sink])
            for suffix, clients, window, same_as in ACCOUNT_SHAPES:
                self._current = f"accounts ({suffix})"
                auths = [["register", self.name("s"), PASSWORD] for _ in range(clients)]
                result = self._send_load(ep, auths, sink, window)
                row = self._send_row(f"accounts-target-{suffix}", "accounts",
                                     f"durable sends ({same_as}) over the target's accounts",
                                     result, limit=same_as)
                row.notes.append("over the target's own accounts (none inserted): "
                                 "no 100 vs 1M comparison")
                rows.append(row)
        return rows


def _compare(few: Row, many: Row) -> None:
    """Put the ratios of ``many`` (the big database) to ``few`` on ``many``: throughput,
    server CPU per send, p50 latency, and whether the target (within 10%) is met."""
    def per_send(row: Row) -> float | None:
        cpu = (row.server or {}).get("cpu_seconds")
        return cpu / row.ops if cpu is not None and row.ops else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    label = f"{count_label(many.extra['accounts'])}/{count_label(few.extra['accounts'])}"
    many.notes[:] = [n for n in many.notes if not n.startswith(f"{label}: ")]  # compared again
    throughput = ratio(many.throughput, few.throughput)
    cpu = ratio(per_send(many), per_send(few))
    p50 = ratio(many.latency.summary_ms()["p50"], few.latency.summary_ms()["p50"])
    met = throughput >= ACCOUNTS_TARGET if throughput is not None else None
    many.extra.update({"compared_with": few.name, "throughput_ratio": throughput,
                       "server_cpu_per_send_ratio": cpu, "p50_ratio": p50,
                       "target_met": met})
    if throughput is None:
        many.notes.append(f"{label}: no throughput to compare")
        return
    parts = [f"{label}: {throughput:.2f}x ops/s"]
    if cpu is not None:
        parts.append(f"{cpu:.2f}x server CPU/send")
    if p50 is not None:
        parts.append(f"{p50:.2f}x p50")
    verdict = "met" if met else "NOT met"
    many.notes.append(", ".join(parts) + f"; target (ops/s >= {ACCOUNTS_TARGET:.2f}x): {verdict}")


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)

