"""The collector on a simulated mlx5 node: names, units and values a dashboard relies on."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from obs_node import PF, RESOURCE, FixedPods, Node
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.adapters.metrics_collector import AgentCollector, AgentMetrics
from agent.adapters.metrics_exposition import render_text
from agent.core.inventory import NodeState
from agent.core.status import PodRef
from agent.model import PfReconcileStatus, ReconcileState
from agent.services.ledger import Allocation

VF0 = "0002:01:00.2"
VF1 = "0002:01:00.3"


def sample(node: Node, name: str, **labels: str) -> float | None:
    m = node.agent.metrics
    assert m is not None
    asyncio.run(m.collector.refresh_pods())
    return m.registry.get_sample_value(name, labels)


def port(device: str) -> dict[str, str]:
    return {"device": device, "port": "1"}


def metrics(node: Node) -> AgentMetrics:
    assert node.agent.metrics is not None
    return node.agent.metrics


def test_port_data_words_are_exported_as_bytes(node: Node) -> None:
    node.port_file(PF, "counters", "port_rcv_data").write_text("100\n")
    node.port_file(PF, "counters", "port_xmit_data").write_text("25\n")
    node.port_file(PF, "counters", "port_rcv_packets").write_text("7\n")
    dev = node.sim.rdma_name(PF)
    assert sample(node, "sriov_rdma_infiniband_port_data_received_bytes_total", **port(dev)) == 400
    assert sample(node, "sriov_rdma_infiniband_port_data_transmitted_bytes_total", **port(dev)) == 100
    assert sample(node, "sriov_rdma_infiniband_port_packets_received_total", **port(dev)) == 7


def test_hw_counters_use_node_exporter_names_and_keep_unknown_ones(node: Node) -> None:
    node.port_file(PF, "hw_counters", "out_of_buffer").write_text("12\n")
    node.port_file(PF, "hw_counters", "np_cnp_sent").write_text("3\n")
    node.port_file(PF, "hw_counters", "req_transport_retries_exceeded").write_text("2\n")  # newer kernels
    node.port_file(PF, "counters", "symbol_error").write_text("N/A (no PMA)\n")
    dev = node.sim.rdma_name(PF)
    assert sample(node, "sriov_rdma_infiniband_out_of_buffer_drops_total", **port(dev)) == 12
    assert sample(node, "sriov_rdma_infiniband_np_cnp_packets_sent_total", **port(dev)) == 3
    assert sample(node, "sriov_rdma_infiniband_hw_req_transport_retries_exceeded_total", **port(dev)) == 2
    assert sample(node, "sriov_rdma_infiniband_symbol_error_total", **port(dev)) is None
    names = {s.name for f in metrics(node).registry.collect() for s in f.samples}
    assert not any("lifespan" in n for n in names)  # a cache TTL, never a counter


def test_pf_gauges_follow_the_node(node: Node) -> None:
    assert sample(node, "sriov_rdma_pf_vfs_desired", pf=PF) == 4
    assert sample(node, "sriov_rdma_pf_vfs", pf=PF) == 4
    assert sample(node, "sriov_rdma_pf_vfs_max", pf=PF) == 8
    assert sample(node, "sriov_rdma_pf_link_up", pf=PF) == 1
    assert sample(node, "sriov_rdma_pf_speed_bytes_per_second", pf=PF) == 200_000 * 1_000_000 / 8
    assert sample(node, "sriov_rdma_pf_mtu_bytes", pf=PF) == 1500
    dev = node.sim.rdma_name(PF)
    assert sample(node, "sriov_rdma_infiniband_state_id", **port(dev)) == 4
    assert sample(node, "sriov_rdma_infiniband_rate_bytes_per_second", **port(dev)) == 200 * 125_000_000
    assert sample(node, "sriov_rdma_pf_info", pf=PF, resource=RESOURCE, netdev="enP2p1s0f0np0",
                  driver="mlx5_core", numa_node="0", rdma_device=dev, device_id="15b3:1021") == 1

    node.sim.set_pf_link(PF, False)  # cable pulled
    node.rescan()
    assert sample(node, "sriov_rdma_pf_link_up", pf=PF) == 0
    assert sample(node, "sriov_rdma_infiniband_state_id", **port(dev)) == 1
    assert sample(node, "sriov_rdma_pf_speed_bytes_per_second", pf=PF) is None  # unknown while down
    assert sample(node, "sriov_rdma_vf_healthy", resource=RESOURCE, vf=VF0) == 0


def test_eswitch_mode_is_a_state_set_when_known(node: Node) -> None:
    assert sample(node, "sriov_rdma_pf_eswitch_mode", pf=PF, mode="legacy") is None
    pfs = dict(node.agent.inventory.node.pfs)
    pfs[PF] = replace(pfs[PF], eswitch_mode="switchdev")
    node.agent.inventory.node = NodeState(pfs)
    assert sample(node, "sriov_rdma_pf_eswitch_mode", pf=PF, mode="switchdev") == 1
    assert sample(node, "sriov_rdma_pf_eswitch_mode", pf=PF, mode="legacy") == 0


def test_reconcile_outcome_and_eswitch_mode_from_the_lifecycle(node: Node) -> None:
    node.agent.reporter.reconcile_status = {
        PF: PfReconcileStatus(pf=PF, resource=RESOURCE, state=ReconcileState.REFUSED, desired_vfs=2,
                              actual_vfs=4, eswitch_mode="legacy", reason="vf_in_use",
                              updated_at=1_700_000_000.0),
        "pfName=enp9s0f0np0": PfReconcileStatus(pf="pfName=enp9s0f0np0", resource=RESOURCE,
                                                state=ReconcileState.NOT_FOUND),
    }
    assert sample(node, "sriov_rdma_pf_reconcile_state", pf=PF, resource=RESOURCE, state="refused") == 1
    assert sample(node, "sriov_rdma_pf_reconcile_state", pf=PF, resource=RESOURCE, state="ok") == 0
    assert sample(node, "sriov_rdma_pf_reconcile_state", pf="pfName=enp9s0f0np0", resource=RESOURCE,
                  state="not_found") == 1
    assert sample(node, "sriov_rdma_pf_reconcile_timestamp_seconds", pf=PF) == 1_700_000_000.0
    assert sample(node, "sriov_rdma_pf_eswitch_mode", pf=PF, mode="legacy") == 1
    assert sample(node, "sriov_rdma_pf_eswitch_mode", pf=PF, mode="switchdev") == 0


def test_vf_health_stats_and_agent_recorded_allocation(node: Node) -> None:
    node.vf_stat("enP2p1s0f0v0", "rx_bytes").write_text("123456\n")
    node.vf_stat("enP2p1s0f0v0", "tx_dropped").write_text("5\n")
    L = {"resource": RESOURCE, "vf": VF0}
    assert sample(node, "sriov_rdma_vf_healthy", **L) == 1
    assert sample(node, "sriov_rdma_vf_receive_bytes_total", **L) == 123456
    assert sample(node, "sriov_rdma_vf_transmit_drop_total", **L) == 5
    empty = {"namespace": "", "pod": "", "container": ""}
    assert sample(node, "sriov_rdma_vf_allocated", **L, **empty) == 0
    assert sample(node, "sriov_rdma_pod_resources_up") == 0

    node.agent.ledger.records[VF0] = Allocation(VF0, RESOURCE, 0.0)
    assert sample(node, "sriov_rdma_vf_allocated", **L, **empty) == 1


def test_vf_in_a_pod_keeps_health_and_loses_only_host_stats(node: Node) -> None:
    node.agent.ledger.records[VF1] = Allocation(VF1, RESOURCE, 0.0)
    node.sim.move_netdev_to_pod("enP2p1s0f0v1")
    node.rescan()
    L = {"resource": RESOURCE, "vf": VF1}
    assert sample(node, "sriov_rdma_vf_healthy", **L) == 1
    assert sample(node, "sriov_rdma_vf_receive_bytes_total", **L) is None
    assert sample(node, "sriov_rdma_vf_info", **L, pf=PF, index="1", netdev="", rdma_device="mlx5_5") == 1


def test_pod_labels_come_from_pod_resources_when_reachable(node: Node) -> None:
    pods = FixedPods({(RESOURCE, VF1): PodRef("ml", "trainer-0", "nccl")})
    metrics(node).collector.pods = pods
    assert sample(node, "sriov_rdma_pod_resources_up") == 1
    assert sample(node, "sriov_rdma_vf_allocated", resource=RESOURCE, vf=VF1, namespace="ml", pod="trainer-0",
                  container="nccl") == 1
    assert sample(node, "sriov_rdma_vf_allocated", resource=RESOURCE, vf=VF0, namespace="", pod="",
                  container="") == 0

    pods.owners = None  # kubelet gone: no pod labels, the agent's own records take over
    assert sample(node, "sriov_rdma_pod_resources_up") == 0
    assert sample(node, "sriov_rdma_vf_allocated", resource=RESOURCE, vf=VF1, namespace="", pod="",
                  container="") == 0


def test_event_counters_from_agent_stats(node: Node) -> None:
    st = node.agent.stats
    st.inc("reconcile_actions", pf=PF, action="create_vfs")
    st.inc("reconcile_errors", pf=PF, reason="EBUSY")
    st.inc("reconcile_errors", pf=PF, reason="EBUSY")
    st.inc("health_transitions", resource=RESOURCE, to="Unhealthy")
    st.inc("kubelet_registrations", resource=RESOURCE)
    st.inc("netlink_resyncs", reason="ENOBUFS")
    assert sample(node, "sriov_rdma_reconcile_actions_total", pf=PF, action="create_vfs") == 1
    assert sample(node, "sriov_rdma_reconcile_errors_total", pf=PF, reason="EBUSY") == 2
    assert sample(node, "sriov_rdma_health_transitions_total", resource=RESOURCE, to="Unhealthy") == 1
    assert sample(node, "sriov_rdma_kubelet_registrations_total", resource=RESOURCE) == 1
    assert sample(node, "sriov_rdma_netlink_resyncs_total", reason="ENOBUFS") == 1


def test_allocate_observer_fills_the_histogram(node: Node) -> None:
    observe = metrics(node).allocate_observer(RESOURCE)
    observe(0.003, True)
    observe(0.2, False)
    L = {"resource": RESOURCE}
    assert sample(node, "sriov_rdma_allocate_duration_seconds_count", **L, result="ok") == 1
    assert sample(node, "sriov_rdma_allocate_duration_seconds_bucket", **L, result="ok", le="0.005") == 1
    assert sample(node, "sriov_rdma_allocate_duration_seconds_bucket", **L, result="error", le="0.1") == 0


class _Exploding:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"collect() ran at registration (read {name})")


def test_registration_does_not_collect(node: Node) -> None:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(AgentCollector(_Exploding(), node.agent.stats, node.agent.sysfs))  # type: ignore[arg-type]


def test_fast_exposition_parses_to_what_prometheus_client_writes(node: Node) -> None:
    node.port_file(PF, "counters", "port_rcv_data").write_text("100\n")
    metrics(node).allocate_observer(RESOURCE)(0.002, True)
    metrics(node).collector.pods = FixedPods({(RESOURCE, VF0): PodRef('we"ird\\ns', "p\nod", "c")})
    asyncio.run(metrics(node).collector.refresh_pods())

    def parsed(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {(s.name, tuple(sorted(s.labels.items())), s.value)
                for f in text_string_to_metric_families(text) for s in f.samples
                if not s.name.endswith("_created") and not s.name.startswith("process_")}

    ours = render_text(metrics(node).registry).decode()
    reference = generate_latest(metrics(node).registry).decode()
    assert parsed(ours) == parsed(reference)
    assert ('namespace="we\\"ird\\\\ns"' in ours) and ('pod="p\\nod"' in ours)
    assert "_created" not in ours
