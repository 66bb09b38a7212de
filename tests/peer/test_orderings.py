"""Kubelet orderings with both plugins: what each does when the kubelet restarts or is not up yet.

The peer notices a kubelet restart only by polling its own socket every 5 s, so its waits here
allow for a full poll interval plus start-up under load.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from agent._pb.deviceplugin.v1beta1 import api_pb2
from agent.sim.peer import PeerNode, PluginProcess

from .conftest import (
    DELIBERATE,
    RESOURCE,
    SOCKET,
    RecordingKubelet,
    kubelet_for,
    running,
    serving,
    until,
    wait_listed,
)

pytestmark = pytest.mark.peer


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


Files = dict[str, tuple[str, str]]


async def _restart_round(node: PeerNode, kubelet: RecordingKubelet,
                         proc: PluginProcess) -> tuple[list[api_pb2.RegisterRequest], Files]:
    """Register, then a kubelet restart with the device-info files gone: re-registration and files."""
    async with running(proc):
        seen, asked = len(kubelet.registrations), len(kubelet.requests)
        await wait_listed(kubelet, proc, seen)
        node.clear_devinfo()
        await kubelet.restart()
        await wait_listed(kubelet, proc, seen + 1, timeout=30)
        await kubelet.allocate(RESOURCE, [node.vfs()[0]])  # a round trip for stragglers
        requests = kubelet.requests[asked:]
        devinfo = {name: v for name, v in node.devinfo().items() if node.vfs()[0] not in name}
        await proc.kill()
    return requests, devinfo


def test_kubelet_restart_one_more_register_each_and_device_info_rewritten(node: PeerNode) -> None:
    async def body() -> None:
        async with serving(kubelet_for(node)) as kubelet:
            peer_requests, peer_devinfo = await _restart_round(node, kubelet, node.peer())
            our_requests, our_devinfo = await _restart_round(node, kubelet, node.ours())
        assert len(peer_requests) == 2  # one Register per kubelet.sock
        assert [(r.version, r.endpoint, r.resource_name) for r in our_requests] == \
            [(r.version, r.endpoint, r.resource_name) for r in peer_requests]
        # The peer writes a file for every VF when it serves again; Allocate wrote only the first VF's.
        assert sorted(peer_devinfo) == [f"nvidia.com-cx7_qsfp-{vf}-device.json" for vf in node.vfs()[1:]]
        assert our_devinfo == peer_devinfo

    asyncio.run(body())


def test_no_kubelet_at_start_the_peer_exits_ours_registers_when_it_comes(node: PeerNode) -> None:
    assert "kubelet-absent" in DELIBERATE

    async def body() -> None:
        async with serving(kubelet_for(node), start=False) as kubelet:
            async with running(node.peer()) as peer:
                code = await peer.wait(timeout=30)
            assert code not in (None, 0)
            assert "unable to register with Kubelet" in peer.log()

            sock = os.path.join(node.settings.device_plugin_dir, SOCKET)
            stale = _inode(sock)  # the peer's, left behind by its fatal exit
            async with running(node.ours()) as ours:
                await until(lambda: _inode(sock) not in (None, stale), "our socket serving")
                # Its first Register has failed, so the kubelet's socket wipe cannot race an attempt.
                await until(lambda: "kubelet not ready" in ours.log(), "our first Register failing")
                await kubelet.start()
                await wait_listed(kubelet, ours)
                await kubelet.allocate(RESOURCE, [node.vfs()[0]])  # a round trip for a straggler Register
                assert ours.returncode is None
                assert len(kubelet.requests) == 1, ours.log()[-3000:]

    asyncio.run(body())
