"""The machine a figure or an artifact came from: the CPU facts that decide float results and INT8 speed.

TRAPS.md: trained weights differ in the last bits between AVX2 and AVX-512 machines, and static INT8 is slower
than FP32 without VNNI and faster with it. Every artifact whose bytes or choice depend on that (checkpoint,
deploy card, benchmark tables) records `cpu()`; the server compares it with its own. Torch-free: the server
imports this.
"""
import os
import platform
from pathlib import Path

# The instruction-set extensions that change float kernels or INT8 speed, in /proc/cpuinfo's spelling.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu():
    """{"model", "cores", "flags"} for this machine; `flags` lists the present members of FLAGS in order."""
    model, present = platform.processor(), set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == platform.processor():
                model = value.strip()
            elif key.strip() == "flags" and not present:
                present = set(value.split())
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in present]}


def describe(c=None):
    """One line: 'AMD EPYC, 2 cores, avx2 avx512f avx512_vnni'."""
    c = c or cpu()
    return f"{c['model']}, {c['cores']} cores, {' '.join(c['flags']) or 'no AVX2'}"


def differences(built, here=None):
    """What differs between the CPU an artifact was built on and this one, as short phrases; [] when the same.
    The core count is left out: it changes speed, not which variant is right."""
    here = here or cpu()
    out = []
    if built.get("model") != here["model"]:
        out.append(f"model {built.get('model')!r} vs {here['model']!r} here")
    gone, new = sorted(set(built.get("flags", [])) - set(here["flags"])), \
        sorted(set(here["flags"]) - set(built.get("flags", [])))
    if gone:
        out.append("built with " + " ".join(gone) + ", absent here")
    if new:
        out.append(" ".join(new) + " here, absent where built")
    return out
