"""Device kinds: what a resource's VFs are to a pod, chosen by the config's ``deviceType``.

To add a kind: a module here with a class that satisfies ``DeviceKind`` (base.py), a ``deviceType``
value in agent/config.py (with the checks that make other settings agree with it), and a line in
``kind_of``. What it needs from sysfs goes into ``VfInfo`` (agent/model.py), read by
agent/adapters/sysfs.py.
"""

from __future__ import annotations

from agent.config import VFIO_PCI, ResourceConfig
from agent.core.kinds.base import DevExists, DeviceGrant, DeviceKind
from agent.core.kinds.netdevice import Netdevice
from agent.core.kinds.vfio import Vfio

__all__ = ["DevExists", "DeviceGrant", "DeviceKind", "Netdevice", "Vfio", "kind_of"]

_VFIO = Vfio()
_NETDEVICE = {True: Netdevice(rdma=True), False: Netdevice(rdma=False)}


def kind_of(resource: ResourceConfig) -> DeviceKind:
    if resource.device_type == VFIO_PCI:
        return _VFIO
    return _NETDEVICE[resource.rdma]
