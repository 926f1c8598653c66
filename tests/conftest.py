"""Shared fixtures: one real local Ray cluster with the application deployed, for the session."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hybrid_serve.benchmarks.otlp_receiver import OTLPReceiver
from hybrid_serve.cluster.local import free_port
from hybrid_serve.config import HybridServeConfig
from tests.support.cli import MARK, marked_processes, wait_quiet
from tests.support.messages_api import MessagesAPIServer
from tests.support.ray_logs import start_dir

APP = "hybrid-serve"
# Every cluster the suite starts runs the bundled weights as shipped, whatever this machine's
# probe would choose (engines.llama_setup): what the tests assert of the SLM's answers holds on
# every CPU. tests/unit/test_llama_setup.py measures and chooses for real.
os.environ.setdefault("HYBRID_SERVE_SLM__LLAMA_CPP__QUANTIZATION", "bundled")
os.environ.setdefault("HYBRID_SERVE_SLM__LLAMA_CPP__FLASH_ATTENTION", "off")
# The evaluation data and the KubeRay CRD sit beside the checkout (../shared).
SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} not found: the shared evaluation data sits beside the checkout")
    return path


def wait_ready(url: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            last = r.text
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready: {last}")


def pytest_addoption(parser):
    parser.addoption(
        "--reliability-long",
        action="store_true",
        help="run the reliability tests at full length (minutes to an hour), not CI's short form",
    )


def pytest_collection_modifyitems(config, items):
    # Tests that start their own cluster (`hybrid-serve up`) run before the shared one exists,
    # so two clusters never compete for the two cores.
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_cluster") else 1)


@pytest.fixture(scope="session", autouse=True)
def _no_claude_key() -> None:
    # Claude is unreachable here; tests that need it start a Messages-API server of their own.
    os.environ.pop("ANTHROPIC_API_KEY", None)
    os.environ.pop("ANTHROPIC_BASE_URL", None)


@dataclass
class App:
    url: str
    cfg: HybridServeConfig
    claude: MessagesAPIServer
    otlp: OTLPReceiver  # every span the cluster exports
    metrics_url: str  # Ray's Prometheus endpoint on this node


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory) -> Path:
    """Converted models shared by the modules that start vLLM (tests/support/vllm.py)."""
    return tmp_path_factory.mktemp("vllm-models")


@pytest.fixture(scope="session")
def claude_server() -> Iterator[MessagesAPIServer]:
    server = MessagesAPIServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def app(tmp_path_factory, claude_server, otlp_receiver) -> Iterator[App]:
    import ray
    from ray import serve

    from hybrid_serve.deployments.app import build

    port = free_port()
    cfg = HybridServeConfig.load(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("data")),
            "http.port": port,
            "http.max_query_chars": 500,
            "http.max_body_bytes": 64 * 1024,
            "slm.max_tokens": 48,
            # The tests here assert what each request does (Claude calls, routes, streams): a
            # repeated question must not be answered from the cache. The cache has its own app
            # (tests/e2e/test_answer_cache.py).
            "cache.enabled": False,
        }
    )
    # Replicas inherit the environment of the cluster this process starts: ClaudeProxy's SDK
    # calls the local Messages-API server.
    os.environ["ANTHROPIC_API_KEY"] = "sk-test-local-only"
    os.environ["ANTHROPIC_BASE_URL"] = claude_server.url
    # Tracing on, by the standard variables, to a real OTLP/HTTP receiver: every test's requests
    # are traced, and the observability tests read the spans back.
    os.environ["OTEL_TRACES_EXPORTER"] = "otlp"
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_receiver.endpoint
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    metrics_port = free_port()
    # The tests with clusters of their own ran first; theirs must be gone before this one starts.
    killed = wait_quiet()
    if killed:
        print(f"\nconftest: SIGKILLed {len(killed)} processes an earlier test's `up` left behind")
    # This cluster's processes carry a mark too, so that a failed start can be cleaned up.
    shared = f"shared-{uuid.uuid4().hex}"
    os.environ[MARK] = shared
    # Two logical GPUs: placement of GPU replicas is tested without a GPU (nothing else asks).
    for attempt in (1, 2):
        try:
            ray.init(
                address="local",  # a private cluster, even where a Ray user runs one
                _temp_dir=start_dir(),  # its logs where the tests can read them
                num_cpus=4,
                num_gpus=2,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="WARNING",
                _metrics_export_port=metrics_port,
            )
            break
        except Exception as exc:
            # Ray waits a fixed 30 s for its raylet to register, which a loaded 2-core CI
            # machine can miss once; a second miss is a real failure.
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            for pid in marked_processes(shared):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    yield App(
        url=url,
        cfg=cfg,
        claude=claude_server,
        otlp=otlp_receiver,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(app: App) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app.url, timeout=120) as c:
        yield c
