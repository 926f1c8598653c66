"""Local start-up: a Ray cluster on this machine (or the one RAY_ADDRESS names), the application
deployed on it, and a progress display until /readyz is green."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hybrid_serve.config import HybridServeConfig, OrchestratorConfig, RetrieverConfig, SLMConfig
from hybrid_serve.engines.hardware import usable_cpus

READY_TIMEOUT_S = 600.0
# The key the command line sends (`ask`, `index add`, and `up` for /readyz's details).
API_KEY_ENV = "HYBRID_SERVE_API_KEY"


class StartupError(RuntimeError):
    pass


def required_cpus(cfg: HybridServeConfig) -> float:
    from hybrid_serve.engines.vllm_options import cpus_per_replica

    tier = cfg.llm.deploy
    return (
        cfg.slm.replicas * cpus_per_replica(cfg)
        + (tier.replicas * (tier.num_cpus + max(1.0, tier.num_cpus)) if tier.enabled else 0.0)
        + cfg.retriever.replicas * cfg.retriever.num_cpus
        + cfg.orchestrator.replicas * cfg.orchestrator.num_cpus
        + cfg.llm.num_cpus
        + 2 * cfg.cache.num_cpus  # AnswerCache and KeyLimits
    )


# The fixed ports Ray binds at start on a node (GCS, client server, dashboard, dashboard agent):
# 52365 lies in Linux's ephemeral range, so a port picked before Ray starts can collide with it.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback, and none Ray will take when it starts."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError as exc:
            raise StartupError(
                f"port {port} on {host} is in use; stop what holds it or pass --port"
            ) from exc


@dataclass
class RayTarget:
    """The cluster `up` runs on: one it joined (left running on exit) or one it started."""

    joined: bool
    address: str | None
    note: str


def discovered_address() -> str | None:
    """The cluster Ray would connect to with no address given: RAY_ADDRESS, else the one
    `ray start` recorded on this machine (or a lone running GCS), as `ray.init()` finds it. Ray's
    own lookup (`canonicalize_bootstrap_address`): public API offers it only inside `ray.init`,
    which then rejects the resources a new local cluster needs."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(None)  # type: ignore[arg-type]  # None: look it up
    except ValueError as exc:  # RAY_ADDRESS that is not host:port
        raise StartupError(f"RAY_ADDRESS: {exc}; use host:port, or unset it") from None


def _answers(address: str, timeout_s: float = 5.0) -> bool:
    """Whether anything listens at host:port: `ray.init` retries an unreachable GCS for minutes."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def use_local_token() -> None:
    """Clusters from `ray start` require token authentication (Ray 2.60), and a client connects
    with it only when RAY_AUTH_MODE says so, read once when Ray is imported: call this first.
    Where a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) it is used;
    a cluster without authentication accepts a client that sends one, and a local cluster `up`
    starts uses it too."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def _join_error(address: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "version" in text.lower() and "mismatch" in text.lower():
        return (
            f"cannot join the Ray cluster at {address}: {text[:300]}; install the Ray version the "
            "cluster runs, or pass --new-cluster"
        )
    if "token" in text.lower() or "auth" in text.lower() or "Failed to connect" in text:
        return (
            f"cannot join the Ray cluster at {address}: {text[:200]}; if it requires token "
            "authentication, set RAY_AUTH_TOKEN (or ~/.ray/auth_token) to its token and "
            "RAY_AUTH_MODE=token; or pass --new-cluster"
        )
    return f"cannot join the Ray cluster at {address}: {text[:300]}"


def init_ray(
    cfg: HybridServeConfig,
    metrics_port: int | None = None,
    address: str | None = None,
    new_cluster: bool = False,
) -> RayTarget:
    """Join the cluster `address` (or RAY_ADDRESS, or the one Ray finds running here) and leave it
    running on exit; with none, or with `new_cluster`, start a private local one sized for the
    configuration, with Ray's metrics endpoint on `metrics_port` when given."""
    import ray

    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
    named = address or os.environ.get("RAY_ADDRESS") or None
    target = None if new_cluster else (address or discovered_address())
    stale = None
    if target is not None and not _answers(target):
        if named:
            raise StartupError(
                f"no Ray cluster answers at {target}; start one (ray start --head), fix "
                "RAY_ADDRESS / --address, or pass --new-cluster to start a private one"
            )
        # Found only in what an earlier `ray start` recorded, and gone: start a new one.
        stale, target = target, None
    if target is not None:
        try:
            ray.init(address=target, **kwargs)
        except Exception as exc:
            raise StartupError(_join_error(target, exc)) from None
        res = ray.cluster_resources()
        return RayTarget(
            joined=True,
            address=target,
            note=f"joined the Ray cluster at {target}: {res.get('CPU', 0):g} CPUs, "
            f"{res.get('GPU', 0):g} GPUs; it stays running when this stops",
        )
    cores = usable_cpus()  # a container's CPU limit, not the node's cores
    # Logical CPUs are scheduling tokens: let a laptop run the configured replicas even when
    # they ask for more than it has, and say so.
    num_cpus = max(cores, int(required_cpus(cfg) + 0.999))
    if metrics_port:
        kwargs["_metrics_export_port"] = metrics_port
    # "local": a new cluster even where one is running (Ray would otherwise join that one).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    note = f"local Ray cluster, {num_cpus} logical CPUs"
    if num_cpus > cores:
        note += f" (oversubscribing {cores} cores)"
    if stale:
        note += f"; the cluster recorded at {stale} no longer answers"
    return RayTarget(joined=False, address=None, note=note)


