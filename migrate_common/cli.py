"""Command-line options both daemons share, spelled the way QEMU users expect."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import Coroutine
from typing import Any

from migrate_common.log import configure_logging
from migrate_common.net import Address, parse_address
from migrate_common.settings import MigrationSettings
from migrate_common.timeline import TIMELINE
from migrate_common.tls import TlsCreds, parse_tls_object
from protocol.errors import ConfigError
from vm.machine import DEFAULT_DEVICE_OPTIONS, VirtualMachine
from vm.properties import parse_device_option
from vm.ram import parse_memory_backend, parse_memory_option
from vm.workload import parse_workload_option

__all__ = ["common_parser", "build_vm", "build_settings", "build_tls_objects", "run_main",
           "qmp_address"]


def common_parser(prog: str, description: str, default_qmp: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--qmp", default=default_qmp, metavar="ADDR",
                        help="QMP management socket: unix:PATH or tcp:HOST:PORT "
                             f"(default {default_qmp}; TCP only when asked)")
    parser.add_argument("--uuid", help="VM UUID; both sides must use the same one "
                                       "(default: all zero, as QEMU without -uuid)")
    parser.add_argument("--device", action="append", default=[], metavar="OPTS",
                        help="a device, QEMU -device syntax, e.g. "
                             "vfio-sim,id=gpu0,state-size=512M (repeatable; default: the "
                             "embedded VM with 4 devices of 256 MiB)")
    parser.add_argument("--nodefaults", action="store_true",
                        help="no default devices: only those given with --device (QEMU's "
                             "-nodefaults)")
    parser.add_argument("--memory", metavar="SIZE[,fill=zero|random|mixed][,block=NAME:SIZE]",
                        help="guest RAM, e.g. 1G (block pc.ram); both sides need the same "
                             "(default: no guest RAM)")
    parser.add_argument("--memory-backend", default="anonymous",
                        metavar="anonymous|file:DIR[,share=on]",
                        help="what backs guest RAM: anonymous memory, or one file per RAM "
                             "block in DIR (e.g. under /dev/shm) to inspect it afterwards")
    parser.add_argument("--workload", metavar="dirty-rate=RATE,pattern=random|sequential|"
                        "hotspot,seed=N",
                        help="a guest that writes RAM while the VM runs (source: from the "
                             "start; destination: once the migrated VM runs)")
    parser.add_argument("--object", action="append", default=[], metavar="tls-creds-x509,...",
                        help="TLS credentials, QEMU style: tls-creds-x509,id=tls0,dir=PATH"
                             "[,verify-peer=on|off]; select with --parameter tls-creds=tls0")
    parser.add_argument("--capability", action="append", default=[], metavar="NAME=on|off",
                        help="set a migration capability at start (like "
                             "migrate-set-capabilities), e.g. multifd=on")
    parser.add_argument("--parameter", action="append", default=[], metavar="NAME=VALUE",
                        help="set a migration parameter at start, e.g. multifd-channels=4")
    parser.add_argument("--log-level", default=os.environ.get("MIGRATE_LOG_LEVEL", "info"))
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    parser.add_argument("--trace-packets", action="store_true",
                        help="log every packet on every channel (debug)")
    parser.add_argument("--timeline", metavar="PATH",
                        help="record every packet's times; written to PATH as JSON lines "
                             "when a migration ends (bench/timeline.py reads it)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop implementation (default uvloop)")
    return parser


def build_vm(args: argparse.Namespace, role: str) -> VirtualMachine:
    options = args.device or ([] if args.nodefaults else list(DEFAULT_DEVICE_OPTIONS))
    configs = [parse_device_option(text) for text in options]
    vm_uuid = uuid.UUID(args.uuid) if args.uuid else uuid.UUID(int=0)
    memory = parse_memory_option(args.memory) if args.memory else None
    backend = parse_memory_backend(args.memory_backend)
    workload = parse_workload_option(args.workload) if args.workload else None
    return VirtualMachine(configs, uuid=vm_uuid, role=role,  # type: ignore[arg-type]
                          memory=memory, memory_backend=backend, workload=workload)


def build_settings(args: argparse.Namespace) -> MigrationSettings:
    settings = MigrationSettings()
    for item in args.capability:
        name, sep, value = item.partition("=")
        if not sep or value not in ("on", "off", "true", "false"):
            raise ConfigError(f"--capability {item!r}: expected NAME=on|off")
        settings.set_capability(name, value in ("on", "true"))
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--parameter {item!r}: expected NAME=VALUE")
        settings.set_parameter_text(name, value)
    return settings


def build_tls_objects(args: argparse.Namespace) -> dict[str, TlsCreds]:
    objects: dict[str, TlsCreds] = {}
    for text in args.object:
        creds = parse_tls_object(text)
        if creds.id in objects:
            raise ConfigError(f"--object: duplicate id {creds.id!r}")
        objects[creds.id] = creds
    return objects


def qmp_address(args: argparse.Namespace) -> Address:
    return parse_address(args.qmp)


def run_main(args: argparse.Namespace, make: Any) -> int:
    """Configure logging, pick the loop, build the daemon with ``make()`` and run it."""
    configure_logging(args.log_level, json=args.log_json, trace_packets=args.trace_packets)
    try:
        if args.timeline:
            TIMELINE.enable(args.timeline)
        coro: Coroutine[Any, Any, None] = make()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
