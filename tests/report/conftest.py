"""Report tests: one sqlite store per test module, laid out the way the runner logs (``test_data.build_store``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def uri(tmp_path_factory, new_store) -> str:
    from tests.report.test_data import build_store

    return build_store(tmp_path_factory.mktemp("mlflow"), new_store)
