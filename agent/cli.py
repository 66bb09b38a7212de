"""Command line: flags (each also an environment variable) -> Settings -> the app."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields

from agent import __version__, entry
from agent.adapters.nodelock import NodeLock, lock_name
from agent.adapters.status_server import fetch_status
from agent.app import HOST_WATCHERS, App, build_agent, load_config
from agent.core.status import render
from agent.errors import AgentError
from agent.logs import ctx, setup_logging
from agent.services.guard import guarded
from agent.settings import DEFAULT_STATUS_SOCKET, Settings, env_name

log = logging.getLogger("agent")

# flag -> (Settings field, help). Each flag also reads SRIOV_RDMA_AGENT_<FLAG>.
_FLAGS: dict[str, tuple[str, str]] = {
    "--config": ("config", "agent config file (YAML)"),
    "--sysfs-root": ("sysfs_root", "directory holding sys/ (\"/\" on a node)"),
    "--dev-root": ("dev_root", "directory holding dev/ whose device nodes are handed to pods"),
    "--device-plugin-dir": ("device_plugin_dir", "kubelet device-plugin directory (holds kubelet.sock)"),
    "--devinfo-dir": ("devinfo_dir", "where device-info files for Multus are written"),
    "--pod-resources-socket": ("pod_resources_socket", "kubelet PodResources API socket (read-only use)"),
    "--state-dir": ("state_dir", "agent-owned state kept across restarts (VFs fenced for a reset)"),
    "--metrics-address": ("metrics_address", "host:port of the Prometheus metrics endpoint"),
    "--health-address": ("health_address", "host:port of the gRPC health (grpc.health.v1) endpoint"),
    "--status-socket": ("status_socket", "unix socket `sriov-rdma-agent status` asks (empty: off)"),
    "--log-format": ("log_format", "text or json"),
    "--log-level": ("log_level", "debug, info, warning or error"),
    "--node-name": ("node_name", "this node's name (downward API); seeds stable VF MACs"),
}


def _add_settings_flags(p: argparse.ArgumentParser, defaults: Settings) -> None:
    for flag, (name, help_text) in _FLAGS.items():
        default = getattr(defaults, name)
        p.add_argument(flag, dest=name, default=os.environ.get(env_name(flag), default),
                       help=f"{help_text} [env {env_name(flag)}; default {default!r}]")


def settings_from_args(ns: argparse.Namespace) -> Settings:
    values = {f.name: getattr(ns, f.name) for f in fields(Settings) if hasattr(ns, f.name)}
    if values.get("log_format") not in ("text", "json"):
        raise SystemExit(f"--log-format: must be text or json, got {values.get('log_format')!r}")
    if str(values.get("log_level", "info")).lower() not in ("debug", "info", "warning", "error"):
        raise SystemExit(f"--log-level: must be debug, info, warning or error, "
                         f"got {values.get('log_level')!r}")
    return Settings(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sriov-rdma-agent", description="SR-IOV RDMA VFs as kubelet resources")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the node agent (DaemonSet entry point)")
    _add_settings_flags(serve, Settings())
    serve.add_argument("--dry-run", action="store_true",
                       default=os.environ.get(env_name("--dry-run"), "") in ("1", "true", "yes"),
                       help=f"print the reconcile plan and change nothing [env {env_name('--dry-run')}]")

    demo = sub.add_parser("demo", help="run the agent against a built-in simulated DGX Spark node")
    demo.add_argument("--once", action="store_true", help="print the demo and exit instead of serving")
    demo.add_argument("--log-format", default="text", choices=["text", "json"])
    demo.add_argument("--log-level", default="warning")
    demo.add_argument("--metrics-address", default="127.0.0.1:9808")
    demo.add_argument("--health-address", default="127.0.0.1:9809")

    status = sub.add_parser("status", help="print PFs, VFs, health, allocations and pods of the agent")
    status.add_argument("--status-socket", dest="status_socket",
                        default=os.environ.get(env_name("--status-socket"), DEFAULT_STATUS_SOCKET),
                        help="the agent's --status-socket (run it where the agent runs: kubectl exec) "
                             f"[env {env_name('--status-socket')}; default {DEFAULT_STATUS_SOCKET!r}]")
    status.add_argument("--json", action="store_true", help="print the raw status document")

    doctor = sub.add_parser(
        "doctor", help="check this node for RDMA pods and say how to fix it (Talos machine-config snippets); "
                       "exit 0 all well, 1 problems, 2 cannot check")
    _add_settings_flags(doctor, Settings())
    doctor.add_argument("--json", action="store_true", help="print the checks as a JSON document")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from agent.demo import run_demo  # noqa: PLC0415 (the simulated node is not `serve`'s to load)

        setup_logging(args.log_format, args.log_level)
        return run_demo(once=args.once, metrics_address=args.metrics_address,
                        health_address=args.health_address)
    if args.command == "status":
        return show_status(args.status_socket, args.json)
    if args.command == "doctor":
        from agent.doctor import run_doctor  # noqa: PLC0415 (not `serve`'s to load)

        code, text = run_doctor(settings_from_args(args), args.json)
        print(text)
        return code
    if args.command == "serve":
        settings = settings_from_args(args)
        setup_logging(settings.log_format, settings.log_level)
        try:
            return asyncio.run(serve(settings))
        except AgentError as e:
            log.error("%s", e, extra=ctx("startup"))
            return 2
    return 1


async def serve(settings: Settings) -> int:
    config = load_config(settings.config)
    agent = build_agent(settings, config, metrics=bool(settings.metrics_address), watchers=HOST_WATCHERS)
    if settings.dry_run:  # what a reconcile would do now; nothing is written
        from agent.core.reconcile import format_plan  # noqa: PLC0415 (see build_agent)

        print(format_plan(await agent.lifecycle.dry_run()))
        return 0
    # One agent per node, decided before any socket is touched (a second one exits 2 here).
    lock = NodeLock(lock_name(settings.device_plugin_dir))
    lock.acquire()
    try:
        return await _serve(settings, agent, lock)
    finally:
        lock.close()


async def _serve(settings: Settings, agent: App, lock: NodeLock) -> int:
    lock.serve()
    log.info("starting sriov-rdma-agent %s with %d resource(s)", __version__,
             len(agent.resources.config.resources),
             extra=ctx("startup", settings=settings.__dict__))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, agent, reloads)
    if entry.take_early_sighup():  # asked for while starting: the config may have changed since it was read
        _on_sighup(agent, reloads)
    await agent.start_observability()
    runner = asyncio.create_task(agent.run())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if runner in done:
        runner.result()  # a root task died: surface it and exit non-zero
        return 1
    log.info("SIGTERM: stopping; VFs are left as they are", extra=ctx("shutdown"))
    await agent.shutdown()
    return 0


def _on_sighup(agent: App, reloads: set[asyncio.Task[None]]) -> None:
    """SIGHUP re-reads the config file and applies it, exactly as a ConfigMap update does (even when
    the file is unchanged: a rescan and a reconcile follow). It never stops the agent."""
    lifecycle = agent.lifecycle
    log.info("SIGHUP: re-reading the config", extra=ctx("config-reload", agent.settings.config))

    async def reload() -> None:
        await lifecycle.reload_config(force=True)

    task = asyncio.get_running_loop().create_task(guarded("SIGHUP config reload", reload, agent.stats)())
    reloads.add(task)
    task.add_done_callback(reloads.discard)


def show_status(socket_path: str, as_json: bool) -> int:
    """Ask the running agent (over its status socket) and print tables, or the JSON document."""
    try:
        doc = asyncio.run(fetch_status(socket_path))
    except AgentError as e:
        print(f"sriov-rdma-agent status: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
