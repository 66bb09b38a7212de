"""VM tier: one VM per pytest session runs every guest-side test (tests/vm/guest/*.py) against a real
kernel; the host-side tests in test_vm.py report each guest test's outcome."""

from __future__ import annotations

import warnings

import pytest
from vmharness import (
    GuestSession,
    VmError,
    VmUnavailable,
    find_qemu,
    guest_modules,
    guest_pytest,
    parse_junit,
    prepare_assets,
    run_vm,
)

collect_ignore = ["guest"]  # guest modules import guest-only fixtures; they run inside the VM

# The job takes ~110 s (boot, one Python start over 9p under TCG, the tests): generous for a loaded CI.
VM_TIMEOUT = 900


@pytest.fixture(scope="session")
def vm_session(tmp_path_factory: pytest.TempPathFactory) -> GuestSession:
    try:
        qemu = find_qemu()
        assets = prepare_assets()
    except VmUnavailable as e:
        warnings.warn(f"VM TIER SKIPPED: {e}", stacklevel=1)
        pytest.skip(f"VM TIER SKIPPED: {e}")
    except VmError as e:
        pytest.fail(f"VM assets could not be prepared:\n{e}", pytrace=False)
    results = tmp_path_factory.mktemp("vm-results")
    body = guest_pytest([str(m) for m in guest_modules()])
    run = run_vm(assets, results, body, timeout=VM_TIMEOUT, qemu=qemu)
    return GuestSession(run, parse_junit(results / "junit.xml"))
