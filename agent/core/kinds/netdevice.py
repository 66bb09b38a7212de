"""``deviceType: netdevice``: the VF as its kernel driver (mlx5_core) presents it, a netdev that
sriov-cni moves into the pod and, with ``rdma``, the RDMA device and its /dev/infiniband nodes.

The community plugin's netdevice pool with the generic and (``isRdma``) rdma info providers:
``pkg/netdevice``, ``pkg/infoprovider/rdmaInfoProvider.go``.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.health import vf_health
from agent.core.kinds.base import DevExists, DeviceGrant
from agent.model import DeviceSpecOut, Health, PfInfo, VfInfo

RDMA_CM = "/dev/infiniband/rdma_cm"


@dataclass(frozen=True)
class Netdevice:
    """``rdma``: a VF needs an RDMA device to be healthy, and gets its char devices in Allocate."""

    rdma: bool = True
    name: str = "netdevice"

    def health(self, pf: PfInfo, vf: VfInfo, in_pod: bool, dev_exists: DevExists) -> tuple[Health, str]:
        """The PF's link (and, with ``rdma``, the RDMA ports): core/health.vf_health."""
        return vf_health(pf, vf, self.rdma, in_pod)

    def grant(self, vf: VfInfo, dev_exists: DevExists) -> DeviceGrant:
        """The VF's issm, umad and uverbs nodes, then rdma_cm, each only if it exists on the host;
        ``rdma_dev`` names the RDMA device (as upstream since v3.10.0)."""
        if not self.rdma or vf.rdma is None:
            return DeviceGrant({})
        env: dict[str, str] = {"rdma_dev": vf.rdma.name}
        specs: list[DeviceSpecOut] = []
        paths = [
            *((f"/dev/infiniband/{n}", "issm") for n in vf.rdma.issm),
            *((f"/dev/infiniband/{n}", "umad") for n in vf.rdma.umad),
            *([(f"/dev/infiniband/{vf.rdma.uverbs}", "uverbs")] if vf.rdma.uverbs else []),
            (RDMA_CM, "rdma_cm"),
        ]
        for path, key in paths:
            if dev_exists(path):
                env.setdefault(key, path)
                specs.append(DeviceSpecOut(host_path=path, container_path=path))
        return DeviceGrant({"rdma": env}, tuple(specs))

    def devinfo_pci(self, vf: VfInfo) -> dict[str, str]:
        pci = {"pci-address": vf.pci_address}
        if self.rdma and vf.rdma is not None:
            pci["rdma-device"] = vf.rdma.name
        return pci
