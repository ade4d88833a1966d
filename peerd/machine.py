"""What a measurement ran on, recorded beside its figures by every benchmark and by
`peerd draft measure|train`: hosts of the same size differ by tens of percent (an AVX2
CPU emulates bfloat16; one that multiplies it natively does not), so a figure means
little without the CPU it came from (bench/README.md).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

SIMD = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # what torch's CPU kernels use


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), as Linux reports it;
    elsewhere what `platform` knows."""
    return cpuinfo().get("model name") or platform.processor() or "unknown"


def cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@functools.cache
def cpu_bf16_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX). Elsewhere
    (AVX2 only: most AMD and consumer Intel CPUs) torch emulates bfloat16, and a
    product of many rows (training's) runs many times slower than in float32
    (bench/README.md)."""
    import torch

    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)())
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def describe() -> dict[str, Any]:
    """The host: CPU, cores, memory, whether it multiplies bfloat16 natively, and the
    Python, torch and OS it ran."""
    import psutil
    import torch

    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"cpu": cpu_name(), "cores": cores(), "bf16_native": cpu_bf16_fast(),
            # the same name covers generations apart in speed (an "AMD EPYC" of family
            # 23 is Zen 2, of 25 Zen 3/4): family and model tell them apart
            "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "mhz": round(float(info.get("cpu MHz", "0") or 0)),
            "simd": [f for f in SIMD if f in flags],
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}
