"""What every device kind provides, on the model of the community plugin's device and info providers.

The community SR-IOV device plugin gives each device a list of info providers chosen by its driver
(``pkg/factory`` ``GetDefaultInfoProvider``: generic, plus vfio for vfio-pci; rdma when the selector
asks): each contributes device specs, mounts and one object of the ``PCIDEVICE_<RESOURCE>_INFO`` env.
Here a resource's ``deviceType`` picks one kind, and the kind answers for its VFs: whether one is
usable (health), what a container gets for it, and what its device-info file says. The generic part
(the ``generic`` info object, the env names, de-duplicating specs across VFs) stays in
``core/inventory``. Pure: the only look at the host is ``dev_exists``, passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.model import DeviceSpecOut, Health, PfInfo, VfInfo

DevExists = Callable[[str], bool]  # is /dev/<...> present on the host (SysfsHost.dev_path_exists)


@dataclass(frozen=True)
class DeviceGrant:
    """What one VF adds to a container: its ``_INFO`` objects by provider name (besides "generic"),
    and its device nodes in the order the community plugin lists them."""

    info: Mapping[str, Mapping[str, str]]
    specs: tuple[DeviceSpecOut, ...] = ()


class DeviceKind(Protocol):
    """One kind of device a resource serves (``deviceType`` in the config)."""

    @property
    def name(self) -> str:
        """The config's ``deviceType`` value."""
        ...

    def health(self, pf: PfInfo, vf: VfInfo, in_pod: bool, dev_exists: DevExists) -> tuple[Health, str]:
        """Healthy, or Unhealthy with the first reason the VF is of no use to a pod. ``in_pod``: a pod
        holds the VF, so what sriov-cni moved out of the host is expected to be missing."""
        ...

    def grant(self, vf: VfInfo, dev_exists: DevExists) -> DeviceGrant:
        """The container's share of one VF (Allocate)."""
        ...

    def devinfo_pci(self, vf: VfInfo) -> dict[str, str]:
        """The ``pci`` object of the VF's device-info file (device-info-spec 1.1.0), in key order."""
        ...
