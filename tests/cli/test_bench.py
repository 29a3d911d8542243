"""``chat bench`` runs tiny workloads end to end and prints well-formed output.

Benchmarks are not timed tests: nothing here asserts on speed, only on the shape of the
output and that work was done (positive counts).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from click.testing import CliRunner

from chatserver.bench.histogram import Histogram
from chatserver.bench.report import HEADER, limit_value
from chatserver.bench.workloads import account_names, count_label, spread_names
from chatserver_cli.main import cli
from tests.conftest import chat_command

pytestmark = pytest.mark.timeout(120)


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(chat_command("bench", "--scale", "0.001", *args), check=False,
                          capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)


def test_json_output_has_every_row_and_limit():
    result = run_bench("--duration", "0.3", "--workload", "sends-1", "--workload", "drain",
                       "--workload", "search", "--workload", "accounts", "--limits", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"command", "machine", "options", "limits", "results", "failures"} <= set(doc)
    assert doc["failures"] == []
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["python"]
    assert doc["options"]["sync"] == "full"
    names = [r["name"] for r in doc["results"]]
    # accounts: 100 accounts vs 1M at scale 1, so 1,000 here ("1k").
    assert names == ["sends-1", "queue", "drain", "search-prefix", "search-infix",
                     "accounts-100-8x32", "accounts-1k-8x32", "accounts-100-1", "accounts-1k-1"]
    for row in doc["results"]:
        assert row["ops"] > 0, row
        assert row["throughput_per_s"] > 0, row
        lat = row["latency_ms"]
        assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"], row
        assert row["errors"] == {}, row
        assert row["server"]["cpu_pct"] is not None and row["server"]["peak_mib"] > 0, row
    by_name = {r["name"]: r for r in doc["results"]}
    # 100k queued messages at scale 1: 100 here, all stored, all drained.
    assert by_name["queue"]["ops"] == 100
    assert by_name["drain"]["ops"] == 100 and by_name["drain"]["pending_at_login"] == 100
    assert by_name["search-prefix"]["accounts"] == 1000
    # --limits: the machine's ceilings, and a ratio for the rows that have one.
    limit_names = {entry["name"] for entry in doc["limits"]}
    assert {"sqlite commit (full)", "sqlite commit (normal)", "loopback round trip",
            "loopback round trip (server polling)"} <= limit_names
    assert all(entry["rate"] > 0 for entry in doc["limits"])
    assert by_name["sends-1"]["ratio_to_limit"] > 0
    assert by_name["drain"]["ratio_to_limit"] > 0
    assert by_name["search-prefix"]["ratio_to_limit"] is None
    # accounts: the same loads against 100 and 1,000 accounts; the big row has the ratios.
    for shape in ("8x32", "1"):
        few, many = by_name[f"accounts-100-{shape}"], by_name[f"accounts-1k-{shape}"]
        assert few["workload"] == many["workload"] == "accounts"
        assert (few["accounts"], many["accounts"]) == (100, 1000)
        assert few["shape"] == many["shape"] == {"8x32": "sends-8x32", "1": "sends-1"}[shape]
        # The recipient has the last key of the big table, not one of its first rows.
        assert many["recipient"] == max(account_names(1000), key=str.casefold)
        assert many["compared_with"] == few["name"]
        expected = round(many["throughput_per_s"] / few["throughput_per_s"], 2)
        assert abs(many["throughput_ratio"] - expected) < 0.02, many
        assert many["target_met"] is (many["throughput_ratio"] >= 0.9)
        assert any(note.startswith("1k/100: ") and "target" in note for note in many["notes"])
        assert few["ratio_to_limit"] > 0 and many["ratio_to_limit"] > 0


def test_table_has_a_header_and_one_row_per_measurement():
    result = run_bench("--duration", "0.3", "--workload", "sends-8x32", "--workload", "live",
                       "--workload", "connections", "--sync", "normal")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["WORKLOAD", "OPS", "OPS/S"]
    assert re.split(r"\s{2,}", lines[0].strip()) == list(HEADER)
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    assert list(rows) == ["sends-8x32", "live-1000/s", "live-max", "live-max-8", "live-1",
                          "live-8", "connections"]
    for name, cells in rows.items():
        assert int(cells[1].replace(",", "")) > 0, (name, line)
    assert "sync=normal" in result.stdout
    # No status line when stderr is not a terminal.
    assert "\r" not in result.stderr


def test_bad_target_is_a_usage_error():
    result = CliRunner().invoke(cli, ["bench", "--target", "nowhere"])
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output


def test_histogram_percentiles_are_close():
    h = Histogram()
    for v in range(1, 100_001):
        h.record(v * 1000)
    assert abs(h.percentile(50) - 50_000_000) / 50_000_000 < 0.02
    assert abs(h.percentile(99) - 99_000_000) / 99_000_000 < 0.02
    assert h.percentile(100) == h.max == 100_000_000
    merged = Histogram()
    merged.merge(Histogram.from_dict(json.loads(json.dumps(h.to_dict()))))
    assert merged.count == h.count and merged.percentile(50) == h.percentile(50)


def test_accounts_are_picked_across_the_key_order():
    names = account_names(1000)
    keys = sorted(name.casefold() for name in names)
    picked = spread_names(names, 9)
    assert len(set(picked)) == 9
    positions = sorted(keys.index(name.casefold()) for name in picked)
    assert positions[-1] == 999  # the last key is one of them
    assert positions[0] < 200  # and so are keys near the start
    ids = [int(name.rsplit("_", 1)[1]) for name in picked]
    assert max(ids) - min(ids) > 500  # their rows are spread over the table too
    assert count_label(1_000_000) == "1M" and count_label(1000) == "1k"
    assert count_label(100) == "100" and count_label(12_345) == "12345"


def test_repeat_reports_each_rows_median_round():
    result = run_bench("--duration", "0.2", "--workload", "sends-1", "--workload", "sends-8",
                       "--repeat", "2", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["options"]["repeat"] == 2
    assert [r["name"] for r in doc["results"]] == ["sends-1", "sends-8"]
    for row in doc["results"]:
        rounds = row["rounds_per_s"]
        assert len(rounds) == 2 and all(r > 0 for r in rounds), row
        assert row["throughput_per_s"] == pytest.approx(min(rounds), rel=0.01)  # lower middle
        assert row["notes"][0].startswith("median of 2 rounds"), row


def test_median_rows_picks_the_middle_round_of_each_row():
    from chatserver.bench.workloads import Row, median_rows

    def row(name, ops):
        return Row(name=name, workload=name, description="", ops=ops, seconds=1.0 if ops else 0)

    rounds = [[row("a", 10), row("b", 0)], [row("a", 30), row("b", 0)], [row("a", 20), row("b", 0)]]
    a, b = median_rows(rounds)
    assert (a.name, a.ops, a.extra["rounds_per_s"]) == ("a", 20, [10.0, 30.0, 20.0])
    assert a.notes == ["median of 3 rounds (10-30/s)"]
    assert (b.name, b.ops, b.notes, b.extra) == ("b", 0, [], {})  # nothing measured: round 1
    assert b is rounds[0][1]
    assert median_rows([[row("a", 10)], [row("a", 40)]])[0].ops == 10


def test_median_rows_compares_the_accounts_rows_it_chose():
    """The 1M/100 ratio and verdict are worked out again from the two median rows, not
    kept from whichever round each came from."""
    from chatserver.bench.workloads import Row, _compare, median_rows

    def round_of(few_ops, many_ops):
        few = Row(name="accounts-100-1", workload="accounts", description="", ops=few_ops,
                  seconds=1.0, extra={"accounts": 100})
        many = Row(name="accounts-1M-1", workload="accounts", description="", ops=many_ops,
                   seconds=1.0, extra={"accounts": 1_000_000})
        _compare(few, many)
        return [few, many]

    few, many = median_rows([round_of(1000, 1060), round_of(1100, 950), round_of(850, 900)])
    assert (few.ops, many.ops) == (1000, 950)  # each row's own median round
    assert many.extra["throughput_ratio"] == 0.95 and many.extra["target_met"] is True
    assert [n for n in many.notes if n.startswith("1M/100: ")] == [
        "1M/100: 0.95x ops/s; target (ops/s >= 0.90x): met"]
    few, many = median_rows([round_of(1000, 800), round_of(1100, 950), round_of(1200, 860)])
    assert many.extra["throughput_ratio"] == 0.782 and many.extra["target_met"] is False
    assert any(n.endswith("NOT met") for n in many.notes)


def test_the_sends_1_ceiling_takes_the_faster_loopback_round_trip():
    """The server polls for a waiting client's next request, so a polling echo server's round
    trip is its ceiling when that is the faster one (and the sleeping one's otherwise)."""
    limits = [{"name": "sqlite commit (normal)", "rate": 40_000.0},
              {"name": "loopback round trip", "rate": 20_000.0},
              {"name": "loopback round trip (server polling)", "rate": 40_000.0}]
    assert limit_value("sends-1", limits, "normal") == pytest.approx(20_000.0)
    limits[2]["rate"] = 10_000.0
    assert limit_value("sends-1", limits, "normal") == pytest.approx(1 / (1 / 40_000 + 1 / 20_000))
    assert limit_value("sends-1", limits[:2], "normal") == pytest.approx(1 / (1 / 40_000 + 1 / 20_000))


def test_live_delivery_waiting_for_replies_has_the_sends_ceilings():
    """live-1 and live-8 are sends-1 and sends-8 with the recipient online: the push rides
    on the same commit, so their ceilings are the same."""
    limits = [{"name": "sqlite commit (normal)", "rate": 40_000.0},
              {"name": "sqlite insert x1000 (normal)", "rate": 100_000.0},
              {"name": "loopback round trip", "rate": 40_000.0}]
    assert limit_value("live-1", limits, "normal") == pytest.approx(20_000.0)
    assert limit_value("live-8", limits, "normal") == pytest.approx(100_000.0)
    limits[1]["rate"] = 1_000_000.0
    assert limit_value("live-8", limits, "normal") == pytest.approx(160_000.0)
    assert limit_value("live-8", limits, "normal") == limit_value("sends-8", limits, "normal")
