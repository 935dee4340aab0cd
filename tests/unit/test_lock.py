"""requirements.lock is what gets installed, and it agrees with pyproject.toml.

If scripts/install.sh stopped passing the lock to pip, a fresh install would take the newest
releases and the first test here would fail; if pyproject.toml's ranges moved without
`scripts/update_lock.sh`, the second would.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def locked() -> dict[str, Version]:
    """The lock's pins that apply to this interpreter and platform: {name: version}."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"not an exact pin: {line}"
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def declared() -> list[Requirement]:
    """pyproject.toml's requirements: dependencies, every extra, and the build backend."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = list(project["project"]["dependencies"])
    for extra in project["project"]["optional-dependencies"].values():
        lines += extra
    lines += project["build-system"]["requires"]
    return [Requirement(line) for line in lines]


def test_every_installed_package_the_lock_names_is_at_the_locked_version():
    pins = locked()
    assert len(pins) > 50, "the lock looks empty"
    wrong = []
    for name, version in pins.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # needed elsewhere only (a CUDA library on a CPU machine, a dev tool)
        if Version(installed.public) != version:  # torch's "+cpu" build is that version's
            wrong.append(f"{name} {installed} (locked: {version})")
    assert not wrong, "installed apart from requirements.lock: " + ", ".join(wrong)


def test_the_lock_covers_and_satisfies_every_requirement_in_pyproject():
    pins = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        if name == "nnsight-server" or (requirement.marker and not requirement.marker.evaluate()):
            continue  # the project's own extras refer to itself
        assert name in pins, f"{requirement} is not in requirements.lock: run scripts/update_lock.sh --keep"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {name} {pins[name]}, outside pyproject.toml's {requirement}: "
            "run scripts/update_lock.sh --keep"
        )


def test_the_locked_transformers_accepts_the_locked_peft():
    """The pair that broke: transformers' own floor for peft, read from the installed release."""
    from transformers.integrations.peft import MIN_PEFT_VERSION

    assert locked()["peft"] >= Version(MIN_PEFT_VERSION)
