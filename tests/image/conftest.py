"""Image tier: the Dockerfile built for linux/amd64 and linux/arm64 once per session (or taken from the
cache when nothing it reads changed), and one read-only container per arch for the tests to run in."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from .imageharness import (
    ARCHES,
    CACHE,
    MEASURED,
    Built,
    ImageError,
    ImageUnavailable,
    Store,
    check_machine,
    ensure_bases,
    ensure_binfmt,
    ensure_image,
)

TIER_TIME: dict[str, float] = {}  # first fixture set up, last test torn down (time.monotonic)


@pytest.fixture(scope="session")
def store() -> Store:
    TIER_TIME["start"] = time.monotonic()
    try:
        check_machine()
    except ImageUnavailable as e:
        warnings.warn(f"IMAGE TIER SKIPPED: {e}", stacklevel=1)
        pytest.skip(f"IMAGE TIER SKIPPED: {e}")
    except ImageError as e:
        pytest.fail(str(e), pytrace=False)
    return Store()


@pytest.fixture(scope="session")
def built(store: Store) -> Iterator[Built]:
    started = time.monotonic()
    with store.session() as built_now:
        try:
            ensure_binfmt()
            store.reap()
            image = ensure_image(store, ensure_bases(store))
        except ImageError as e:
            pytest.fail(str(e), pytrace=False)
        built_now()
        MEASURED["storage driver"] = store.driver
        MEASURED["bases + image ready (this session) [s]"] = round(time.monotonic() - started, 1)
        yield image


@pytest.fixture(scope="session")
def rootfs_of(store: Store, built: Built) -> Iterator[dict[str, Path]]:
    """arch -> the mounted root of one container of that arch's image, shared by the session's tests."""
    with ExitStack() as stack:
        yield {arch: stack.enter_context(store.rootfs(ref)) for arch, ref in built.refs.items()}


@pytest.fixture(params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture(autouse=True)
def _tier_end() -> Iterator[None]:
    yield
    TIER_TIME["end"] = time.monotonic()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASURED:
        return
    if "start" in TIER_TIME and "end" in TIER_TIME:
        MEASURED["image tier wall time [s]"] = round(TIER_TIME["end"] - TIER_TIME["start"], 1)
    terminalreporter.section("image tier measurements")
    for key, value in MEASURED.items():
        terminalreporter.write_line(f"{key}: {value}")
    if CACHE.is_dir():
        (CACHE / "last-run.json").write_text(json.dumps(MEASURED, indent=1))
