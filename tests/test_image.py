"""The worker image's recipe agrees with the package it installs.

No Docker engine is needed: the checks read deploy/Dockerfile, pyproject.toml and
deploy/requirements.lock, and fail on the mistakes that break `docker build` or ship an
image other than the tested one: a package folder not copied, a dependency not locked, a
lock entry without its hash.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = (ROOT / "deploy" / "requirements.lock").read_text()


def copied_folders() -> set[str]:
    """Top-level folders the Dockerfile copies into the build stage."""
    return {m.group(1) for m in re.finditer(r"^COPY\s+(\w+)/\s", DOCKERFILE, re.MULTILINE)}


def package_folders() -> set[str]:
    """Top-level folders that pyproject.toml installs under vql.*."""
    return {path.split("/")[0] for path in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Each locked package: its pinned version and the hashes it may have."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", re.sub(r"\\\n\s*", " ", LOCK)):
        if not entry.strip() or entry.startswith("#"):
            continue
        spec, *options = entry.split()
        name, version = spec.split("==")
        hashes = [o.removeprefix("--hash=") for o in options if o.startswith("--hash=sha256:")]
        entries[canonicalize_name(name)] = (Version(version), hashes)
    return entries


def test_the_image_copies_every_package_folder() -> None:
    assert copied_folders() == package_folders()


def test_every_runtime_dependency_is_locked_at_a_version_it_accepts() -> None:
    lock = locked()
    for dependency in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is not in deploy/requirements.lock: run scripts/lock-image"
        version, _ = lock[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"deploy/requirements.lock pins {name} {version}, outside {requirement.specifier}: "
            "run scripts/lock-image"
        )


def test_every_locked_package_has_its_hash() -> None:
    lock = locked()
    assert lock
    assert [name for name, (_, hashes) in lock.items() if not hashes] == []


def test_the_image_installs_the_lock_and_nothing_else() -> None:
    assert re.search(r"pip install --require-hashes --no-deps -r \S*requirements\.lock", DOCKERFILE)
    assert re.search(r"pip install --no-deps\b[^\n]* \.", DOCKERFILE)
