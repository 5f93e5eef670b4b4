"""What RefNet needs installed inside Slicer, checked without importing it (plain Python, no Slicer call)."""

from __future__ import annotations

import os

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the module folder (refnet/, Resources/)
REQUIREMENTS_PATH = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
MINIMUM_TORCH = "2.1"


def readRequirements(path: str = REQUIREMENTS_PATH) -> list[str]:
    """Requirement lines of a pip requirements file, without comments and blank lines."""
    with open(path, encoding="utf-8") as file:
        lines = (line.split("#", 1)[0].strip() for line in file)
        return [line for line in lines if line]


def missingRequirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed in a version outside their specifier."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing
