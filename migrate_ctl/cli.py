"""``migrate-ctl``: drive either daemon over QMP from a shell.

Examples::

    migrate-ctl --qmp unix:/tmp/migrate-dst.qmp incoming tcp:0.0.0.0:4444
    migrate-ctl --qmp unix:/tmp/migrate-src.qmp migrate tcp:127.0.0.1:4444 --channels 4
    migrate-ctl --qmp unix:/tmp/migrate-src.qmp status
    migrate-ctl --qmp unix:/tmp/migrate-src.qmp cancel

``migrate`` sets the capabilities it needs on the source (multifd, return-path,
events; ``--channels`` sets multifd-channels) and then shows a live progress view
until the migration ends; the destination must have been started with the same
settings (``--capability``/``--parameter`` on its command line, or this tool's
``set-capability``/``set-parameter`` against its socket).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from migrate_common.qmp_client import QmpClient, QmpCommandError, QmpConnectionError
from migrate_common.settings import BOOLEAN_PARAMETERS, SIZE_PARAMETERS, bool_text
from migrate_ctl.progress import human_bytes, summary_lines, watch
from protocol.errors import ConfigError
from vm.properties import parse_size

DEFAULT_QMP = os.environ.get("MIGRATE_QMP", "unix:/tmp/migrate-src.qmp")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="migrate-ctl", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'migrate-ctl COMMAND -h' for a command's options.")
    p.add_argument("--qmp", default=DEFAULT_QMP,
                   help=f"daemon QMP socket (default {DEFAULT_QMP}; env MIGRATE_QMP)")
    p.add_argument("--timeout", type=float, default=10.0, help="connect timeout, seconds")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="start a migration on the source and watch it")
    m.add_argument("uri", help="destination address, tcp:HOST:PORT or unix:PATH")
    m.add_argument("--channels", type=int, help="multifd-channels (1..255)")
    m.add_argument("--no-multifd", action="store_true", help="send everything on the main "
                   "channel (QEMU 9.x style), for comparison")
    m.add_argument("--no-return-path", action="store_true")
    m.add_argument("--switchover-ack", action="store_true")
    m.add_argument("--detach", action="store_true", help="return at once, don't watch")
    m.add_argument("--json", action="store_true", help="print the final query-migrate as JSON")
    i = sub.add_parser("incoming", help="make the destination listen (migrate-incoming)")
    i.add_argument("uri")
    s = sub.add_parser("status", help="query-migrate, readable (or --json)")
    s.add_argument("--json", action="store_true")
    w = sub.add_parser("watch", help="live progress until the migration ends")
    w.add_argument("--json", action="store_true")
    sub.add_parser("cancel", help="migrate_cancel")
    sc = sub.add_parser("set-capability", help="migrate-set-capabilities NAME on|off")
    sc.add_argument("name")
    sc.add_argument("state", choices=("on", "off"))
    sp = sub.add_parser("set-parameter", help="migrate-set-parameters NAME VALUE")
    sp.add_argument("name")
    sp.add_argument("value")
    sub.add_parser("capabilities", help="query-migrate-capabilities (all, on or off)")
    sub.add_parser("parameters", help="query-migrate-parameters")
    sub.add_parser("digest", help="x-query-state-digest: per-device state digests")
    qg = sub.add_parser("qom-get", help="read a device property")
    qg.add_argument("device")
    qg.add_argument("property")
    qs = sub.add_parser("qom-set", help="change a device property")
    qs.add_argument("device")
    qs.add_argument("property")
    qs.add_argument("value")
    r = sub.add_parser("raw", help="send any QMP command, arguments as JSON")
    r.add_argument("execute")
    r.add_argument("arguments", nargs="?", default="{}")
    sub.add_parser("quit", help="stop the daemon")
    return p


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _run(args: argparse.Namespace) -> int:
    client = QmpClient()
    await client.connect(args.qmp, timeout=args.timeout)
    try:
        cmd = args.command
        if cmd == "migrate":
            caps = [{"capability": "multifd", "state": not args.no_multifd},
                    {"capability": "return-path", "state": not args.no_return_path},
                    {"capability": "switchover-ack", "state": args.switchover_ack},
                    {"capability": "events", "state": True}]
            await client.execute("migrate-set-capabilities", {"capabilities": caps})
            if args.channels is not None:
                await client.execute("migrate-set-parameters",
                                     {"multifd-channels": args.channels})
            await client.execute("migrate", {"uri": args.uri})
            if args.detach:
                return 0
            info = await watch(client, out=sys.stderr if args.json else sys.stdout)
            if args.json:
                _print(info)
            else:
                print("\n".join(summary_lines(info)))
            return 0 if info.get("status") == "completed" else 1
        if cmd == "incoming":
            await client.execute("migrate-incoming", {"uri": args.uri})
            info = await client.execute("query-migrate")
            for addr in info.get("socket-address", []):
                where = addr.get("path") or f"{addr.get('host')}:{addr.get('port')}"
                print(f"listening on {addr.get('type')}:{where}")
            return 0
        if cmd in ("status", "watch"):
            info = await client.execute("query-migrate")
            if cmd == "watch" and info.get("status") not in (None, "none"):
                info = await watch(client)
            if args.json:
                _print(info)
            elif not info:
                print("status:        none (no migration yet)")
            else:
                print("\n".join(summary_lines(info)))
            return 0
        if cmd == "cancel":
            await client.execute("migrate_cancel")
            return 0
        if cmd == "set-capability":
            await client.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": args.name, "state": args.state == "on"}]})
            return 0
        if cmd == "set-parameter":
            value = _parse_value(args.value)
            if args.name in SIZE_PARAMETERS and isinstance(value, str):
                value = parse_size(value)  # "1G" as on the daemons' command line
            elif args.name in BOOLEAN_PARAMETERS and isinstance(value, str):
                value = bool_text(value)  # on/off as on the daemons' command line
            await client.execute("migrate-set-parameters", {args.name: value})
            return 0
        if cmd == "capabilities":
            caps = await client.execute("query-migrate-capabilities")
            for c in caps:
                print(f"{c['capability']:<26} {'on' if c['state'] else 'off'}")
            return 0
        if cmd == "parameters":
            _print(await client.execute("query-migrate-parameters"))
            return 0
        if cmd == "digest":
            result = await client.execute("x-query-state-digest")
            print(f"VM: {result['vm-status']}")
            for d in result["devices"]:
                print(f"{d['id']:<12} {d['size-text']:>6}  {d['device-state']:<12} "
                      f"{d['digest'] or '(no complete state)'}")
            if "ram" in result:
                ram = result["ram"]
                print(f"{'guest RAM':<12} {human_bytes(ram['size']):>6}  {'':<12} "
                      f"{ram['digest']}")
            return 0
        if cmd in ("qom-get", "qom-set"):
            path = f"/machine/peripheral/{args.device}"
            if cmd == "qom-get":
                _print(await client.execute("qom-get", {"path": path,
                                                        "property": args.property}))
            else:
                await client.execute("qom-set", {"path": path, "property": args.property,
                                                 "value": _parse_value(args.value)})
            return 0
        if cmd == "raw":
            _print(await client.execute(args.execute, json.loads(args.arguments)))
            return 0
        if cmd == "quit":
            await client.execute("quit")
            return 0
        raise AssertionError(cmd)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except QmpCommandError as exc:
        print(f"error: {exc.desc}", file=sys.stderr)
        return 1
    except (QmpConnectionError, ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
