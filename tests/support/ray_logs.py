"""What the session's Ray cluster has written to its log directory (replicas' stderr included)."""

from pathlib import Path


def ray_log_lines() -> list[str]:
    """Every line of every file under the running cluster's log directory."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines: list[str] = []
    for path in logs.rglob("*"):
        if path.is_file():
            lines.extend(path.read_text(errors="replace").splitlines())
    return lines
