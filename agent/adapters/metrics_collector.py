"""Prometheus metrics: a custom Collector that turns the agent's state into metric families when scraped.

No polling loop: every value is read at scrape time (sysfs counters, the agent's current views,
the event counters declared in agent.stats.COUNTERS). agent.adapters.metrics_exposition writes the
families as text; agent.adapters.metrics_server serves that text over HTTP.

RDMA port metrics keep node_exporter's infiniband names and {device, port} labels behind our
prefix, so queries written for node_exporter carry over; port_*_data (4-byte words) become bytes.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent import __version__
from agent.adapters.metrics_exposition import render_text
from agent.adapters.sysfs import SysfsHost
from agent.core.status import ObservedAgent, PodDirectory, PodRef, pf_rows, vf_rows
from agent.errors import AgentError
from agent.logs import ctx
from agent.model import ReconcileState
from agent.stats import COUNTERS, Stats

log = logging.getLogger(__name__)

PREFIX = "sriov_rdma"
ESWITCH_MODES = ("legacy", "switchdev")
RECONCILE_STATES = tuple(s.value for s in ReconcileState)

# ports/N/counters (IBA PMA) -> (node_exporter infiniband name, multiplier to base units).
IB_COUNTERS: dict[str, tuple[str, int]] = {
    "excessive_buffer_overrun_errors": ("excessive_buffer_overrun_errors_total", 1),
    "link_downed": ("link_downed_total", 1),
    "link_error_recovery": ("link_error_recovery_total", 1),
    "local_link_integrity_errors": ("local_link_integrity_errors_total", 1),
    "multicast_rcv_packets": ("multicast_packets_received_total", 1),
    "multicast_xmit_packets": ("multicast_packets_transmitted_total", 1),
    "port_rcv_constraint_errors": ("port_constraint_errors_received_total", 1),
    "port_xmit_constraint_errors": ("port_constraint_errors_transmitted_total", 1),
    "port_rcv_data": ("port_data_received_bytes_total", 4),  # counted in 4-byte words
    "port_xmit_data": ("port_data_transmitted_bytes_total", 4),
    "port_rcv_discards": ("port_discards_received_total", 1),
    "port_xmit_discards": ("port_discards_transmitted_total", 1),
    "port_rcv_errors": ("port_errors_received_total", 1),
    "port_rcv_packets": ("port_packets_received_total", 1),
    "port_xmit_packets": ("port_packets_transmitted_total", 1),
    "port_xmit_wait": ("port_transmit_wait_total", 1),
    "port_rcv_remote_physical_errors": ("port_receive_remote_physical_errors_total", 1),
    "port_rcv_switch_relay_errors": ("port_receive_switch_relay_errors_total", 1),
    "symbol_error": ("symbol_error_total", 1),
    "unicast_rcv_packets": ("unicast_packets_received_total", 1),
    "unicast_xmit_packets": ("unicast_packets_transmitted_total", 1),
    "VL15_dropped": ("vl15_dropped_total", 1),
}
# ports/N/hw_counters (mlx5 driver counters) -> node_exporter infiniband name. Counters node_exporter
# does not know (e.g. req_transport_retries_exceeded) are exported as hw_<kernel name>_total.
HW_COUNTERS: dict[str, str] = {
    "duplicate_request": "duplicate_requests_packets_total",
    "implied_nak_seq_err": "implied_nak_seq_errors_total",
    "local_ack_timeout_err": "local_ack_timeout_errors_total",
    "np_cnp_sent": "np_cnp_packets_sent_total",
    "np_ecn_marked_roce_packets": "np_ecn_marked_roce_packets_received_total",
    "out_of_buffer": "out_of_buffer_drops_total",
    "out_of_sequence": "out_of_sequence_packets_received_total",
    "packet_seq_err": "packet_sequence_errors_total",
    "req_cqe_error": "req_cqes_errors_total",
    "req_cqe_flush_error": "req_cqes_flush_errors_total",
    "req_remote_access_errors": "req_remote_access_errors_total",
    "req_remote_invalid_request": "req_remote_invalid_request_errors_total",
    "resp_cqe_error": "resp_cqes_errors_total",
    "resp_cqe_flush_error": "resp_cqes_flush_errors_total",
    "resp_local_length_error": "resp_local_length_errors_total",
    "resp_remote_access_errors": "resp_remote_access_errors_total",
    "rnr_nak_retry_err": "rnr_nak_retry_packets_received_total",
    "roce_adp_retrans": "roce_adp_retransmits_total",
    "roce_adp_retrans_to": "roce_adp_retransmits_timeout_total",
    "roce_slow_restart": "roce_slow_restart_used_total",
    "roce_slow_restart_cnps": "roce_slow_restart_cnps_total",
    "roce_slow_restart_trans": "roce_slow_restart_total",
    "rp_cnp_handled": "rp_cnp_packets_handled_total",
    "rp_cnp_ignored": "rp_cnp_ignored_packets_received_total",
    "rx_atomic_requests": "rx_atomic_requests_total",
    "rx_read_requests": "rx_read_requests_total",
    "rx_write_requests": "rx_write_requests_total",
    "rx_dct_connect": "rx_dct_connect_requests_total",
    "rx_icrc_encapsulated": "rx_icrc_encapsulated_errors_total",
}
HW_NOT_COUNTERS = frozenset({"lifespan"})  # a cache TTL in ms, not an event count

# /sys/class/net/<vf>/statistics file -> metric suffix (node_exporter netdev names).
VF_NETDEV_STATS: dict[str, str] = {
    "rx_bytes": "receive_bytes_total",
    "tx_bytes": "transmit_bytes_total",
    "rx_packets": "receive_packets_total",
    "tx_packets": "transmit_packets_total",
    "rx_dropped": "receive_drop_total",
    "tx_dropped": "transmit_drop_total",
}
_VF_STAT_FILES = tuple(VF_NETDEV_STATS)

ALLOCATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Fence to offered again: milliseconds for `settings`, seconds for an FLR, minutes behind a slow pod exit.
RESET_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_BAD_NAME_CHARS = re.compile(r"[^a-z0-9_]")


def _m(name: str) -> str:
    return f"{PREFIX}_{name}"


class AgentCollector(Collector):
    """Every agent metric, computed from current state on each collect()."""

    def __init__(self, agent: ObservedAgent, stats: Stats, sysfs: SysfsHost,
                 pods: PodDirectory | None = None, pod_timeout: float = 2.0) -> None:
        self.agent = agent
        self.stats = stats
        self.sysfs = sysfs
        self.pods = pods
        self.pod_timeout = pod_timeout
        self._owners: Mapping[tuple[str, str], PodRef] | None = None
        self._pod_error = ""

    async def refresh_pods(self) -> Mapping[tuple[str, str], PodRef] | None:
        """Ask the kubelet who holds which device (once per scrape); None when it cannot say."""
        if self.pods is None:
            self._owners = None
            return None
        try:
            self._owners = await asyncio.wait_for(self.pods.device_owners(), self.pod_timeout)
            self._pod_error = ""
        except (AgentError, TimeoutError) as e:
            reason = str(e) or "timed out"
            if reason != self._pod_error:
                log.warning("PodResources unavailable; pod labels left empty: %s", reason,
                            extra=ctx("pod-resources", reason=reason))
            self._pod_error = reason
            self._owners = None
        return self._owners

    def describe(self) -> Iterable[Metric]:
        """Nothing to pre-declare: returning [] keeps registration from running a collect."""
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._build_info()
        yield from self._pfs()
        yield from self._vfs()
        yield from self._stat_counters()
        yield from self._runtime()

    # ------------------------------------------------------------ families
    def _build_info(self) -> Iterator[Metric]:
        info = InfoMetricFamily(_m("build"), "Agent version and runtime.")
        info.add_metric([], {"version": __version__, "python_version": platform.python_version()})
        yield info
        up = GaugeMetricFamily(_m("pod_resources_up"),
                               "1 when the kubelet PodResources API answered for this scrape.")
        up.add_metric([], 1 if self._owners is not None else 0)
        yield up
        reg = GaugeMetricFamily(_m("kubelet_registered"),
                                "1 while the resource is registered with the kubelet.", labels=["resource"])
        for name, lc in sorted(self.agent.lifecycles.items()):
            reg.add_metric([name], 1 if lc.registered else 0)
        yield reg

    def _pfs(self) -> Iterator[Metric]:
        L = ["pf"]
        info = InfoMetricFamily(_m("pf"), "A configured physical function and what it maps to.", labels=L)
        desired = GaugeMetricFamily(_m("pf_vfs_desired"), "VFs the config asks for on the PF.", labels=L)
        actual = GaugeMetricFamily(_m("pf_vfs"), "VFs the PF has now (sriov_numvfs).", labels=L)
        most = GaugeMetricFamily(_m("pf_vfs_max"), "VFs the PF supports (sriov_totalvfs).", labels=L)
        link = GaugeMetricFamily(_m("pf_link_up"), "1 when the PF netdev has carrier.", labels=L)
        speed = GaugeMetricFamily(_m("pf_speed_bytes_per_second"), "PF link speed.", labels=L)
        mtu = GaugeMetricFamily(_m("pf_mtu_bytes"), "PF netdev MTU.", labels=L)
        eswitch = GaugeMetricFamily(_m("pf_eswitch_mode"), "1 for the PF's current devlink eswitch mode.",
                                    labels=["pf", "mode"])
        rstate = GaugeMetricFamily(_m("pf_reconcile_state"),
                                   "1 for the outcome of the PF's last VF lifecycle reconcile.",
                                   labels=["pf", "resource", "state"])
        rtime = GaugeMetricFamily(_m("pf_reconcile_timestamp_seconds"), "When the PF was last reconciled.",
                                  labels=["pf"])
        ib_info = InfoMetricFamily(_m("infiniband_port"), "An RDMA port of a PF and its link layer.",
                                   labels=["device", "port"])
        state = GaugeMetricFamily(_m("infiniband_state_id"),
                                  "RDMA port state (1 down, 2 init, 3 armed, 4 active, 5 active defer).",
                                  labels=["device", "port"])
        phys = GaugeMetricFamily(_m("infiniband_physical_state_id"),
                                 "RDMA physical port state (3 disabled, 5 link up, ...).",
                                 labels=["device", "port"])
        rate = GaugeMetricFamily(_m("infiniband_rate_bytes_per_second"), "RDMA port rate.",
                                 labels=["device", "port"])
        counters: dict[str, CounterMetricFamily] = {}

        def counter(name: str, doc: str) -> CounterMetricFamily:
            if name not in counters:
                counters[name] = CounterMetricFamily(_m("infiniband_" + name), doc, labels=["device", "port"])
            return counters[name]

        for row in pf_rows(self.agent):
            pf, a = row.pf, [row.pf.pci_address]
            info.add_metric(a, {"resource": row.resource, "netdev": pf.netdev.name if pf.netdev else "",
                                "driver": pf.driver or "", "numa_node": str(pf.numa_node),
                                "rdma_device": pf.rdma.name if pf.rdma else "",
                                "device_id": f"{pf.vendor}:{pf.device}"})
            if row.desired_vfs is not None:
                desired.add_metric(a, row.desired_vfs)
            actual.add_metric(a, pf.sriov_numvfs)
            if pf.sriov_totalvfs is not None:
                most.add_metric(a, pf.sriov_totalvfs)
            if pf.netdev is not None:
                link.add_metric(a, 1 if pf.netdev.carrier else 0)
                mtu.add_metric(a, pf.netdev.mtu)
                if pf.netdev.speed_mbps is not None:
                    speed.add_metric(a, pf.netdev.speed_mbps * 1_000_000 / 8)
            if row.eswitch_mode is not None:
                for mode in ESWITCH_MODES:
                    eswitch.add_metric([pf.pci_address, mode], 1 if row.eswitch_mode == mode else 0)
            if pf.rdma is None:
                continue
            for port in pf.rdma.ports:
                dp = [pf.rdma.name, str(port.number)]
                ib_info.add_metric(dp, {"pf": pf.pci_address, "link_layer": port.link_layer})
                state.add_metric(dp, port.state)
                phys.add_metric(dp, port.phys_state)
                gbps = _rate_gbps(port.rate)
                if gbps is not None:
                    rate.add_metric(dp, gbps * 125_000_000)
                pma = self.sysfs.read_port_counters(pf.rdma.name, port.number, "counters")
                for fname, value in pma.items():
                    name, scale = IB_COUNTERS.get(fname, (_sanitize(fname) + "_total", 1))
                    counter(name, f"ports/N/counters/{fname}" + (" x4 (4-byte words)" if scale == 4 else "")
                            ).add_metric(dp, value * scale)
                hw = self.sysfs.read_port_counters(pf.rdma.name, port.number, "hw_counters")
                for fname, value in hw.items():
                    if fname in HW_NOT_COUNTERS:
                        continue
                    name = HW_COUNTERS.get(fname) or f"hw_{_sanitize(fname)}_total"
                    counter(name, f"mlx5 ports/N/hw_counters/{fname}").add_metric(dp, value)
        for st in self.agent.reconcile_status.values():  # also PFs the config names but the node lacks
            for name in RECONCILE_STATES:
                rstate.add_metric([st.pf, st.resource, name], 1 if st.state == name else 0)
            if st.updated_at:
                rtime.add_metric([st.pf], st.updated_at)
        yield from (info, desired, actual, most, link, speed, mtu, eswitch, rstate, rtime)
        yield from (ib_info, state, phys, rate)
        yield from counters.values()

    def _vfs(self) -> Iterator[Metric]:
        L = ["resource", "vf"]
        info = InfoMetricFamily(_m("vf"), "An advertised VF and its PF, netdev and RDMA device.", labels=L)
        healthy = GaugeMetricFamily(_m("vf_healthy"), "1 when the kubelet is told the VF is Healthy.",
                                    labels=L)
        allocated = GaugeMetricFamily(
            _m("vf_allocated"), "1 when the VF is assigned to a container (pod labels from PodResources).",
            labels=[*L, "namespace", "pod", "container"])
        stats = {f: CounterMetricFamily(_m("vf_" + s), f"VF netdev statistics/{f}.", labels=L)
                 for f, s in VF_NETDEV_STATS.items()}
        for row in vf_rows(self.agent, self._owners):
            a = [row.resource, row.vf]
            info.add_metric(a, {"pf": row.pf, "index": str(row.index), "netdev": row.netdev,
                                "rdma_device": row.rdma_device})
            healthy.add_metric(a, 1 if row.healthy else 0)
            o = row.owner
            allocated.add_metric([*a, o.namespace if o else "", o.pod if o else "", o.container if o else ""],
                                 1 if row.allocated else 0)
            if row.netdev:
                for f, value in self.sysfs.read_netdev_stats(row.netdev, _VF_STAT_FILES).items():
                    stats[f].add_metric(a, value)
        yield from (info, healthy, allocated)
        yield from stats.values()

    def _runtime(self) -> Iterator[Metric]:
        """Tasks alive in the agent's event loop: a leak (say, one per dropped stream) is growth here."""
        try:
            tasks = asyncio.all_tasks()
        except RuntimeError:  # collected outside the agent's loop: there is nothing to count
            return
        yield GaugeMetricFamily(_m("asyncio_tasks"), "Tasks alive in the agent's event loop.",
                                value=len(tasks))

    def _stat_counters(self) -> Iterator[Metric]:
        for spec in COUNTERS.values():
            fam = CounterMetricFamily(_m(spec.name), spec.doc, labels=list(spec.labels))
            for values, value in self.stats.series(spec.name):
                fam.add_metric(list(values), value)
            yield fam


