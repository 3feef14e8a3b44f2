"""Print exact pins for the image: livedge's runtime dependencies (with the ``fast`` extra), at the
versions installed in the virtualenv that runs this script.

Usage: .venv/bin/python deploy/lock.py > deploy/constraints.txt

Only what ``pip install 'livedge[fast]'`` installs is listed, found through the installed
distributions' own ``Requires-Dist`` metadata, so test and tooling packages in the virtualenv never
reach the image. Markers are evaluated for every interpreter the image may run on (``TARGETS``): the
official ``python:3.11-slim-bookworm`` image carries a recent 3.11, the locally built Debian base
carries bookworm's 3.11.2, and some packages need a backport below 3.11.3 (redis: async-timeout).
A requirement no installed distribution satisfies is an error naming what to install first.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "livedge"
IMAGE_EXTRAS = ("fast",)
# Marker environments besides this interpreter's: Debian bookworm's python3 (the local base image).
TARGETS: tuple[dict[str, str], ...] = ({"python_full_version": "3.11.2", "python_version": "3.11"},)


def _applies(requirement: Requirement, extras: frozenset[str],
             targets: tuple[dict[str, str], ...]) -> bool:
    if requirement.marker is None:
        return True
    # An extra's requirements carry the marker `extra == "x"`: evaluate once per wanted extra, and
    # once with none for the unconditional ones; each in every target environment.
    for target in ({}, *targets):
        for extra in (*extras, ""):
            if requirement.marker.evaluate({**target, "extra": extra}):
                return True
    return False


def runtime_requirements(project: str = PROJECT, extras: tuple[str, ...] = IMAGE_EXTRAS,
                         targets: tuple[dict[str, str], ...] = TARGETS) -> dict[str, str | None]:
    """Canonical name -> installed version (``None`` when not installed here) of every distribution
    ``project[extras]`` needs on any of ``targets``, not counting ``project`` itself."""
    found: dict[str, str | None] = {}
    pending: list[tuple[str, frozenset[str]]] = [(project, frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted = pending.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[canonicalize_name(name)] = None
            continue
        found[canonicalize_name(name)] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if _applies(requirement, wanted, targets):
                pending.append((requirement.name, frozenset(requirement.extras)))
    found.pop(canonicalize_name(project))
    return found


def main() -> int:
    pins = runtime_requirements()
    missing = sorted(name for name, version in pins.items() if version is None)
    if missing:
        print(f"lock.py: not installed here, so no version to pin: {', '.join(missing)}; "
              f"pip install them into this virtualenv first", file=sys.stderr)
        return 1
    print(f"# Exact versions for the image: {PROJECT}[{','.join(IMAGE_EXTRAS)}] and what it needs")
    print("# on Python 3.11.2 (Debian bookworm) and newer 3.11 releases. Do not edit by hand:")
    print("# .venv/bin/python deploy/lock.py > deploy/constraints.txt")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
