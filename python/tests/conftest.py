"""Shared paths for the pytest suite of the `moderato` Python package."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "experiments" / "scenarios"


def scenario(name: str) -> str:
    """The path of a standard scenario file."""
    return str(SCENARIOS / f"{name}.toml")


@pytest.fixture
def repo() -> Path:
    return REPO
