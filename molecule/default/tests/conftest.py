"""Test order: the tests marked `chaos` (test_chaos.py: faults on every host) run after the others, then
those marked `rebuild` (test_rebuild_home.py replaces the home container) last."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "rebuild: replaces a container of the scenario; runs after every other test")
    config.addinivalue_line("markers", "chaos: injects faults into the whole path; runs after the other tests, "
                                       "before `rebuild`")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def place(item: pytest.Item) -> int:
        return 2 if item.get_closest_marker("rebuild") else 1 if item.get_closest_marker("chaos") else 0

    items.sort(key=place)  # stable: the rest keep their order
