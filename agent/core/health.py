"""Device health as a pure function of what was last observed."""

from __future__ import annotations

from agent.model import Health, PfInfo, VfInfo


def vf_health(pf: PfInfo, vf: VfInfo, rdma_required: bool, in_pod: bool = False) -> tuple[Health, str]:
    """Healthy, or Unhealthy with the first reason that makes the VF useless to a pod.

    A VF whose netdev (or RDMA device, in exclusive netns mode) left the host because it is in
    a pod is not unhealthy: ``in_pod`` says the VF is allocated, so its absence is expected.
    """
    if vf.driver is None:
        return Health.UNHEALTHY, "VF has no driver bound"
    if pf.driver is None:
        return Health.UNHEALTHY, "PF has no driver bound"
    if pf.netdev is None:
        return Health.UNHEALTHY, "PF has no network interface"
    if pf.netdev.carrier is not True:
        return Health.UNHEALTHY, f"PF {pf.netdev.name} has no carrier"
    if rdma_required:
        if pf.rdma is not None and not pf.rdma.all_ports_active:
            port = next(p for p in pf.rdma.ports if not p.active) if pf.rdma.ports else None
            state = f"{port.state}: {port.state_name}" if port else "no ports"
            return Health.UNHEALTHY, f"PF RDMA device {pf.rdma.name} port not ACTIVE ({state})"
        if vf.rdma is None and not in_pod:
            return Health.UNHEALTHY, "VF has no RDMA device"
        if vf.rdma is not None and vf.rdma.ports and not vf.rdma.all_ports_active:
            return Health.UNHEALTHY, f"VF RDMA device {vf.rdma.name} port not ACTIVE"
    return Health.HEALTHY, ""
