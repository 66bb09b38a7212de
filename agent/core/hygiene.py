"""VF hygiene between pods, as plain functions: the baseline a released VF returns to, and the
fence that keeps the kubelet from handing it out meanwhile.

The baseline is the config's VF settings, and for every attribute the config leaves out the value
that carries no state from one pod to the next: VLAN 0 with QoS 0, trust off, link state auto, no
rate limits. Two are left alone when unset, because they have no neutral value: the admin MAC
(``mac: keep`` leaves it to sriov-cni, which puts back the VF's original MAC on DEL; ``mac: stable``
restores the stable MAC) and spoof checking (mlx5 defaults it off, most other drivers on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from agent.config import PfConfig
from agent.core.reconcile import Action, SetMtu, SetVfAttrs, VfChange, stable_mac
from agent.model import Health, ResourceView

RESETTING = "resetting"  # the reason a fenced VF is advertised Unhealthy with
# A failed reset is retried after RETRY_FIRST_S, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


def baseline_change(pf_address: str, cfg: PfConfig, vf_index: int, node_name: str) -> VfChange:
    """Every PF-side attribute of a released VF, set to the config or to its neutral value."""
    s = cfg.vf
    return VfChange(
        mac=stable_mac(node_name, pf_address, vf_index) if s.mac == "stable" else None,
        trust=s.trust if s.trust is not None else False,
        spoofchk=s.spoofchk,
        link_state=s.link_state or "auto",
        vlan=s.vlan or 0,
        qos=(s.qos or 0) if s.vlan else 0,
        min_tx_rate=s.min_tx_rate or 0,
        max_tx_rate=s.max_tx_rate or 0,
    )


def baseline_actions(pf_address: str, pf_ifname: str | None, cfg: PfConfig, vf_index: int, *,
                     vf_netdev: str | None, node_name: str) -> tuple[Action, ...]:
    """The lifecycle's own actions that put a released VF back to the baseline (PF side over
    netlink, then the VF netdev's MTU when the config names one and the netdev is home)."""
    out: list[Action] = []
    if pf_ifname is not None:
        out.append(SetVfAttrs(pf_address, pf_ifname, vf_index,
                              baseline_change(pf_address, cfg, vf_index, node_name)))
    if cfg.vf.mtu is not None and vf_netdev is not None:
        out.append(SetMtu(pf_address, vf_netdev, cfg.vf.mtu, vf=vf_index))
    return tuple(out)


def fenced(view: ResourceView, fences: Mapping[str, str]) -> ResourceView:
    """The view with every fenced VF Unhealthy, its reason the fence's."""
    if not fences or not any(d.id in fences for d in view.devices):
        return view
    return replace(view, devices=tuple(
        replace(d, health=Health.UNHEALTHY, reason=fences[d.id]) if d.id in fences else d
        for d in view.devices))


def retry_delay(failures: int) -> float:
    """Backoff before retry number ``failures`` (1, 2, ...)."""
    return float(min(RETRY_FIRST_S * 2 ** max(failures - 1, 0), RETRY_MAX_S))
