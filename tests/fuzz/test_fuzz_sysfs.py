"""The sysfs readers over generated trees: a simulated ConnectX-7 node with files replaced by garbage,
huge files, FIFOs, directories, symlink loops or nothing. Every reader either answers or raises a
SysfsError naming a path; the agent's full scan never raises at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.sysfs import SysfsHost
from agent.app import build_agent
from agent.config import parse_config
from agent.errors import SysfsError
from agent.sim.node import SimNode, dgx_spark
from tests.conftest import node_settings

CONFIG = parse_config(
    "resources:\n  - resourceName: nvidia.com/cx7_qsfp\n    pfs:\n"
    "      - {pfName: enP2p1s0f0np0, numVfs: 2}\n      - {pciAddress: '0002:01:00.1', numVfs: 0}\n"
    "  - resourceName: example.com/all\n    pfs:\n      - {vendor: '15b3', device: '1021', numVfs: 0}\n")


def _breakable(root: Path) -> list[str]:
    """Every file and directory of the node's sys/devices tree, relative to root (the breakable parts)."""
    base = root / "sys/devices"
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*dirnames, *filenames]:
            out.append(str((Path(dirpath) / name).relative_to(root)))
    return sorted(out)


@pytest.fixture(scope="module")
def template() -> Iterator[tuple[Path, list[str]]]:
    """One pristine node, copied for every example (building it costs more than copying it)."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="sra-fz-", dir=shm))
    node = dgx_spark(base / "node", numvfs=2)
    yield node.root, _breakable(node.root)
    shutil.rmtree(base, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def garbage(data: bytes) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        _remove(path)
        path.write_bytes(data)
    return apply


def huge(path: Path) -> None:
    _remove(path)
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: costs nothing unless read whole


def fifo(path: Path) -> None:
    _remove(path)
    os.mkfifo(path)


def loop(path: Path) -> None:
    _remove(path)
    os.symlink(path.name, path)


def directory(path: Path) -> None:
    _remove(path)
    path.mkdir()


MUTATIONS = st.one_of(
    st.binary(max_size=64).map(garbage),
    st.sampled_from([b"", b"\x00", b"4\n\x00", b"-1\n", b"\xff\xfe", b"9" * 5000, b"0x\n", b"\xe2\x82\n",
                     b"4: ACTIVE\n\x1b[31m"]).map(garbage),
    st.sampled_from([huge, fifo, loop, directory, _remove]),
)


@settings(max_examples=50)
@given(data=st.data())
def test_readers_raise_only_sysfs_errors_and_the_scan_never_raises(template: tuple[Path, list[str]],
                                                                   data: st.DataObject) -> None:
    pristine, parts = template
    work = Path(tempfile.mkdtemp(prefix="sra-fz-", dir=pristine.parent))
    try:
        root = work / "node"
        shutil.copytree(pristine, root, symlinks=True)
        picks = data.draw(st.lists(st.tuples(st.sampled_from(parts), MUTATIONS), min_size=1, max_size=6))
        for rel, mutate in picks:
            target = root / rel
            if target.parent.is_dir() and not target.parent.is_symlink():
                mutate(target)
        exercise(SysfsHost(root), SimNode(root))
        agent = build_agent(node_settings(root), CONFIG)
        agent.inventory.scan()  # problems are reported in the result, never raised
    finally:
        shutil.rmtree(work, ignore_errors=True)


def exercise(host: SysfsHost, node: SimNode) -> None:
    def call(fn: Callable[[], object]) -> object:
        try:
            return fn()
        except SysfsError as e:
            assert e.path and len(str(e)) < 1000
            return None

    pci = call(host.list_pci)
    addresses = [d.pci_address for d in pci] if isinstance(pci, list) else []
    for addr in addresses:
        call(lambda a=addr: host.read_pf(a))  # type: ignore[misc]
        call(lambda a=addr: host.vf_links(a))  # type: ignore[misc]
        call(lambda a=addr: host.driver_of(a))  # type: ignore[misc]
        for kind in ("net", "infiniband"):
            call(lambda a=addr, k=kind: host.children(a, k))  # type: ignore[misc]
    for name in ("enP2p1s0f0np0", "enP2p1s0f1np1", "enP2p1s0f0v0", "enp1s0f0np0"):
        call(lambda n=name: host.netdev_pci_address(n))  # type: ignore[misc]
        call(lambda n=name: host.read_netdev(n))  # type: ignore[misc]
        call(lambda n=name: host.read_netdev_stats(n, ("rx_bytes", "tx_bytes")))  # type: ignore[misc]
        call(lambda n=name: host.netdev_mtu("0002:01:00.0", n))  # type: ignore[misc]
    for i in range(8):
        call(lambda i=i: host.read_rdma(f"mlx5_{i}"))  # type: ignore[misc]
        for group in ("counters", "hw_counters"):
            call(lambda i=i, g=group: host.read_port_counters(f"mlx5_{i}", 1, g))  # type: ignore[misc]
    call(lambda: host.dev_path_exists("/dev/infiniband/rdma_cm"))
