"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from tiny_models import ALL_ARCH_NAMES, TinyCase, build_tiny


@pytest.fixture(params=ALL_ARCH_NAMES)
def tiny_case(request: pytest.FixtureRequest) -> TinyCase:
    """Each tiny architecture in turn, freshly built (tests may patch its blocks)."""
    return build_tiny(request.param)
