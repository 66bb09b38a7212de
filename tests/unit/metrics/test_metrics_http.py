"""The metrics endpoint over real HTTP on loopback: what a scraper and a curious human get."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from obs_node import make_node

from agent.errors import ConfigError
from agent.settings import split_address


async def request(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


def test_http_endpoint(tmp_path: Path) -> None:
    node = make_node(tmp_path, metrics_address="127.0.0.1:0")

    async def scenario() -> None:
        await node.agent.inventory.rescan()
        await node.agent.start_observability()
        server = node.agent.metrics_server
        assert server is not None
        try:
            status, headers, body = await request(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == "HTTP/1.1 200 OK"
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            assert int(headers["content-length"]) == len(body)
            assert b'sriov_rdma_pf_vfs{pf="0002:01:00.0"} 4.0' in body

            status, headers, body = await request(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert status == "HTTP/1.1 200 OK" and body == b"" and int(headers["content-length"]) > 1000

            status, _, body = await request(server.port, b"GET /debug HTTP/1.1\r\n\r\n")
            assert status == "HTTP/1.1 404 Not Found" and b"/metrics" in body
            status, headers, _ = await request(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert status == "HTTP/1.1 405 Method Not Allowed" and headers["allow"] == "GET, HEAD"
            status, _, _ = await request(server.port, b"garbage\r\n\r\n")
            assert status == "HTTP/1.1 400 Bad Request"
            assert server.scrapes == 2
        finally:
            await node.agent.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("address", ["9808", "localhost:", "host:99999", ""])
def test_bad_address_is_a_config_error_naming_the_flag(address: str) -> None:
    with pytest.raises(ConfigError) as err:
        split_address(address, "--metrics-address")
    assert err.value.field == "--metrics-address" and err.value.value == address


def test_ipv6_and_wildcard_addresses() -> None:
    assert split_address("[::1]:9808", "--metrics-address") == ("::1", 9808)
    assert split_address(":9809", "--health-address") == ("0.0.0.0", 9809)


def test_busy_ports_stop_serve_with_a_clear_error(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        flags = ("--metrics-address", "--health-address")
        for flag, other in (flags, flags[::-1]):
            s = node.agent.settings
            res = subprocess.run(
                [sys.executable, "-m", "agent", "serve", "--config", s.config, "--sysfs-root", s.sysfs_root,
                 "--dev-root", s.dev_root, "--device-plugin-dir", s.device_plugin_dir,
                 "--devinfo-dir", s.devinfo_dir, "--pod-resources-socket", s.pod_resources_socket,
                 flag, f"127.0.0.1:{port}", other, "127.0.0.1:0"],
                capture_output=True, text=True, timeout=60, check=False)
            assert res.returncode == 2, res.stderr
            assert f"{flag} 127.0.0.1:{port}: cannot listen" in res.stderr
