"""Test-wide settings: the decoded-image cache goes to a temporary folder, never the user's ~/.cache."""

import pytest


@pytest.fixture(autouse=True)
def _private_image_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRICKBAG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "trickbag-cache"))