def _rate_gbps(rate: str) -> float | None:
    """"400 Gb/sec (4X NDR)" -> 400.0 (node_exporter parses the first token the same way)."""
    try:
        return float(rate.split(" ", 1)[0])
    except ValueError:
        return None


def _sanitize(name: str) -> str:
    return _BAD_NAME_CHARS.sub("_", name.lower())


@dataclass
class AgentMetrics:
    """The registry the endpoint serves: the collector, the Allocate histogram, process metrics."""

    registry: CollectorRegistry
    collector: AgentCollector
    allocate_seconds: Histogram
    reset_seconds: Histogram  # by resetOnRelease mode

    def allocate_observer(self, resource: str) -> Callable[[float, bool], None]:
        """The on_allocate callback for one resource's DevicePluginServicer."""
        def observe(seconds: float, ok: bool) -> None:
            self.allocate_seconds.labels(resource, "ok" if ok else "error").observe(seconds)
        return observe

    async def render(self) -> bytes:
        """What a scrape gets: PodResources asked once, then every family as text."""
        await self.collector.refresh_pods()
        return render_text(self.registry)


def build_metrics(agent: ObservedAgent, stats: Stats, sysfs: SysfsHost, pods: PodDirectory | None = None,
                  process: bool = True) -> AgentMetrics:
    registry = CollectorRegistry(auto_describe=False)
    collector = AgentCollector(agent, stats, sysfs, pods)
    registry.register(collector)
    hist = Histogram(_m("allocate_duration_seconds"), "Time to answer the kubelet's Allocate call.",
                     ["resource", "result"], buckets=ALLOCATE_BUCKETS, registry=registry)
    resets = Histogram(_m("vf_reset_duration_seconds"),
                       "Time a released VF spent fenced: from the fence to being offered again after a "
                       "successful reset.", ["mode"], buckets=RESET_BUCKETS, registry=registry)
    if process:
        ProcessCollector(registry=registry)
    return AgentMetrics(registry, collector, hist, resets)
