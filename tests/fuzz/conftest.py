"""Property-based fuzzing of everything that reads input from outside: the config file, sysfs, and
the device-plugin gRPC calls. Bounded for CI: each test sets max_examples and a deadline, and no
example database is written (a clean clone stays clean)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# Deadlines are generous: CI runs on 2 shared cores and a slow example is not a failure of the agent.
settings.register_profile("fuzz", deadline=5000, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("fuzz")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fuzz/" in str(item.fspath):
            item.add_marker(pytest.mark.fuzz)
