"""The `rendered` fixture: each overlay rendered once per session."""
from __future__ import annotations

import pytest

from deploy_support import DEPLOY, render

_cache: dict[str, list[dict]] = {}


@pytest.fixture(scope="session")
def rendered():
    """overlay name -> rendered objects."""
    def get(overlay: str) -> list[dict]:
        if overlay not in _cache:
            _cache[overlay] = render(DEPLOY / "overlays" / overlay)
        return _cache[overlay]
    return get
