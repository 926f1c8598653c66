"""What the machine offers the engines: CPU instruction sets and visible GPUs.

Read from the kernel and the driver, not from the engines' own builds: a llama.cpp compiled on one
machine can run on another, and the choices that keep it safe depend on where it runs.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

# Flags that name an instruction-set family the engines care about, as /proc/cpuinfo spells them.
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")


def _cpuinfo(*keys: str) -> str | None:
    """The first CPU's value of the first of `keys` /proc/cpuinfo has (None: not Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags, or None where the platform does not say (not Linux)."""
    flags = _cpuinfo("flags", "Features")  # x86 and Arm spell it differently
    return None if flags is None else frozenset(flags.split())


@functools.cache
def cpu_model() -> str | None:
    """The CPU's model name, or None where the platform does not say."""
    return _cpuinfo("model name")


def has_amx(flags: frozenset[str] | None = None) -> bool | None:
    """Whether the CPU has Intel AMX tiles; None when unknown."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return any(f in flags for f in AMX_FLAGS)


def has_wide_vectors(flags: frozenset[str] | None) -> bool:
    """AVX-512 or AMX: where vLLM's CPU build batches well and compiles correctly (False when
    the flags are unknown)."""
    return flags is not None and any(f in flags for f in (*AVX512_FLAGS, *AMX_FLAGS))


def cpu_summary() -> dict[str, object]:
    flags = cpu_flags()
    return {
        "machine": platform.machine(),
        "amx": has_amx(flags),
        "avx512": None if flags is None else any(f in flags for f in AVX512_FLAGS),
        "avx2": None if flags is None else "avx2" in flags,
        "flags_known": flags is not None,
    }


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (a Kubernetes CPU limit, `docker --cpus`),
    None where there is none. cgroup v2's `cpu.max` ("400000 100000", or "max ..."), else v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none); the process's own cgroup (from
    /proc/self/cgroup) first, then the mount's root, which is the container's own under a
    cgroup namespace."""
    own = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, path = line.split(":", 2)
            if hierarchy == "0":
                own = path.lstrip("/")
    except (OSError, ValueError):
        pass
    for base in dict.fromkeys((root / own, root)):  # v2, the process's cgroup first
        try:
            quota, period = (base / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process can run on at once: the ones its affinity allows, capped by its
    cgroup's quota (rounded down, at least one). `os.cpu_count()` is the node's cores — in a pod
    limited to 4 CPUs on a 64-core node, an engine with a thread per node core is throttled most
    of each period while its threads wait at barriers for the ones the quota stopped. Written
    here because neither Python (3.13's `os.process_cpu_count` reads the affinity only) nor
    psutil reads the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def nvidia_gpus(timeout_s: float = 10.0) -> list[str]:
    """GPU names the NVIDIA driver lists (`nvidia-smi -L`); empty without a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "-L"], capture_output=True, text=True, timeout=timeout_s, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]
