"""`hybrid-serve up` in a subprocess, as a user starts it (its own session, so a test can signal
it, or SIGKILL its whole process tree)."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "hybrid_serve.cluster.cli"]
# The last line `up` prints at start-up: everything it says about the start is written by then
# ("serving on" comes earlier, before the notes about metrics and keys).
STARTED = "Ctrl-C to stop"


def clean_env() -> dict[str, str]:
    """As on a fresh machine: no Claude key, no cluster to join."""
    drop = {"ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "RAY_ADDRESS"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("OTEL_")}


REPO = Path(__file__).resolve().parents[2]
MARK = "HYBRID_SERVE_TEST_UP"  # set in every `up` a test starts; its processes inherit it


def engine_env(engine: str) -> dict[str, str]:
    """Environment that selects a test engine from tests.support (importable by Ray workers:
    the checkout goes at the end of the path, after whatever provides `hybrid_serve`)."""
    path = [p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p]
    return {"HYBRID_SERVE_SLM__ENGINE": engine, "PYTHONPATH": os.pathsep.join(path)}


class Up:
    def __init__(
        self, data_dir: Path, port: int, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.mark = uuid.uuid4().hex
        env = {
            **clean_env(),
            "HYBRID_SERVE_SLM__MAX_TOKENS": "32",
            "PYTHONUNBUFFERED": "1",
            MARK: self.mark,
            **(env or {}),
        }
        self.log = data_dir.parent / f"up-{port}-{time.time_ns()}.log"
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(
            [*CLI, "up", "--port", str(port), "--data-dir", str(data_dir), *extra],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"

    def wait_for(self, needle: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                pytest.fail(f"`up` exited {self.proc.returncode}:\n{text}")
            time.sleep(0.5)
        pytest.fail(f"{needle!r} not printed in {timeout}s:\n{self.log.read_text()}")

    def wait_exit(self, timeout: float) -> int:
        """The exit code of an `up` expected to stop on its own within `timeout`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"`up` still running after {timeout}s:\n{self.log.read_text()}")
        finally:
            self.out.close()

    def leftover_processes(self) -> list[int]:
        """Live processes that inherited this `up`'s environment (Ray's GCS, raylet, workers),
        wherever they were re-parented: what `up` left behind."""
        return marked_processes(self.mark)

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.out.close()

    def descendants(self) -> list[int]:
        """Every process started under `up`: Ray's GCS, raylet, workers, replicas."""
        children: dict[int, list[int]] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(proc.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def kill_all(self) -> list[int]:
        """SIGKILL `up` and every Ray process it started at once: a node losing power. The tree
        under `up` goes first, then whatever was outside it (re-parented, or started while the
        tree was read), until nothing of this `up` is left to outlive the "power loss"."""
        pids = self.descendants()
        for pid in pids:
            _kill(pid)
        self.proc.wait(timeout=30)
        self.out.close()
        deadline = time.monotonic() + 30
        while (left := self.leftover_processes()) and time.monotonic() < deadline:
            for pid in left:
                _kill(pid)
            pids.extend(p for p in left if p not in pids)
            time.sleep(0.2)
        return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def marked_processes(mark: str | None = None) -> list[int]:
    """Live processes started by a test's `up` (that one's when `mark` is given, else any)."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        found = next((e for e in environ if e.startswith(f"{MARK}=".encode())), None)
        if state != "Z" and found and (mark is None or found == f"{MARK}={mark}".encode()):
            left.append(int(proc.name))
    return left


def wait_quiet(timeout: float = 90.0) -> list[int]:
    """Wait until every test `up`'s processes have exited (a Ray cluster winds down for a few
    seconds after `up` returns); SIGKILL what is still there after `timeout`, so the next cluster
    starts on a machine that is not still busy with the last one. Returns what was killed."""
    deadline = time.monotonic() + timeout
    while (left := marked_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        _kill(pid)
    return left
