"""`kvmbpf export`: every running collector's metrics on an HTTP endpoint for Prometheus.

The main thread reads the BPF maps once per interval (default 5 s) and keeps
the latest metrics; the HTTP thread renders them on each scrape, so a scrape
never touches BPF and many scrapers cost no more kernel reads.
"""
from __future__ import annotations

import dataclasses
import errno
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import click

from ..cli import main, tracing_options
from ..collectors.base import Scope
from ..collectors.multi import MultiCollector
from ..errors import KvmbpfError
from ..render import prometheus
from ..render.jsonl import write_snapshot
from ..session import Timing, run
from ..snapshot import Metric
from .top import collectors_option

DEFAULT_PORT = 9477


class Exporter:
    """The latest metrics and the exporter's own health, rendered per scrape."""

    def __init__(self, max_series: int):
        self.lock = threading.Lock()
        self.limiter = prometheus.SeriesLimiter(max_series)
        self.metrics: list[Metric] = []
        self.collect_s = 0.0
        self.updated = 0.0
        self.last_scrape_s = 0.0
        self.scrapes = 0

    def update(self, snapshot, collect_s: float) -> None:
        metrics = snapshot.metrics()
        with self.lock:
            self.metrics, self.collect_s, self.updated = metrics, collect_s, time.time()

    def scrape(self) -> bytes:
        start = time.perf_counter()
        with self.lock:
            self.scrapes += 1
            text = prometheus.render(self.metrics + self._health(), self.limiter)
            self.last_scrape_s = time.perf_counter() - start
        return text.encode()

    def _health(self) -> list[Metric]:
        def gauge(name: str, help_: str, value: float) -> Metric:
            return Metric(name, "gauge", help_, {}, value)
        return [gauge("kvmbpf_exporter_collect_duration_seconds",
                      "Time the latest interval took to read every collector's maps", self.collect_s),
                gauge("kvmbpf_exporter_last_update_timestamp_seconds",
                      "Unix time of the latest map read (0: none yet)", self.updated),
                gauge("kvmbpf_exporter_scrape_duration_seconds",
                      "Time the previous scrape took to render", self.last_scrape_s),
                Metric("kvmbpf_exporter_scrapes_total", "counter", "Scrapes served",
                       {}, self.scrapes)]


def make_server(host: str, port: int, exporter: Exporter) -> ThreadingHTTPServer:
    """Bind now (before any probe loads), so a port in use is a one-line error."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] == "/metrics":
                self._send(200, prometheus.CONTENT_TYPE, exporter.scrape())
            elif self.path == "/":
                self._send(200, "text/html; charset=utf-8",
                           b'<html><body><a href="/metrics">kvmbpf metrics</a></body></html>\n')
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            """Quiet: one line per scrape would flood the journal."""

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise KvmbpfError(f"cannot listen on {host}:{port}: address already in use") from None
        raise KvmbpfError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.daemon_threads = True
    return server


@main.command()
@click.option("--listen", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes VM names to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--max-series", type=click.IntRange(1), default=prometheus.DEFAULT_MAX_SERIES,
              show_default=True, help="Label sets kept per metric family; the rest are dropped "
              "and counted in kvmbpf_exporter_series_dropped.")
@collectors_option
@tracing_options
def export(listen: str, port: int, max_series: int, collectors: tuple[str, ...], vms, pids, vcpus,
           timing: Timing, as_json: bool, top: int) -> None:
    """Serve Prometheus metrics on http://LISTEN:PORT/metrics; maps are read every INTERVAL (5 s).

    Histograms are Prometheus histograms in seconds whose `le` bounds are the
    edges of kvmbpf's log-linear buckets (quantiles within 6.25 %).
    """
    if timing.interval is None:
        timing = dataclasses.replace(timing, interval=5.0)
    exporter = Exporter(max_series)
    server = make_server(listen, port, exporter)
    thread = None
    try:
        multi = MultiCollector(Scope(vms, pids, vcpus), collectors)
        thread = threading.Thread(target=server.serve_forever, name="kvmbpf-export", daemon=True)
        thread.start()
        click.echo(f"kvmbpf export: serving http://{listen}:{server.server_address[1]}/metrics: "
                   f"{', '.join(multi.collectors)}" + "".join(
                       f"; {name} off: {why}" for name, why in multi.off.items()), err=True)
        last = [time.perf_counter()]

        def emit(snapshot) -> None:
            exporter.update(snapshot, time.perf_counter() - last[0])
            if as_json:
                write_snapshot(snapshot)

        def on_tick() -> None:
            last[0] = time.perf_counter()
        run(multi, timing, emit, on_tick)
    finally:
        if thread is not None:
            server.shutdown()
        server.server_close()
