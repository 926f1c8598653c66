"""What the machine offers the engines: CPU instruction sets and visible GPUs.

Read from the kernel and the driver, not from the engines' own builds: a llama.cpp compiled on one
machine can run on another, and the choices that keep it safe depend on where it runs.
"""

from __future__ import annotations

import functools
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


def cpu_summary() -> dict[str, object]:
    flags = cpu_flags()
    return {
        "machine": platform.machine(),
        "amx": has_amx(flags),
        "avx512": None if flags is None else any(f in flags for f in AVX512_FLAGS),
        "avx2": None if flags is None else "avx2" in flags,
        "flags_known": flags is not None,
    }


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
