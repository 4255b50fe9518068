"""Small helpers the benchmark parts share: the spread of repeated measurements, pairwise ratios, params."""
import dataclasses
import statistics
import time

from stages.config import UserError, load_section


def spread(values, digits=3):
    """{"min", "median", "max", "n"} of repeated measurements (None when there are none)."""
    v = sorted(float(x) for x in values if x is not None)
    if not v:
        return None
    return {"min": round(v[0], digits), "median": round(statistics.median(v), digits),
            "max": round(v[-1], digits), "n": len(v)}


def pairwise(a, b, digits=3):
    """The spread of a[i] / b[i]: each ratio from two measurements taken side by side in the same run."""
    return spread([x / y for x, y in zip(a, b) if x is not None and y], digits)


def wall(fn, *args, **kw):
    """(fn's result, wall-clock seconds it took)."""
    t = time.perf_counter()
    result = fn(*args, **kw)
    return result, time.perf_counter() - t


def section(cls, name, **overrides):
    """params.yaml's `name` section as `cls` (its defaults when the section is absent), then `overrides`."""
    try:
        p = load_section(cls, name)
    except UserError as e:
        if "is missing" not in str(e):
            raise
        p = cls()
    return dataclasses.replace(p, **overrides)
