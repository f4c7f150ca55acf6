"""Test order: the tests marked `rebuild` (test_rebuild_home.py replaces the home container) run last."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "rebuild: replaces a container of the scenario; runs after every other test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("rebuild") is not None)  # stable: the rest keep their order
