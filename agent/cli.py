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

from agent import __version__
from agent.adapters.health_server import fetch_status
from agent.app import build_agent, load_config
from agent.errors import AgentError
from agent.logs import ctx, setup_logging
from agent.settings import DEFAULT_HEALTH_ADDRESS, Settings, env_name
from agent.status import render

log = logging.getLogger("agent")

# flag -> (Settings field, help). Each flag also reads SRIOV_RDMA_AGENT_<FLAG>.
_FLAGS: dict[str, tuple[str, str]] = {
    "--config": ("config", "agent config file (YAML)"),
    "--sysfs-root": ("sysfs_root", "directory holding sys/ (\"/\" on a node)"),
    "--dev-root": ("dev_root", "directory holding dev/ whose device nodes are handed to pods"),
    "--device-plugin-dir": ("device_plugin_dir", "kubelet device-plugin directory (holds kubelet.sock)"),
    "--devinfo-dir": ("devinfo_dir", "where device-info files for Multus are written"),
    "--pod-resources-socket": ("pod_resources_socket", "kubelet PodResources API socket (read-only use)"),
    "--metrics-address": ("metrics_address", "host:port of the Prometheus metrics endpoint"),
    "--health-address": ("health_address", "host:port of the gRPC health (grpc.health.v1) endpoint"),
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
    status.add_argument("--address",
                        default=os.environ.get(env_name("--health-address"), DEFAULT_HEALTH_ADDRESS),
                        help="the agent's --health-address (0.0.0.0 is asked on 127.0.0.1) "
                             f"[env {env_name('--health-address')}; default {DEFAULT_HEALTH_ADDRESS!r}]")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from agent.demo import run_demo  # noqa: PLC0415 (the simulated node is not `serve`'s to load)

        setup_logging(args.log_format, args.log_level)
        return run_demo(once=args.once, metrics_address=args.metrics_address,
                        health_address=args.health_address)
    if args.command == "status":
        return show_status(args.address, args.json)
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
    agent = build_agent(settings, config)
    if settings.dry_run:
        from agent.lifecycle import print_dry_run  # noqa: PLC0415 (see build_agent)

        return await print_dry_run(agent)
    agent.extra_tasks.extend(agent.health_watch.host_tasks())  # netlink + uevent health events
    log.info("starting sriov-rdma-agent %s with %d resource(s)", __version__, len(config.resources),
             extra=ctx("startup", settings=settings.__dict__))
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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


def show_status(address: str, as_json: bool) -> int:
    """Ask the running agent (over its health port) and print tables, or the JSON document."""
    try:
        doc = asyncio.run(fetch_status(address))
    except AgentError as e:
        print(f"sriov-rdma-agent status: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
