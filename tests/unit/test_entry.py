"""The process entry point turns the collector back on, whatever the import does."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from agent import cli, entry


@pytest.fixture
def collector_restored() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.enable()


def test_main_runs_the_cli_with_the_collector_on_and_start_up_objects_frozen(
        collector_restored: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bool, int]] = []
    monkeypatch.setattr(cli, "main", lambda: seen.append((gc.isenabled(), gc.get_freeze_count())) or 7)
    gc.unfreeze()
    assert entry.main() == 7
    assert seen[0][0] and seen[0][1] > 0


def test_a_failing_import_still_leaves_the_collector_on(collector_restored: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "agent.cli", None)  # "import of agent.cli halted"
    monkeypatch.delattr("agent.cli", raising=False)
    with pytest.raises(ImportError):
        entry.main()
    assert gc.isenabled()