def fit_to_cluster(cfg: HybridServeConfig) -> tuple[HybridServeConfig, str | None]:
    """The configuration with its CPU reservations scaled down to what a joined cluster has free
    (replica counts and GPUs are kept: too few GPUs is an error, not a smaller deployment)."""
    import ray

    free = ray.available_resources()
    need_gpus = gpus_required(cfg)
    if need_gpus > free.get("GPU", 0.0) + 1e-9:
        raise StartupError(
            f"the configuration needs {need_gpus:g} GPUs and the cluster has "
            f"{free.get('GPU', 0.0):g} free; lower slm.replicas, or join a cluster with GPUs"
        )
    need, have = required_cpus(cfg), free.get("CPU", 0.0)
    if need <= have or have <= 0:
        return cfg, None
    factor = have / need * 0.95
    sections: dict[str, SLMConfig | RetrieverConfig | OrchestratorConfig] = {
        "slm": cfg.slm,
        "retriever": cfg.retriever,
        "orchestrator": cfg.orchestrator,
    }
    update = {
        name: section.model_copy(update={"num_cpus": round(section.num_cpus * factor, 3)})
        for name, section in sections.items()
    }
    for name in ("claude", "cache"):
        section = getattr(cfg, name)
        update[name] = section.model_copy(update={"num_cpus": round(section.num_cpus * factor, 3)})
    fitted = cfg.model_copy(update=update)
    return fitted, (
        f"the deployments ask for {need:g} CPUs and the cluster has {have:g} free: CPU "
        f"reservations scaled by {factor:.2f}"
    )


def gpus_required(cfg: HybridServeConfig) -> float:
    from hybrid_serve.engines.vllm_options import gpus_per_replica, tier_gpus

    replicas = cfg.slm.autoscaling.min_replicas if cfg.slm.autoscaling else cfg.slm.replicas
    return (
        replicas * gpus_per_replica(cfg)
        + tier_gpus(cfg)
        + cfg.retriever.replicas * cfg.retriever.num_gpus
    )


def ensure_tier_key(cfg: HybridServeConfig) -> str | None:
    """The cluster's own LLM tier answers only with its key. A cluster `up` starts inherits
    this process's environment, so where the variable is unset a random key is made for the
    run (never printed); returns a line saying so."""
    if not cfg.llm.deploy.enabled or cfg.llm.base_url:
        return None
    var = cfg.llm.api_key_env
    if os.environ.get(var):
        return None
    os.environ[var] = secrets.token_urlsafe(32)
    return f"LLM tier key: a random one for this run (set {var} to choose it)"


PID_FILE = "up.pid"


def write_pid(cfg: HybridServeConfig) -> Path:
    """Where `hybrid-serve reload` finds the `up` serving this data_dir."""
    path = Path(cfg.data_dir) / PID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))
    return path


def up_pid(cfg: HybridServeConfig) -> int:
    """The pid of the `up` serving this data_dir; StartupError when there is none."""
    path = Path(cfg.data_dir) / PID_FILE
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        raise StartupError(f"no `hybrid-serve up` is running on {cfg.data_dir}") from None
    return pid


def redeploy(old: HybridServeConfig, new: HybridServeConfig) -> list[str]:
    """Apply `new` to the running applications: tunables in place (Serve's user_config), new
    replicas only for the deployments whose own settings changed (returned). Serve's HTTP
    address is fixed for the cluster's life."""
    from ray import serve

    from hybrid_serve.deployments.app import build, restarts

    if (old.http.host, old.http.port) != (new.http.host, new.http.port):
        raise StartupError("http.host and http.port take effect at the next start, not on reload")
    if old.llm.deploy.enabled != new.llm.deploy.enabled:
        raise StartupError("llm.deploy.enabled takes effect at the next start, not on reload")
    changed = restarts(old, new)
    targets = [serve.RunTarget(build(new), name=new.app_name, route_prefix="/")]
    if new.llm.deploy.enabled and "LLM tier" in changed:
        from hybrid_serve.deployments.llm_tier import build_llm_tier

        route = new.llm.deploy.route_prefix
        targets.append(
            serve.RunTarget(build_llm_tier(new), name=new.llm_app_name, route_prefix=route)
        )
    serve.run_many(targets)
    return changed


