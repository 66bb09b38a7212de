"""`sriov-rdma-agent serve` as a real process: flags, env vars, JSON logs, SIGTERM, hands off sysfs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser, settings_from_args
from agent.sim.kubelet import FakeKubelet
from agent.sim.node import SimNode
from tests.conftest import CX7_CONFIG, RESOURCE

SOCKET_NAME = "nvidia.com_cx7_qsfp.sock"


def _sysfs_fingerprint(root: Path) -> str:
    """Every file, link target and file content under sys/: any write by the agent changes it."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root / "sys")):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            h.update(path.encode())
            if os.path.islink(path):
                h.update(os.readlink(path).encode())
            else:
                h.update(Path(path).read_bytes())
    return h.hexdigest()


async def _spawn(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def test_serve_registers_then_sigterm_exits_0_removes_socket_and_leaves_sysfs(sim_node: SimNode,
                                                                              sim_root: Path) -> None:
    root = sim_node.root
    config = sim_root / "agent.yaml"
    config.write_text(CX7_CONFIG)
    plugin_dir = root / "var/lib/kubelet/device-plugins"
    devinfo = sim_root / "devinfo"
    numvfs = (sim_node.device_dir("0002:01:00.0") / "sriov_numvfs").read_text()
    before = _sysfs_fingerprint(root)

    async def body() -> tuple[int, bytes]:
        kubelet = FakeKubelet(str(plugin_dir))
        await kubelet.start()
        # Paths as flags, the rest through SRIOV_RDMA_AGENT_* environment variables.
        proc = await _spawn(
            ["serve", "--sysfs-root", str(root), "--dev-root", str(root),
             "--device-plugin-dir", str(plugin_dir), "--metrics-address", ""],
            {"SRIOV_RDMA_AGENT_CONFIG": str(config), "SRIOV_RDMA_AGENT_DEVINFO_DIR": str(devinfo),
             "SRIOV_RDMA_AGENT_LOG_FORMAT": "json", "SRIOV_RDMA_AGENT_HEALTH_ADDRESS": "",
             "SRIOV_RDMA_AGENT_STATUS_SOCKET": str(sim_root / "status.sock")})
        try:
            await kubelet.wait_for(lambda: len(kubelet.healthy(RESOURCE)) == 4, timeout=20)
            resp = await kubelet.allocate(RESOURCE, ["0002:01:00.2"])
            assert resp.envs["PCIDEVICE_NVIDIA_COM_CX7_QSFP"] == "0002:01:00.2"
            assert (devinfo / "nvidia.com-cx7_qsfp-0002:01:00.2-device.json").exists()  # env var honoured
            assert (plugin_dir / SOCKET_NAME).exists()
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 10)
            await kubelet.wait_for(lambda: kubelet.endpoints[RESOURCE].stopped, timeout=5)
            assert kubelet.healthy(RESOURCE) == []
            return proc.returncode or 0, err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await kubelet.stop()

    code, err = asyncio.run(body())
    assert code == 0, err.decode()
    assert not (plugin_dir / SOCKET_NAME).exists()
    assert (sim_node.device_dir("0002:01:00.0") / "sriov_numvfs").read_text() == numvfs
    assert _sysfs_fingerprint(root) == before
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    actions = {(line.get("action"), line.get("resource")) for line in lines}
    assert ("register", RESOURCE) in actions
    assert ("allocate", RESOURCE) in actions
    assert any(line.get("action") == "shutdown" for line in lines)
    assert all({"ts", "level", "msg"} <= line.keys() for line in lines)


def test_serve_with_bad_config_exits_2_naming_the_field(sim_node: SimNode, sim_root: Path) -> None:
    config = sim_root / "bad.yaml"
    config.write_text(CX7_CONFIG.replace("numVfs: 4", "numVfs: -3"))

    async def body() -> tuple[int, bytes]:
        proc = await _spawn(["serve", "--config", str(config), "--sysfs-root", str(sim_node.root),
                             "--device-plugin-dir", str(sim_root / "dp"), "--metrics-address", "",
                             "--health-address", "", "--status-socket", ""], {})
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        return proc.returncode or 0, err

    code, err = asyncio.run(body())
    assert code == 2
    assert "resources[0].pfs[0].numVfs" in err.decode() and "-3" in err.decode()
    assert not (sim_root / "dp" / SOCKET_NAME).exists()


def test_flag_beats_env_and_help_names_every_env_var(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SRIOV_RDMA_AGENT_SYSFS_ROOT", "/from/env")
    monkeypatch.setenv("SRIOV_RDMA_AGENT_DEV_ROOT", "/dev/from/env")
    settings = settings_from_args(build_parser().parse_args(["serve", "--sysfs-root", "/from/flag"]))
    assert (settings.sysfs_root, settings.dev_root) == ("/from/flag", "/dev/from/env")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    serve_help = capsys.readouterr().out
    for env in ("CONFIG", "SYSFS_ROOT", "DEV_ROOT", "DEVICE_PLUGIN_DIR", "DEVINFO_DIR", "METRICS_ADDRESS",
                "HEALTH_ADDRESS", "STATUS_SOCKET", "LOG_FORMAT", "LOG_LEVEL"):
        assert f"SRIOV_RDMA_AGENT_{env}" in serve_help


def test_bad_log_format_is_refused() -> None:
    with pytest.raises(SystemExit, match="--log-format"):
        settings_from_args(build_parser().parse_args(["serve", "--log-format", "xml"]))
