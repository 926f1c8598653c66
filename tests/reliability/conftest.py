"""The reliability suite's application: a second app on the shared cluster with two SLM and two
retriever replicas, an API key, and a Claude client with short timeouts and a quick circuit.

Its SLM engine is `openai` against a local OpenAI-compatible server with a fixed reply time, so
faults, fuzzing and load exercise Ray Serve, the orchestrator and the retriever at a request rate
two cores can sustain; the replicas, handles, routing and retries are the production ones.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hybrid_serve.benchmarks.fixed_latency_server import FixedLatencyServer
from hybrid_serve.config import HybridServeConfig
from tests.conftest import App, wait_ready

APP_NAME = "rel"
PREFIX = "/rel"
KEY = "hs-rel-" + "k3y" * 8


@dataclass
class Rel:
    url: str
    key: str
    shared: App  # the session app: its Messages-API server, OTLP receiver, metrics
    llm: FixedLatencyServer
    long: bool

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.auth, timeout=timeout)

    def scaled(self, short: float, long: float) -> float:
        """CI's short form, or the by-hand length with --reliability-long."""
        return long if self.long else short


@pytest.fixture(scope="session")
def rel(app: App, tmp_path_factory, request) -> Iterator[Rel]:
    from ray import serve

    from hybrid_serve.deployments.app import build

    llm = FixedLatencyServer(latency_s=0.05).start()
    cfg = HybridServeConfig.load(
        overrides={
            "app_name": APP_NAME,
            "data_dir": str(tmp_path_factory.mktemp("rel")),
            "http.port": app.cfg.http.port,
            "http.api_keys": [{"key": KEY, "admin": True}],  # /v1/usage totals, /readyz details
            "slm.engine": "openai",
            "slm.openai.base_url": llm.url,
            "slm.model_name": "slm",
            "slm.replicas": 2,
            "slm.num_cpus": 0.1,
            "slm.max_tokens": 32,
            "retriever.replicas": 2,
            "retriever.num_cpus": 0.25,
            "llm.timeout_s": 1.0,
            "llm.max_retries": 1,
            "llm.max_retry_after_s": 2.0,
            "llm.circuit_failures": 3,
            "llm.circuit_cooldown_s": 2.0,
        }
    )
    serve.run(build(cfg), name=APP_NAME, route_prefix=PREFIX)
    url = app.url + PREFIX
    wait_ready(url)
    yield Rel(url, KEY, app, llm, bool(request.config.getoption("--reliability-long")))
    serve.delete(APP_NAME)
    llm.stop()


# -- replicas as processes ---------------------------------------------------------------------


@dataclass
class Replica:
    actor_name: str
    pid: int

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def replicas(deployment: str, app_name: str = APP_NAME) -> list[Replica]:
    """The live replicas of a deployment: Serve's named actors and their processes (the pid from
    the GCS actor table: no dashboard needed)."""
    import ray
    from ray._private.state import state

    out = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if not name.startswith(f"SERVE_REPLICA::{app_name}#{deployment}#"):
            continue
        try:
            actor_id = ray.get_actor(name, namespace="serve")._actor_id.hex()
        except ValueError:
            continue  # died between the listing and the lookup (a replica just killed)
        info = state.actor_table(actor_id)
        if info.get("State") == "ALIVE" and info.get("Pid"):
            out.append(Replica(name, int(info["Pid"])))
    return out


def kill_replica(replica: Replica) -> None:
    """`ray.kill` the actor and SIGKILL its process, as a node losing it would."""
    import ray

    actor = ray.get_actor(replica.actor_name, namespace="serve")
    ray.kill(actor, no_restart=True)
    try:
        os.kill(replica.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def running_replicas(deployment: str, app_name: str = APP_NAME) -> int:
    from ray import serve

    status = serve.status().applications[app_name].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def wait_replaced(deployment: str, victim: Replica, n: int = 2, timeout_s: float = 180) -> float:
    """Seconds until Serve runs `n` replicas again, none of them the victim."""
    start = time.monotonic()
    while True:
        live = {r.actor_name for r in replicas(deployment)}
        if victim.actor_name not in live and len(live) >= n and running_replicas(deployment) >= n:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{deployment}: not replaced after {timeout_s:.0f} s ({live})")
        time.sleep(0.25)