def client_headers(api_key: str | None = None) -> dict[str, str]:
    """What the command line sends the server: `api_key`, else HYBRID_SERVE_API_KEY."""
    key = api_key or os.environ.get(API_KEY_ENV)
    return {"authorization": f"Bearer {key}"} if key else {}


def deploy(
    cfg: HybridServeConfig,
    on_status: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> str:
    """Deploy and wait for /readyz; returns the URL. `on_status` gets a one-line progress,
    `on_note` what building the application chose or did (a model converted, a KV-cache size)."""
    from ray import serve

    from hybrid_serve.deployments.app import build
    from hybrid_serve.engines.vllm_model import ModelPreparationError

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    apps = {cfg.app_name: "/"}
    try:
        built = {cfg.app_name: build(cfg, progress=on_note or on_status)}
        if cfg.llm.deploy.enabled:
            from hybrid_serve.deployments.llm_tier import build_llm_tier

            built[cfg.llm_app_name] = build_llm_tier(cfg, progress=on_note or on_status)
            apps[cfg.llm_app_name] = cfg.llm.deploy.route_prefix
    except ModelPreparationError as exc:
        raise StartupError(str(exc)) from None
    errors: list[BaseException] = []
    # Together, so the tier's model loads while the rest starts.
    targets = [serve.RunTarget(built[n], name=n, route_prefix=p) for n, p in apps.items()]

    def run() -> None:
        try:
            serve.run_many(targets)
        except BaseException as exc:  # reported by the waiting loop below
            errors.append(exc)

    threading.Thread(target=run, daemon=True, name="serve-run").start()
    url = f"http://{cfg.local_host}:{serve_http_port(cfg)}"
    tier = cfg.llm.deploy
    timeout = READY_TIMEOUT_S + (tier.warmup_timeout_s if tier.enabled else 0.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if errors:
            raise StartupError(explain_failure(cfg, errors[0]))
        line = describe_progress(url)
        if line == "ready" and cfg.llm.deploy.enabled:
            line = _tier_progress(cfg)
        if line == "ready":
            return url
        if on_status:
            on_status(line)
        time.sleep(0.5)
    raise StartupError(
        f"not ready after {timeout:.0f} s: {describe_progress(url)}; see the Ray logs"
    )


def _tier_progress(cfg: HybridServeConfig) -> str:
    """'ready' once the LLM tier's application runs, or its deployment's state."""
    from ray import serve

    app = serve.status().applications.get(cfg.llm_app_name)
    if app is not None and str(app.status.value) == "RUNNING":
        return "ready"
    deployments = app.deployments if app is not None else {}
    states = [f"{n}: {str(d.status.value).lower()}" for n, d in deployments.items()]
    return "LLM tier — " + (", ".join(states) or "deploying")


def serve_http_port(cfg: HybridServeConfig) -> int:
    """The port Serve's proxies listen on: ours, unless a joined cluster's Serve was already
    running, which keeps its own (Serve applies HTTP options only when it starts)."""
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
        return int(client.http_config.port) if client is not None else cfg.http.port
    except Exception:
        return cfg.http.port


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
    if deployment.startswith("LLM:"):
        return (
            "check the llm.deploy settings (model_source, device, tensor_parallel_size, "
            "max_model_len against the memory there); the replica's log is under "
            "/tmp/ray/session_latest/logs/serve"
        )
    return "see the replica's log under /tmp/ray/session_latest/logs (serve/ and worker-*.err)"


def explain_failure(cfg: HybridServeConfig, error: BaseException) -> str:
    """Which deployment could not start, what killed its replicas, and what to do about it."""
    from ray import serve

    from hybrid_serve.deployments.health import replica_deaths, startup_error

    try:
        applications = serve.status().applications
        deployments = [
            (app, name, status)
            for app in (cfg.app_name, cfg.llm_app_name)
            if app in applications
            for name, status in applications[app].deployments.items()
        ]
    except Exception:
        return f"deployment failed: {error}"
    parts: list[str] = []
    for app, name, status in deployments:
        if str(status.status.value) not in ("DEPLOY_FAILED", "UNHEALTHY"):
            continue
        deaths = replica_deaths(app, name)
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
        r = httpx.get(f"{url}/readyz", headers=client_headers(), timeout=5.0)
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


def shutdown(cfg: HybridServeConfig, target: RayTarget | None) -> None:
    """Remove what `up` deployed. A joined cluster keeps running, with its other Serve
    applications; a cluster `up` started stops with it."""
    import ray
    from ray import serve

    try:
        if target is not None and target.joined:
            serve.delete(cfg.app_name)
            if cfg.llm.deploy.enabled:
                serve.delete(cfg.llm_app_name)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()
