"""The build's promises: what CI installs is pinned, the lower bounds in
pyproject.toml are the ones CI tests, and pre-commit runs CI's versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(path: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", line)
        if m:
            found.setdefault(m[1].lower(), set()).add(m[2])
    return found


def declared_lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for req in project["dependencies"] + project["optional-dependencies"]["test"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([^,; ]+)", req)
        assert m, f"{req!r} has no lower bound"
        bounds[m[1].lower()] = m[3]
    return bounds


def test_every_dependency_ci_installs_is_pinned():
    lock = pins(ROOT / "requirements" / "lock.txt")
    for name in declared_lower_bounds():
        assert name in lock, f"{name} is not pinned in requirements/lock.txt"


def test_lowest_lock_holds_exactly_the_declared_lower_bounds():
    lowest = pins(ROOT / "requirements" / "lowest.txt")
    for name, bound in declared_lower_bounds().items():
        assert lowest.get(name) == {bound}, f"{name}: pyproject says >={bound}, lowest.txt pins {lowest.get(name)}"


def test_pre_commit_runs_the_locked_tool_versions():
    lock = pins(ROOT / "requirements" / "lock.txt")
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    used = re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', config)
    assert used, "no pinned hook dependency found"
    for name, version in used:
        assert version in lock.get(name.lower(), set()), f"pre-commit pins {name}=={version}, the lock does not"
