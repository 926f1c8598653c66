"""A replica dies under steady load: no accepted request fails (reads go again to a live replica),
Serve replaces the replica, and the timeline shows the latency blip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import steady
from tests.reliability.conftest import kill_replica, replicas, wait_replaced

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def _out(rel, tmp_path: Path, name: str) -> Path:
    return Path("bench-out/reliability") / name if rel.long else tmp_path / name


@pytest.mark.parametrize("deployment", ["SLM", "Retriever"])
def test_replica_killed_under_load_loses_no_request(rel, tmp_path, deployment):
    before = replicas(deployment)
    assert len(before) == 2, before
    victim = before[0]
    duration = rel.scaled(20, 180)
    recovered: list[float] = []

    def fault() -> None:
        kill_replica(victim)
        recovered.append(wait_replaced(deployment, victim))

    results, fault_s = steady.run(
        rel.url, rel.key, duration_s=duration, clients=4, fault_at_s=duration / 4, fault=fault
    )
    assert recovered, "Serve did not replace the replica"
    after = replicas(deployment)
    summary = steady.report(
        _out(rel, tmp_path, f"kill-{deployment.lower()}"),
        f"{deployment} replica killed under load",
        results,
        fault_s,
        {"replaced_within_s": round(recovered[0], 1)},
    )
    print(summary)
    assert summary["requests"] > 40
    failed = [r for r in results if not r.ok]
    assert not failed, failed[:3]
    assert all(r.route == "slm" for r in results)
    # Serve replaced the replica: two running, the dead one gone, a new process in its place.
    assert len(after) == 2 and victim.actor_name not in {r.actor_name for r in after}
    assert victim.pid not in {r.pid for r in after}
    # Requests kept flowing after the kill, not only before it.
    assert sum(1 for r in results if r.scheduled > fault_s + 2) > 10
