"""`kvmbpf export` scraped by a real Prometheus server; PromQL answers checked against the truth.

The guest's name holds a quote and a backslash: a wrong escape makes Prometheus
reject the whole scrape.  histogram_quantile(0.99) over the exported buckets
must match the p99 of the same cumulative histogram from kvmbpf's own JSON, and
the PIO counter must match the guest's own round count.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, prog_ids_of, run_kvmbpf, tracing_prog_ids, unique
from kvmbpf.hist import MIDPOINT_ERROR, SUB, Histogram

PIO_COUNT = 2000
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (127.0.0.1 only)
        return resp.read()


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout:g}s")


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping one target every second (stopped by pid)."""

    def __init__(self, workdir: Path, target: str):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
                          "scrape_configs:\n  - job_name: kvmbpf\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{self.port}/-/ready")

    def query(self, promql: str, at: float) -> list[dict]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"}))
        body = json.loads(get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus server binary is not installed "
                    "(apt-get install --no-install-recommends prometheus)")
def test_prometheus_scrapes_and_quantile_matches_json(lab, tmp_path):
    name = unique('we"ird\\vm')
    vm = lab.start_vm(name, "exits", {"PIO_COUNT": PIO_COUNT, "DELAY_MS": 100, "ROUNDS": 0})
    port = free_port()
    before_start = vm.markers().count("begin")
    out_file = open(tmp_path / "export.out", "w+")     # a file, not a pipe: never blocks the writer
    export = subprocess.Popen([sys.executable, "-m", "kvmbpf", "export", "--port", str(port),
                               "--vm", name, "--collector", "exits", "--json", "1"],
                              cwd=ROOT, stdout=out_file, stderr=subprocess.PIPE, text=True)
    prom = None
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        ours = prog_ids_of(export.pid)
        assert ours, "export attached no BPF program"
        prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
        sel = f'vm={promql_string(name)},reason="KVM_EXIT_IO"'
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            at = time.time()
            counts = prom.query(f"kvmbpf_vmm_time_seconds_count{{{sel}}}", at)
            if counts and float(counts[0]["value"][1]) > 20 * PIO_COUNT:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"no samples scraped: {prom.query('up', time.time())}")
        after_query = vm.markers().count("begin")
        assert prom.query('up{job="kvmbpf"}', at)[0]["value"][1] == "1"
        count = int(float(counts[0]["value"][1]))
        p99 = float(prom.query(
            f"histogram_quantile(0.99, sum by (le) (kvmbpf_vmm_time_seconds_bucket{{{sel}}}))",
            at)[0]["value"][1])
        pio = float(prom.query(f'sum(kvmbpf_pio_total{{vm={promql_string(name)},port="0x700",'
                               f'direction="out"}})', at)[0]["value"][1])
        probes = float(prom.query('kvmbpf_probes{collector="exits"}', at)[0]["value"][1])
        dropped = prom.query("sum(kvmbpf_exporter_series_dropped)", at)
    finally:
        if prom is not None:
            prom.stop()
        export.send_signal(signal.SIGTERM)
        _, err = export.communicate(timeout=30)
        out_file.seek(0)
        out = out_file.read()
        out_file.close()
    assert export.returncode == 0, err
    assert not (ours & tracing_prog_ids()), "export left its BPF programs loaded"

    # the same histogram from kvmbpf's own JSON: intervals summed until the scraped count
    cumulative, own_count = Histogram(), 0
    for line in out.splitlines():
        snap = json.loads(line)
        for row in snap["parts"]["exits"]["userspace_exits"]:
            if row["vm"] == name and row["reason"] == "KVM_EXIT_IO":
                for slot, n in row["vmm_time"]["buckets"]:
                    cumulative.add(slot, n)
        own_count = cumulative.count
        if own_count >= count:
            break
    assert own_count == count, "the scraped count matches no interval boundary of the JSON"
    own_p99 = cumulative.percentiles((99.0,))["p99"] / 1e9
    print(f"PromQL p99 {p99 * 1e6:.3f}us, kvmbpf JSON p99 {own_p99 * 1e6:.3f}us over {count} exits")
    # Prometheus interpolates inside the bucket kvmbpf reads from its midpoint: at most one
    # bucket width (2^-SUB_BITS of its lower bound) apart, plus the midpoint's own error.
    assert abs(p99 - own_p99) <= own_p99 * (1 / SUB + MIDPOINT_ERROR), (p99, own_p99)

    # ground truth from the guest: PIO_COUNT writes to 0x700 per round ("begin" markers)
    rounds = pio / PIO_COUNT
    assert before_start - 2 <= rounds <= after_query + 1, (rounds, before_start, after_query)
    assert rounds >= 5
    assert probes >= 3
    assert dropped and float(dropped[0]["value"][1]) == 0


def test_port_in_use_is_one_line_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_kvmbpf("export", "--port", str(port), "1", "1")
    assert res.rc == 2
    assert res.err.strip() == f"kvmbpf: error: cannot listen on 127.0.0.1:{port}: address already in use"


def test_export_serves_health_and_escapes_names(lab):
    name = unique('q"x\\y')
    lab.start_vm(name, "exits", {"PIO_COUNT": 50, "DELAY_MS": 100, "ROUNDS": 0})
    port = free_port()
    export = subprocess.Popen([sys.executable, "-m", "kvmbpf", "export", "--port", str(port),
                               "--vm", name, "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        ours = prog_ids_of(export.pid)
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and "kvmbpf_pio_total" not in text:
            time.sleep(0.5)
            text = get(f"http://127.0.0.1:{port}/metrics").decode()
        with pytest.raises(urllib.error.HTTPError):
            get(f"http://127.0.0.1:{port}/nope")
    finally:
        export.send_signal(signal.SIGINT)
        _, err = export.communicate(timeout=30)
    assert export.returncode == 0, err
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    assert f'vm="{escaped}"' in text
    for health in ("kvmbpf_probes{", "kvmbpf_map_overflow_total{", "kvmbpf_collector_enabled{",
                   "kvmbpf_exporter_scrape_duration_seconds ",
                   "kvmbpf_exporter_collect_duration_seconds "):
        assert health in text, health
    assert ours and not (ours & tracing_prog_ids()), "export left its BPF programs loaded"
    if shutil.which("promtool"):             # Prometheus's own linter of the exposition format
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                              text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
