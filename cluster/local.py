"""Local start-up: a Ray cluster on this machine (or the one RAY_ADDRESS names), the application
deployed on it, and a progress display until /readyz is green."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from cluster.config import HybridServeConfig

READY_TIMEOUT_S = 600.0


class StartupError(RuntimeError):
    pass


def required_cpus(cfg: HybridServeConfig) -> float:
    return (
        cfg.slm.replicas * cfg.slm.num_cpus
        + cfg.retriever.replicas * cfg.retriever.num_cpus
        + cfg.orchestrator.replicas * cfg.orchestrator.num_cpus
        + cfg.claude.num_cpus
    )


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError as exc:
            raise StartupError(
                f"port {port} on {host} is in use; stop what holds it or pass --port"
            ) from exc


def init_ray(cfg: HybridServeConfig, metrics_port: int | None = None) -> str:
    """Join RAY_ADDRESS if set, else start a local cluster sized for the configuration, with
    Ray's metrics endpoint on `metrics_port` when given."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **kwargs)
        return f"joined {address}"
    cores = os.cpu_count() or 1
    # Logical CPUs are scheduling tokens: let a laptop run the configured replicas even when
    # they ask for more than it has, and say so.
    num_cpus = max(cores, int(required_cpus(cfg) + 0.999))
    if metrics_port:
        kwargs["_metrics_export_port"] = metrics_port
    ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    note = f"local Ray cluster, {num_cpus} logical CPUs"
    if num_cpus > cores:
        note += f" (oversubscribing {cores} cores)"
    return note


def deploy(cfg: HybridServeConfig, on_status: Callable[[str], None] | None = None) -> str:
    """Deploy and wait for /readyz; returns the URL. `on_status` gets a one-line progress."""
    from ray import serve

    from deployments.app import build

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(build(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
        except BaseException as exc:  # reported by the waiting loop below
            errors.append(exc)

    threading.Thread(target=run, daemon=True, name="serve-run").start()
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "") else cfg.http.host
    url = f"http://{host}:{cfg.http.port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if errors:
            raise StartupError(explain_failure(cfg, errors[0]))
        line = describe_progress(url)
        if line == "ready":
            return url
        if on_status:
            on_status(line)
        time.sleep(0.5)
    raise StartupError(
        f"not ready after {READY_TIMEOUT_S:.0f} s: {describe_progress(url)}; see the Ray logs"
    )


def _remedy(cfg: HybridServeConfig, deployment: str, cause: str) -> str:
    if deployment.startswith("SLM"):
        if "SIGSEGV" in cause and cfg.slm.engine == "llama_cpp":
            return (
                "run `hybrid-serve doctor`; if the CPU has AMX, or to rule out llama.cpp's weight "
                "repacking, set slm.llama_cpp.extra_buffers: off "
                "(HYBRID_SERVE_SLM__LLAMA_CPP__EXTRA_BUFFERS=off)"
            )
        if "SIGILL" in cause:
            return (
                "the engine was compiled for another CPU: reinstall it on this machine "
                "(pip install --force-reinstall --no-cache-dir llama-cpp-python)"
            )
        if "memory" in cause:
            return "give the SLM replicas more memory, or lower slm.contexts_per_replica / n_ctx"
        return (
            f"check the slm settings (engine {cfg.slm.engine!r}); `hybrid-serve doctor` runs the "
            "engine on its own and shows its error"
        )
    return "see the replica's log under /tmp/ray/session_latest/logs (serve/ and worker-*.err)"


def explain_failure(cfg: HybridServeConfig, error: BaseException) -> str:
    """Which deployment could not start, what killed its replicas, and what to do about it."""
    from ray import serve

    from deployments.health import replica_deaths, startup_error

    try:
        deployments = serve.status().applications[cfg.app_name].deployments
    except Exception:
        return f"deployment failed: {error}"
    parts: list[str] = []
    for name, status in deployments.items():
        if str(status.status.value) not in ("DEPLOY_FAILED", "UNHEALTHY"):
            continue
        deaths = replica_deaths(cfg.app_name, name)
        if deaths:
            last = deaths[-1]
            cause = last.cause
            lines = [
                f"the {name} deployment could not start: {last.describe()}"
                + (f"; {len(deaths)} replica(s) died in all" if len(deaths) > 1 else "")
            ]
            if last.log_tail:
                lines.append("  its log ends:")
                lines.extend(f"    {ln}" for ln in last.log_tail)
        else:
            cause = startup_error(status.message) or status.message[:500]
            lines = [f"the {name} deployment could not start: {cause}"]
        lines.append(f"  remedy: {_remedy(cfg, name, cause)}")
        parts.append("\n".join(lines))
    return "\n".join(parts) or f"deployment failed: {error}"


def describe_progress(url: str) -> str:
    """'ready', or what the cluster is doing now, from /readyz or Serve's status."""
    try:
        r = httpx.get(f"{url}/readyz", timeout=5.0)
        if r.status_code == 200:
            return "ready"
        body = r.json()
        parts = []
        for name, c in body.get("components", {}).items():
            if c.get("ready"):
                continue
            state = c.get("state") or c.get("error") or "starting"
            if c.get("restarts"):
                state += f", {c['restarts']} replica crash(es): {c.get('last_death', '')}"
            prog = c.get("progress") or {}
            if prog.get("total"):
                state += f" {prog['done']}/{prog['total']} chunks"
            parts.append(f"{name}: {state}")
        return "; ".join(parts) or "starting"
    except (httpx.HTTPError, ValueError):
        pass
    try:
        from ray import serve

        apps = serve.status().applications
        parts = []
        for app in apps.values():
            for name, d in app.deployments.items():
                parts.append(f"{name}: {str(d.status.value).lower()}")
        return "deploying — " + ", ".join(parts) if parts else "starting Serve"
    except Exception:
        return "starting Serve"


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
