"""The CPUs an engine may use: the affinity mask capped by the cgroup's CPU quota (a Kubernetes
CPU limit), not the node's cores."""

import os
from pathlib import Path

from hybrid_serve.config import SLMConfig
from hybrid_serve.engines.hardware import cgroup_cpu_limit, usable_cpus
from hybrid_serve.engines.llama_cpp import default_threads


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_a_cgroup_v2_limit_caps_the_cpus_rounded_down(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None and usable_cpus(tmp_path) == affinity()


def test_a_cgroup_v1_quota_caps_the_cpus_and_minus_one_is_none(tmp_path: Path):
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None and usable_cpus(tmp_path) == affinity()
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU: still one thread
    assert cgroup_cpu_limit(tmp_path) == 0.5 and usable_cpus(tmp_path) == 1


def test_a_limit_above_the_affinity_leaves_the_affinity(tmp_path: Path):
    (tmp_path / "cpu.max").write_text(f"{(affinity() + 8) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == affinity()
    assert usable_cpus(tmp_path / "absent") == affinity()  # no cgroup files: no limit


def test_llama_threads_share_the_usable_cpus_between_the_replicas_on_the_node():
    assert default_threads(SLMConfig(threads=3), replicas_on_node=2) == 3  # configured
    assert default_threads(SLMConfig(), replicas_on_node=1) == usable_cpus()
    assert default_threads(SLMConfig(), replicas_on_node=64) == 1
