"""`hybrid-serve up` beside a Ray cluster a Ray user already runs (`ray start --head`): it joins
it, says so, serves, and on Ctrl-C removes only its own application; `--new-cluster` starts a
private one instead; an address where nothing answers is a one-line error.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray.util

from tests.conftest import free_port, wait_ready
from tests.support.cli import CLI, MARK, STARTED, Up, clean_env

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

OTHER_APP = """
import sys, ray
from ray import serve

@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class Other:
    async def __call__(self, request):
        return "other app"

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
serve.run(Other.bind(), name="other", route_prefix="/other")
"""


def client_env() -> dict[str, str]:
    """A Ray user's client of a `ray start` cluster: token authentication on (Ray 2.60)."""
    return {**clean_env(), "RAY_AUTH_MODE": "token"}


class RayHead:
    """`ray start --head --block` with a marker in its environment, so that teardown stops
    exactly this cluster's processes (`ray stop` would stop every Ray cluster on the machine)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        # Ray binds its GCS to the node's address, as `ray start` prints it.
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self.mark = uuid.uuid4().hex
        self.log = open(tmp / "ray-head.log", "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--num-cpus=4",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**clean_env(), MARK: self.mark},
            start_new_session=True,
        )

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ray.scripts.scripts",
                    "status",
                    f"--address={self.address}",
                ],
                capture_output=True,
                text=True,
                env=client_env(),
            )
            if r.returncode == 0:
                return
            time.sleep(2)
        pytest.fail(f"ray start did not come up: {Path(self.log.name).read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        finally:
            needle = f"{MARK}={self.mark}".encode()
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and needle in (proc / "environ").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
            # What `ray start` recorded for `ray.init()` to find, as `ray stop` removes it.
            from ray._private.utils import get_ray_address_file

            recorded = Path(get_ray_address_file(None))
            if recorded.is_file() and recorded.read_text().strip().endswith(f":{self.port}"):
                recorded.unlink()
            self.log.close()


def test_up_joins_a_running_cluster_and_leaves_it_running(tmp_path):
    head = RayHead(tmp_path)
    try:
        head.wait()
        http_port = free_port()
        other = subprocess.run(
            [sys.executable, "-c", OTHER_APP, head.address, str(http_port)],
            capture_output=True,
            text=True,
            timeout=300,
            env=client_env(),
        )
        assert other.returncode == 0, other.stderr[-2000:]
        assert httpx.get(f"http://127.0.0.1:{http_port}/other", timeout=30).text == "other app"

        # No RAY_ADDRESS: found the way `ray.init()` finds it, from what `ray start` recorded.
        up = Up(tmp_path / "data", http_port)
        try:
            out = up.wait_for(STARTED)
            assert f"joined the Ray cluster at {head.address}" in out and "stays running" in out
            assert "oversubscribing" not in out and "local Ray cluster" not in out
            wait_ready(up.url)
            r = httpx.post(f"{up.url}/v1/answer", json={"query": "What port?"}, timeout=120)
            assert r.status_code == 200
        finally:
            assert up.stop() == 0
        assert "the joined Ray cluster keeps running" in up.log.read_text()
        assert head.alive()
        # Its other application is still served; ours is gone.
        assert httpx.get(f"http://127.0.0.1:{http_port}/other", timeout=30).text == "other app"
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=30).status_code == 404

        # --new-cluster: a private cluster beside the running one, stopped with `up`.
        mine = Up(
            tmp_path / "data2",
            free_port(),
            "--new-cluster",
            env={"HYBRID_SERVE_RETRIEVER__INDEX_SAMPLE_CORPUS": "false"},  # not asked anything
        )
        try:
            assert "local Ray cluster" in mine.wait_for(STARTED)
        finally:
            assert mine.stop() == 0
        assert head.alive()
        assert httpx.get(f"http://127.0.0.1:{http_port}/other", timeout=30).text == "other app"
    finally:
        head.stop()


def test_unreachable_address_is_a_one_line_error(tmp_path):
    env = {**clean_env(), "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    started = time.monotonic()
    r = subprocess.run(
        [*CLI, "up", "--data-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1
    assert "no Ray cluster answers at" in r.stderr and "--new-cluster" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert time.monotonic() - started < 60
