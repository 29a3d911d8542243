"""The server under test: a ``chat serve`` subprocess on a temporary database, or a process
found by pid, and what /proc says about its CPU time and memory."""

from __future__ import annotations

import collections
import os
import re
import resource
import signal
import subprocess
import sys
import threading

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ProcessProbe:
    """CPU time and memory of one process, from /proc (Linux); None where unavailable."""

    def __init__(self, pid: int):
        self.pid = pid

    def cpu_times(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds of every thread of the process so far."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                stat = f.read()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()  # the name may contain spaces
        return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK

    def cpu_seconds(self) -> float | None:
        """utime + stime of every thread of the process so far."""
        times = self.cpu_times()
        return None if times is None else times[0] + times[1]

    def _status(self, key: str) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        value = line.split()[1]
                        return int(value) * 1024 if line.rstrip().endswith("kB") else int(value)
        except OSError:
            return None
        return None

    def rss_bytes(self) -> int | None:
        return self._status("VmRSS")

    def peak_rss_bytes(self) -> int | None:
        """VmHWM: the highest resident set size since start or since ``reset_peak()``."""
        return self._status("VmHWM")

    def threads(self) -> int | None:
        return self._status("Threads")

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux 4.0+, own processes); False if refused."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy so far (all CPUs, from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user). Interrupt
    # time is left out: loopback packets are processed there, charged to no process, so it
    # would count the benchmark's own networking as someone else's. Steal (other virtual
    # machines) is kept.
    v = [int(x) for x in fields[1:9]]
    return (v[0] + v[1] + v[2] + v[7]) / _CLK_TCK


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


class BenchServer:
    """``chat serve`` on ``db_path`` and port 0, started and stopped by the benchmark."""

    def __init__(self, db_path: str, *, sync: str, extra_args: list[str] | None = None):
        self.db_path = db_path
        self.sync = sync
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.probe: ProcessProbe | None = None

    @property
    def args(self) -> list[str]:
        return [sys.executable, "-m", "chatserver_cli", "serve", "--db", self.db_path,
                "--port", "0", "--sync", self.sync, *self.extra_args]

    def start(self, timeout: float = 60.0) -> BenchServer:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # The benchmark's own settings come from the command line, never from CHAT_SERVE_*.
        env = {k: v for k, v in env.items() if not k.startswith("CHAT_")}
        raise_nofile_limit()  # the server inherits the raised limit (10k connections)
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, env=env)
        found: list[tuple[str, int]] = []
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stdout:
                self.output.append(line)
                if not found:
                    match = _LISTENING.search(line)
                    if match:
                        found.append((match.group(1), int(match.group(2))))
                        ready.set()
            ready.set()

        threading.Thread(target=drain, name="server-output", daemon=True).start()
        if not ready.wait(timeout) or not found:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.log_tail())
        self.host, self.port = found[0]
        self.probe = ProcessProbe(self.proc.pid)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return "".join(list(self.output)[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
