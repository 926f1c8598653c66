"""Why a deployment is not serving: Serve's own state for it, and the replicas Ray saw die, each
with the cause its worker's log shows (the signal, the exception, the last lines).

Used by `/readyz` (which says which deployment is not ready and how often its replicas died) and by
`hybrid-serve up` (which stops with that cause instead of waiting for a cluster that cannot answer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What Python's faulthandler (on in every Ray worker) writes when the process dies of a signal.
FATAL_SIGNALS = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Illegal instruction": "SIGILL",
    "Floating point exception": "SIGFPE",
}
# Deaths that are the process's own doing, not Serve stopping or Ray killing the replica.
CRASH_REASONS = {"WORKER_DIED", "OUT_OF_MEMORY", "NODE_DIED"}
LOG_TAIL_LINES = 12


@dataclass
class ReplicaDeath:
    replica: str
    pid: int
    node_ip: str
    cause: str
    log_tail: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"replica {self.replica} (pid {self.pid}) died: {self.cause}"


def _logs_dir() -> Path | None:
    import ray._private.worker as worker

    node = worker._global_node or getattr(worker.global_worker, "node", None)
    try:
        return Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:
        return None


def crash_from_log(text: str) -> tuple[str | None, list[str]]:
    """(signal name, the lines from the fatal error on) of a worker's stderr; (None, last lines)
    when it shows no fatal signal."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"Fatal Python error: (.+)", line.strip())
        if m and m.group(1).strip() in FATAL_SIGNALS:
            return FATAL_SIGNALS[m.group(1).strip()], lines[i : i + LOG_TAIL_LINES]
    return None, [ln for ln in lines if ln.strip()][-LOG_TAIL_LINES:]


def _reason(death_cause: Any) -> str | None:
    """WORKER_DIED, RAY_KILL, OUT_OF_MEMORY, … from Ray's ActorDeathCause message."""
    if death_cause is None:
        return None
    kind = death_cause.WhichOneof("context")
    if kind == "oom_context":
        return "OUT_OF_MEMORY"
    if kind == "actor_died_error_context":
        context = death_cause.actor_died_error_context
        return type(context).Reason.Name(context.reason)
    return kind


def _death(info: dict[str, Any], logs: Path | None) -> ReplicaDeath | None:
    reason = _reason(info.get("DeathCause"))
    if reason is not None and reason not in CRASH_REASONS:
        return None  # stopped by Serve or by an operator: not a crash
    pid = int(info.get("Pid") or 0)
    # Serve names a replica's actor SERVE_REPLICA::<app>#<deployment>#<id>.
    name = str(info.get("Name") or info.get("ActorID"))
    replica = "#".join(name.split("::", 1)[-1].split("#")[1:]) or name
    node_ip = str((info.get("Address") or {}).get("IPAddress", ""))
    cause = "its process exited unexpectedly"
    if reason == "OUT_OF_MEMORY":
        cause = "killed for using too much memory (out of memory)"
    elif reason == "NODE_DIED":
        cause = f"its node {node_ip} died"
    tail: list[str] = []
    log = next(iter(sorted(logs.glob(f"worker-*-{pid}.err"))), None) if logs and pid else None
    if log is not None:
        signal_name, tail = crash_from_log(log.read_text(errors="replace"))
        if signal_name:
            cause = f"{signal_name} (a crash in native code)"
    elif pid:
        cause += f" (its log is on node {node_ip})"
    return ReplicaDeath(replica=replica, pid=pid, node_ip=node_ip, cause=cause, log_tail=tail)


def replica_deaths(app: str, deployment: str) -> list[ReplicaDeath]:
    """Replicas of `deployment` whose process died, oldest first. Read from Ray's GCS actor table
    (`ray._private.state.actors`): the public state API needs the Ray dashboard, which clusters
    often run without."""
    import ray._private.state as ray_state

    wanted = f"ServeReplica:{app}:{deployment}"
    logs = _logs_dir()
    dead = [
        info
        for info in ray_state.actors(actor_state_name="DEAD").values()
        if info.get("ActorClassName") == wanted
    ]
    dead.sort(key=lambda info: info.get("EndTime") or 0)
    return [d for info in dead if (d := _death(info, logs)) is not None]


def startup_error(message: str) -> str:
    """The last line of the exception Serve reports for a replica that failed to start."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Failed|Died)\b.*:", line) or "Error: " in line:
            return line
    return lines[-1] if lines else ""


def deployment_health(app: str, deployment: str) -> dict[str, Any]:
    """Serve's status of one deployment and its replicas' crashes, for `/readyz`."""
    from ray import serve

    out: dict[str, Any] = {"deployment": deployment}
    try:
        status = serve.status().applications[app].deployments[deployment]
    except Exception as exc:  # the controller is unreachable or the app is gone
        out.update(status="unknown", message=type(exc).__name__)
    else:
        out["status"] = str(status.status.value)
        if status.message:
            out["message"] = startup_error(status.message) or status.message[:300]
    try:
        deaths = replica_deaths(app, deployment)
    except Exception:
        return out
    out["restarts"] = len(deaths)
    if deaths:
        out["last_death"] = deaths[-1].describe()
    return out
