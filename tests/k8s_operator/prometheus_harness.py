"""A real Prometheus for tests: Debian's `prometheus` binary, scraping given loopback targets.

    with PrometheusHarness({"router": [Target("127.0.0.1:8000", {"pod": "router-0"})]}, workdir=tmp) as prom:
        prom.wait_for_targets()
        prom.query('sum(glmserve:num_requests_running)')
        missing = empty_dashboard_queries(prom, timeout=20)   # [] when every dashboard panel has data

Prometheus negotiates OpenMetrics, and prometheus_client (0.26) then writes colons in sample names as underscores
(prometheus/client_python#1177): `glmserve:x` would be stored as `glmserve_x` and no dashboard query would match.
`mangled_series()` finds such series; the services must serve the classic text format (or drop the colons).

The scrape config is generated (one job per entry, static targets with extra labels such as `pod` and
`namespace`, which prometheus-operator would add in a cluster); Prometheus listens on a free loopback port;
`stop()` terminates it and waits. Point it at `glmserve up` by passing the services' HTTP ports as targets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glmserve.local_ports import free_port
from tests.k8s_operator.promql import dashboard_queries, substitute


@dataclass(frozen=True)
class Target:
    address: str  # host:port serving /metrics
    labels: dict[str, str] = field(default_factory=dict)


class PrometheusError(RuntimeError):
    pass


def find_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusHarness:
    def __init__(self, jobs: dict[str, list[Target]], *, workdir: Path, scrape_interval: str = "1s",
                 binary: str | None = None):
        self.jobs = jobs
        self.workdir = Path(workdir)
        self.scrape_interval = scrape_interval
        self.binary = binary or find_binary()
        if self.binary is None:
            raise PrometheusError("no prometheus binary (Debian: apt-get install -y prometheus)")
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics", "scrape_timeout": self.scrape_interval,
                 "static_configs": [{"targets": [t.address], "labels": dict(t.labels)} for t in targets]}
                for job, targets in self.jobs.items()],
        }

    def start(self, timeout: float = 30.0) -> PrometheusHarness:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config()))
        self.port = free_port()
        self._log = open(self.workdir / "prometheus.log", "wb")
        self._proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout}s: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> PrometheusHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP API ------------------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422: the query itself is wrong
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (raises PrometheusError if Prometheus rejects the query)."""
        data = self._get("/api/v1/query", {"query": promql})
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def targets_up(self) -> dict[str, str]:
        data = self._get("/api/v1/targets", {"state": "active"})
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until the query returns data (never just sleep: the first samples take a few scrapes)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"no data for {promql} after {timeout}s; targets: {self.targets_up()}")
            time.sleep(0.25)

    def wait_for_samples(self, metric: str = "up", timeout: float = 30.0) -> list[dict[str, Any]]:
        return self.wait_for(metric, timeout)

    def wait_for_targets(self, timeout: float = 30.0) -> None:
        """Until every configured target has been scraped successfully (their first scrapes are staggered)."""
        expected = sum(len(t) for t in self.jobs.values())
        self.wait_for(f"count(up == 1) == {expected}", timeout)


def mangled_series(prom: PrometheusHarness, job: str = ".+") -> list[str]:
    """Series stored under the underscore-escaped form of a glmserve name (see the module docstring), from the
    jobs matching the regex `job`."""
    query = f'count by (__name__) ({{__name__=~"glmserve_.+", job=~"{job}"}})'
    return sorted(r["metric"]["__name__"] for r in prom.query(query))


def empty_dashboard_queries(prom: PrometheusHarness, timeout: float = 30.0, rate_window: str = "1m",
                            skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(panel title, query) of every dashboard query still without data when the timeout ends; queries
    naming any of the `skip` substrings are not checked."""
    pending = [(title, substitute(expr, rate_window)) for title, expr in dashboard_queries()
               if not any(s in expr for s in skip)]
    deadline = time.monotonic() + timeout
    while pending:
        pending = [(t, q) for t, q in pending if not prom.query(q)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return pending
