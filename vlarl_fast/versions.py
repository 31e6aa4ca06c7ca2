"""The tested range of the dependencies whose releases break things most often.

The floors are read from this distribution's own metadata (pyproject.toml is their one source; CI
installs exactly those floors in a second environment and runs the policy, OpenVLA, decoding and env
tests there). The upper ends are the newest releases the test suites have passed on. A version outside
the range is not refused, only reported by ``vlarl-fast info``: newer releases usually work, and the
report says what to install when they do not.
"""
from __future__ import annotations

import importlib.metadata as md
import re

# newest (major, minor) each suite has passed on: CPU CI and the GPU tier (pytest -m gpu)
NEWEST_TESTED = {"torch": (2, 13), "transformers": (5, 25), "numpy": (2, 4), "mujoco": (3, 9)}
# the floors CI installs when this package's metadata cannot be read (a source tree)
FALLBACK_FLOORS = {"torch": "2.11", "transformers": "5.4.0", "numpy": "1.26.4", "mujoco": "3.8.1"}


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; local tags such as '+cpu' and pre-release tails dropped."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0].split("rc")[0].split("a")[0])[:3])


def declared_floors() -> dict[str, str]:
    """{package: lowest supported version} from the installed distribution's requirements."""
    try:
        reqs = md.requires("vlarl-fast") or []
    except md.PackageNotFoundError:
        return dict(FALLBACK_FLOORS)
    floors = {}
    for req in reqs:
        if "extra ==" in req:
            continue
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)", req)
        if m and m.group(1).lower() in NEWEST_TESTED:
            floor = re.search(r">=\s*([0-9][0-9.]*)", m.group(2))
            if floor:
                floors[m.group(1).lower()] = floor.group(1)
    return floors or dict(FALLBACK_FLOORS)


def version_warnings(installed: dict[str, str | None], floors: dict[str, str] | None = None) -> list[str]:
    """One line per core dependency outside the tested range, naming the fix."""
    floors = declared_floors() if floors is None else floors
    out = []
    for name, newest in NEWEST_TESTED.items():
        have = installed.get(name)
        if not have:
            continue
        floor = floors.get(name)
        if floor and _release(have) < _release(floor):
            out.append(f"{name} {have} is older than the oldest tested release ({floor}). "
                       f"Fix: `pip install '{name}>={floor}'`")
        elif _release(have)[:2] > newest:
            top = ".".join(map(str, newest))
            out.append(f"{name} {have} is newer than the newest tested release ({top}.x): it usually works; "
                       f"if something breaks, `pip install '{name}<{newest[0]}.{newest[1] + 1}'`")
    return out
