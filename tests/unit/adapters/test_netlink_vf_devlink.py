"""devlink's eswitch mode when the generic netlink family cannot even be opened (a sandbox, or arm64 under
qemu-user in the image tier): the PF's mode is unknown, and the agent starts anyway."""

from __future__ import annotations

import errno

import pyroute2
import pytest

from agent.adapters import netlink_vf
from agent.errors import NetlinkOpError


def refusing(code: int) -> type:
    class RefusingDL:
        def __init__(self) -> None:
            raise OSError(code, "socket refused")
    return RefusingDL


@pytest.mark.parametrize("code", [errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT])
def test_no_generic_netlink_means_eswitch_mode_unknown(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setattr(pyroute2, "DL", refusing(code))  # imported where used (lazily)
    assert netlink_vf.PyrouteVfNetlink().eswitch_mode("0002:01:00.0") is None


def test_other_socket_errors_name_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyroute2, "DL", refusing(errno.EMFILE))
    with pytest.raises(NetlinkOpError, match=r"devlink eswitch get on 0002:01:00\.0: EMFILE"):
        netlink_vf.PyrouteVfNetlink().eswitch_mode("0002:01:00.0")
