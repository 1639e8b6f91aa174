"""Doctests in qlight's docstrings run in a fresh temporary folder, as tests do."""

import pytest


@pytest.fixture(autouse=True)
def _doctests_in_tmp_path(request: pytest.FixtureRequest, tmp_path, monkeypatch) -> None:
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(tmp_path)
