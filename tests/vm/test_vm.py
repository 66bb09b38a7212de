"""The real-kernel tier: each guest-side test (tests/vm/guest) reported as a host test.

The session fixture boots one QEMU VM (Debian 6.1 kernel, TCG) that runs all guest tests; a failing
guest test fails here with its own traceback followed by the guest's output and kernel console."""

from __future__ import annotations

import pytest
from vmharness import GuestSession, guest_tests

# The first test pays for the session fixture: building the VM assets on a cold cache, then one VM
# run of every guest test (conftest VM_TIMEOUT); the global per-test limit is far too short for that.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]


def test_vm_job_completed(vm_session: GuestSession) -> None:
    run = vm_session.run
    if run.timed_out or run.exit_code is None or not vm_session.cases:
        pytest.fail("the VM job did not complete\n" + run.describe(), pytrace=False)


@pytest.mark.parametrize("guest_test", guest_tests())
def test_in_vm(vm_session: GuestSession, guest_test: str) -> None:
    results = vm_session.results_for(guest_test)
    if not results:
        pytest.fail(f"{guest_test} did not run in the VM\n" + vm_session.run.describe(), pytrace=False)
    bad = [r for r in results if r.outcome in ("failed", "error")]
    if bad:
        detail = "\n\n".join(f"{r.name}: {r.outcome}\n{r.detail}" for r in bad)
        pytest.fail(f"{detail}\n\n{vm_session.run.describe(60)}", pytrace=False)
    if all(r.outcome == "skipped" for r in results):
        pytest.skip(f"skipped in the VM: {results[0].detail.strip()}")
