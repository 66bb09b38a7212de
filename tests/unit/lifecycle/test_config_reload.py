"""Config hot-reload: a new valid config is adopted and reconciled; an invalid one is rejected, with
the field named, and the last good config stays in force."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.adapters.executor import Timeouts
from agent.app import build_agent
from agent.config import parse_config
from agent.errors import ConfigError
from agent.sim.kernel import SimKernel, SimNetlink
from agent.sim.node import dgx_spark
from tests.conftest import CX7_CONFIG, RESOURCE, node_settings

PF_LINE = "      - pfName: enP2p1s0f0np0\n"
HEAD = f"resources:\n  - resourceName: {RESOURCE}\n    pfs:\n"

BAD = [
    ("negative numVfs", HEAD + PF_LINE + "        numVfs: -1\n", "numVfs"),
    ("huge numVfs", HEAD + PF_LINE + "        numVfs: 100000\n", "numVfs"),
    ("numVfs as a string", HEAD + PF_LINE + "        numVfs: \"4\"\n", "numVfs"),
    ("trust not a bool", HEAD + PF_LINE + "        numVfs: 4\n        trust: yes please\n", "trust"),
    ("unknown field", HEAD + PF_LINE + "        numVFs: 4\n", "numVFs"),
    ("same PF in two resources", CX7_CONFIG + "  - resourceName: example.com/other\n    pfs:\n" + PF_LINE
     + "        numVfs: 2\n", "resources[1].pfs[0]"),
    ("not YAML", "resources: [\n", "line"),
]


@pytest.mark.parametrize(("name", "text", "field"), BAD, ids=[b[0] for b in BAD])
def test_invalid_config_is_rejected_and_the_last_good_one_kept(sim_root: Path, name: str, text: str,
                                                               field: str) -> None:
    node = dgx_spark(sim_root / "node", numvfs=0)
    settings = node_settings(node.root)
    Path(settings.config).write_text(CX7_CONFIG)
    nl = SimNetlink(node)
    agent = build_agent(settings, parse_config(CX7_CONFIG), writer=SimKernel(node, netlink=nl), netlink=nl,
                        timeouts=Timeouts(vf_wait=5))
    lc = agent.lifecycle
    good = agent.resources.config
    Path(settings.config).write_text(text)
    assert asyncio.run(lc.reload_config()) is False
    assert agent.resources.config is good and field in lc.config_error
    assert agent.metrics is not None  # the exported counter, as a scrape reads it
    registry = agent.metrics.registry
    assert registry.get_sample_value("sriov_rdma_config_reloads_total", {"result": "invalid"}) == 1
    Path(settings.config).write_text(CX7_CONFIG.replace("numVfs: 4", "numVfs: 2"))
    assert asyncio.run(lc.reload_config()) is True and lc.config_error == ""
    assert agent.resources.config.resources[0].pfs[0].num_vfs == 2
    asyncio.run(lc.reconcile("config changed"))
    assert node.pf("enP2p1s0f0np0").numvfs == 2


def test_lifecycle_timeouts_from_config_apply_to_the_next_reconcile(sim_root: Path) -> None:
    node = dgx_spark(sim_root / "node", numvfs=0)
    # The simulated firmware takes 0.5 s per VF batch; the config allows 0.2 s for the VFs to appear.
    text = "lifecycle:\n  vfWaitTimeoutSeconds: 0.2\n  sysfsWriteTimeoutSeconds: 5\n" + CX7_CONFIG
    settings = node_settings(node.root)
    Path(settings.config).write_text(text)
    nl = SimNetlink(node)
    kernel = SimKernel(node, netlink=nl, vf_delay=0.5)
    agent = build_agent(settings, parse_config(text), writer=kernel, netlink=nl,
                        timeouts=Timeouts(vf_wait=60))
    lc = agent.lifecycle
    asyncio.run(lc.reconcile("startup"))
    kernel.settle()
    st = agent.reporter.reconcile_status["0002:01:00.0"]
    assert (st.state, st.reason) == ("error", "timeout") and "0 of 4 virtfn links" in st.message
    assert lc.executor.timeouts.vf_wait == 0.2 and lc.executor.timeouts.sysfs_write == 5


@pytest.mark.parametrize("value", ["0", "-1", "4000", '"10"', "true", "[1]"])
def test_bad_lifecycle_timeouts_are_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match=r"lifecycle\.vfWaitTimeoutSeconds: must be a number of seconds"):
        parse_config(f"lifecycle: {{vfWaitTimeoutSeconds: {value}}}\n" + CX7_CONFIG)
