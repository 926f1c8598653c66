"""GPU placement without a GPU: on the shared cluster's two logical GPUs, SLM replicas that ask
for a GPU get one each (distinct ids), and the retriever, orchestrator and ClaudeProxy take none.
The vLLM engine itself runs only where a real GPU is (tests/gpu/)."""

import time

import pytest
import ray
from ray import serve

from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.app import build
from tests.conftest import wait_ready

pytestmark = pytest.mark.integration

APP = "gpu-placement"


@pytest.fixture(scope="module")
def placed(app, tmp_path_factory):
    cfg = HybridServeConfig.load(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("gpu")),
            "http.port": app.cfg.http.port,
            "slm.num_gpus": 1,
            "slm.num_cpus": 0.1,
            "slm.threads": 1,
            "slm.autoscaling": {"min_replicas": 2, "max_replicas": 2},
            "retriever.num_cpus": 0.1,
            "orchestrator.num_cpus": 0.1,
        }
    )
    serve.run(build(cfg), name=APP, route_prefix="/gpu")
    wait_ready(app.url + "/gpu")
    yield cfg
    serve.delete(APP)


def placements(deployment: str, replicas: int) -> dict[int, dict]:
    """pid -> placement, from status calls until `replicas` distinct replicas answered."""
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < replicas and time.monotonic() < deadline:
        p = handle.status.remote().result()["placement"]
        seen[p["pid"]] = p
    return seen


def test_slm_replicas_get_one_gpu_each_and_nothing_else_does(placed):
    slm = placements("SLM", 2)
    assert len(slm) == 2  # min_replicas of the autoscaling config
    assert all(p["resources"].get("GPU") == 1 for p in slm.values())
    gpu_ids = sorted(tuple(p["gpu_ids"]) for p in slm.values())
    assert gpu_ids == [("0",), ("1",)]  # distinct, one each
    for name in ("Retriever", "Orchestrator", "ClaudeProxy"):
        (p,) = placements(name, 1).values()
        assert not p["resources"].get("GPU") and p["gpu_ids"] == [], name
    assert ray.available_resources().get("GPU", 0) == 0  # both logical GPUs are held
