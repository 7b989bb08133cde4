"""``compose.yaml`` and the ``Dockerfile``: a valid Compose file whose commands really work.

Most of this needs no container engine: the file is validated against the official
Compose Specification schema (``tests/data/compose-spec.json``), its commands are
parsed by the daemons' own argument parsers, and an e2e test runs those very commands
as local processes (sockets and port moved to a temporary directory and loopback) and
migrates with the ``migrate-ctl`` one-liner documented at the top of the file.

The last test runs the real thing, ``scripts/compose-e2e.sh``: a docker engine,
images built offline, ``docker-compose up``, the documented one-liners through
``docker-compose exec``, and a destination stopped mid-migration.  It needs root and
runs in CI (``CI=true``) or when ``MIGRATE_COMPOSE_TEST=1``; otherwise it is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import os
import shlex
import signal
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

import migrate_ctl.cli as ctl_cli
import migrate_dst.cli as dst_cli
import migrate_src.cli as src_cli
from migrate_common.cli import build_settings
from migrate_common.net import parse_address
from migrate_ctl import demo
from migrate_ctl.pair import DaemonProcess, start_daemon
from vm.machine import DEFAULT_DEVICE_OPTIONS
from vm.properties import parse_device_option

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"

#: compose service -> (console script it runs, module whose ``main`` that script is)
SIDES: dict[str, tuple[str, Any]] = {
    "src": ("migrate-src", src_cli),
    "dst": ("migrate-dst", dst_cli),
}
QMP_DIR = "/run/migrate/"
MIGRATION_PORT = 4444
DOC_LINE = re.compile(r"^#\s+docker compose exec (?P<service>\S+) migrate-ctl (?P<args>.+?)\s*$")

# What docker-compose 1.29 (the last v1, Python) accepts in a version-less file: its
# own copy of the compose schema, compose/config/compose_spec.json in docker/compose
# v1.  The official schema is a superset; these keep compose.yaml inside the subset.
V1_TOP_LEVEL_KEYS = {"version", "services", "networks", "volumes", "secrets", "configs"}
V1_SERVICE_KEYS = {
    "deploy", "build", "blkio_config", "cap_add", "cap_drop", "cgroup_parent", "command",
    "configs", "container_name", "cpu_count", "cpu_percent", "cpu_shares", "cpu_quota",
    "cpu_period", "cpu_rt_period", "cpu_rt_runtime", "cpus", "cpuset", "credential_spec",
    "depends_on", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search",
    "domainname", "entrypoint", "env_file", "environment", "expose", "extends",
    "external_links", "extra_hosts", "group_add", "healthcheck", "hostname", "image", "init",
    "ipc", "isolation", "labels", "links", "logging", "mac_address", "mem_limit",
    "mem_reservation", "mem_swappiness", "memswap_limit", "network_mode", "networks",
    "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform", "ports",
    "privileged", "profiles", "pull_policy", "read_only", "restart", "runtime", "scale",
    "security_opt", "shm_size", "secrets", "sysctls", "stdin_open", "stop_grace_period",
    "stop_signal", "storage_opt", "tmpfs", "tty", "ulimits", "user", "userns_mode",
    "volumes", "volumes_from", "working_dir",
}
V1_HEALTHCHECK_KEYS = {"disable", "interval", "retries", "test", "timeout", "start_period"}


# -- helpers ------------------------------------------------------------------------------

def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def load_schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert isinstance(schema, dict)
    return schema


def schema_validator() -> jsonschema.protocols.Validator:
    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema, default=None)
    assert cls is not None, f"jsonschema does not know $schema {schema.get('$schema')!r}"
    cls.check_schema(schema)
    return cls(schema)


def service_command(compose: dict[str, Any], service: str) -> list[str]:
    command = compose["services"][service]["command"]
    assert isinstance(command, list), f"{service}: write 'command' in list (exec) form"
    assert all(isinstance(a, str) for a in command), f"{service}: non-string argument"
    return command


def option_values(argv: list[str], option: str) -> list[str]:
    """Every value given to ``option`` in ``argv`` (``--opt VALUE`` and ``--opt=VALUE``)."""
    values = []
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg[len(option) + 1:])
    return values


def rewrite_option(argv: list[str], option: str, fn: Any) -> list[str]:
    """``argv`` with every value of ``option`` replaced by ``fn(value)``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == option:
            arg = fn(arg)
        elif arg.startswith(option + "="):
            arg = f"{option}={fn(arg[len(option) + 1:])}"
        out.append(arg)
    return out


def parse_daemon(monkeypatch: pytest.MonkeyPatch, compose: dict[str, Any],
                 service: str) -> tuple[argparse.Namespace, Any]:
    """Run the daemon's real ``main()`` on the compose command, stopping just before
    the event loop: returns the parsed arguments and the daemon factory ``make``."""
    program, module = SIDES[service]
    argv = service_command(compose, service)
    assert argv[0] == program
    captured: dict[str, Any] = {}

    def fake_run_main(args: argparse.Namespace, make: Any) -> int:
        captured["args"], captured["make"] = args, make
        return 0

    monkeypatch.setattr(module, "run_main", fake_run_main)
    assert module.main(argv[1:]) == 0
    return captured["args"], captured["make"]


def documented_commands(service: str | None = None) -> list[tuple[str, list[str]]]:
    """The ``docker compose exec SERVICE migrate-ctl ...`` lines of the header comment."""
    found = []
    for line in COMPOSE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            break  # only the comment block at the top
        m = DOC_LINE.match(line)
        if m and (service is None or m["service"] == service):
            found.append((m["service"], shlex.split(m["args"])))
    return found


def documented(subcommand: str) -> list[tuple[str, argparse.Namespace, list[str]]]:
    out = []
    for service, argv in documented_commands():
        args = ctl_cli._parser().parse_args(argv)
        if args.command == subcommand:
            out.append((service, args, argv))
    return out


# -- the schema ---------------------------------------------------------------------------

def test_schema_is_the_official_one_with_its_declared_draft() -> None:
    schema = load_schema()
    assert schema["title"] == "Compose Specification"
    assert "draft/2019-09" in schema["$schema"]
    assert isinstance(schema_validator(), jsonschema.Draft201909Validator)


def test_compose_file_validates_against_the_compose_spec() -> None:
    errors = sorted(schema_validator().iter_errors(load_compose()), key=lambda e: e.path)
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


@pytest.mark.parametrize("mutate", [
    lambda c: c["services"]["src"].update(comand=["typo"]),
    lambda c: c.update(servics={}),
    lambda c: c["services"]["src"].update(depends_on={"dst": {"condition": "healthy"}}),
    lambda c: c["services"]["dst"]["healthcheck"].update(interval=2),
    lambda c: c["services"]["dst"].update(command={"not": "a command"}),
], ids=["service-key-typo", "top-level-typo", "bad-condition", "interval-not-string",
        "command-mapping"])
def test_schema_actually_rejects_broken_files(mutate: Any) -> None:
    broken = copy.deepcopy(load_compose())
    mutate(broken)
    assert not schema_validator().is_valid(broken)


def test_compose_file_stays_within_docker_compose_1_29() -> None:
    compose = load_compose()
    assert "version" not in compose, "no 'version:' with the Compose Specification format"
    assert set(compose) <= V1_TOP_LEVEL_KEYS
    for name, service in compose["services"].items():
        assert set(service) <= V1_SERVICE_KEYS, f"{name}: {set(service) - V1_SERVICE_KEYS}"
        assert set(service.get("healthcheck", {})) <= V1_HEALTHCHECK_KEYS, name
        depends_on = service.get("depends_on", {})
        for dep in depends_on.values() if isinstance(depends_on, dict) else ():
            assert set(dep) == {"condition"}, f"{name}: depends_on takes only 'condition'"


# -- what the services run ----------------------------------------------------------------

def test_services_and_image() -> None:
    compose = load_compose()
    assert set(compose["services"]) == {"src", "dst"}
    src, dst = compose["services"]["src"], compose["services"]["dst"]
    assert src["build"] == dst["build"] == "."
    assert src.get("image") == dst.get("image")
    assert "entrypoint" not in src and "entrypoint" not in dst


def test_commands_are_the_installed_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    compose = load_compose()
    for service, (program, module) in SIDES.items():
        assert service_command(compose, service)[0] == program
        assert scripts[program] == f"{module.__name__}:main"
    assert scripts["migrate-ctl"] == "migrate_ctl.cli:main"


@pytest.mark.parametrize("service", sorted(SIDES))
def test_command_is_accepted_by_the_real_daemon(monkeypatch: pytest.MonkeyPatch,
                                                service: str) -> None:
    args, make = parse_daemon(monkeypatch, load_compose(), service)
    build_settings(args)                      # capabilities and parameters
    for text in args.device:                  # every device, QEMU -device syntax
        parse_device_option(text)
    parse_address(args.qmp)
    if service == "dst":
        parse_address(args.incoming)
    # exactly what the daemon does at start (VM, settings, addresses), minus the loop
    coro = make()
    coro.close()


def test_both_sides_run_the_same_vm_with_the_same_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_compose()
    src, _ = parse_daemon(monkeypatch, compose, "src")
    dst, _ = parse_daemon(monkeypatch, compose, "dst")
    assert src.uuid and src.uuid == dst.uuid
    assert uuid.UUID(src.uuid) != uuid.UUID(int=0)
    assert src.device == dst.device
    assert sorted(src.capability) == sorted(dst.capability)
    assert sorted(src.parameter) == sorted(dst.parameter)
    s_src, s_dst = build_settings(src), build_settings(dst)
    assert s_src.capabilities == s_dst.capabilities
    assert s_src.parameters == s_dst.parameters
    for cap in ("multifd", "return-path", "events"):
        assert s_src.cap(cap), cap
    assert s_src.param("multifd-channels") == 4


def test_same_vm_and_channels_as_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict[str, argparse.Namespace] = {}

    async def fake_demo(args: argparse.Namespace) -> int:
        captured["args"] = args
        return 0

    monkeypatch.setattr(demo, "_demo", fake_demo)
    assert demo.main([]) == 0
    demo_args = captured["args"]
    compose = load_compose()
    for service in SIDES:
        args, _ = parse_daemon(monkeypatch, compose, service)
        # the default VM: 4 devices of 256 MiB (50 ms to quiesce, 2 GB/s reads), either
        # implicit or spelled out
        assert (args.device or list(DEFAULT_DEVICE_OPTIONS)) == (
            demo_args.device or list(DEFAULT_DEVICE_OPTIONS))
        assert build_settings(args).param("multifd-channels") == demo_args.channels
    sizes = [parse_device_option(d).state_size for d in DEFAULT_DEVICE_OPTIONS]
    assert sizes == [256 * 1024 * 1024] * 4


def test_destination_listens_on_4444_without_publishing_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_compose()
    dst, _ = parse_daemon(monkeypatch, compose, "dst")
    assert dst.incoming == f"tcp:0.0.0.0:{MIGRATION_PORT}"
    addr = parse_address(dst.incoming)
    assert (addr.transport, addr.port) == ("tcp", MIGRATION_PORT)
    for name, service in compose["services"].items():
        assert "ports" not in service, f"{name} publishes ports"
        assert service.get("network_mode") is None, name
    assert [str(p) for p in compose["services"]["dst"].get("expose", [])] in (
        [], [str(MIGRATION_PORT)])


@pytest.mark.parametrize("service", sorted(SIDES))
def test_qmp_is_a_unix_socket_in_run_migrate(monkeypatch: pytest.MonkeyPatch,
                                             service: str) -> None:
    args, _ = parse_daemon(monkeypatch, load_compose(), service)
    addr = parse_address(args.qmp)
    assert addr.transport == "unix", f"{service}: QMP must not be TCP"
    assert addr.path.startswith(QMP_DIR)
    env_qmp = (load_compose()["services"][service].get("environment") or {}).get("MIGRATE_QMP")
    assert env_qmp in (None, args.qmp)


@pytest.mark.parametrize("service", sorted(SIDES))
def test_healthcheck_is_migrate_ctl_status(monkeypatch: pytest.MonkeyPatch,
                                           service: str) -> None:
    compose = load_compose()
    args, _ = parse_daemon(monkeypatch, compose, service)
    check = compose["services"][service]["healthcheck"]
    test = check["test"]
    assert isinstance(test, list) and test[0] == "CMD" and test[1] == "migrate-ctl", test
    ctl = ctl_cli._parser().parse_args(test[2:])
    assert ctl.command == "status"
    assert ctl.qmp == args.qmp
    assert check["interval"] == "2s"
    assert 10 <= int(check["retries"]) <= 30


def test_src_starts_once_dst_is_healthy() -> None:
    compose = load_compose()
    assert compose["services"]["src"]["depends_on"] == {"dst": {"condition": "service_healthy"}}
    assert "depends_on" not in compose["services"]["dst"]


def test_services_share_the_migration_network() -> None:
    compose = load_compose()
    assert compose["networks"]["migration"]["driver"] == "bridge"
    # container to container only: no route off the machine
    assert compose["networks"]["migration"].get("internal") is True
    for name, service in compose["services"].items():
        nets = service["networks"]
        assert "migration" in (nets if isinstance(nets, list) else list(nets)), name


def test_documented_migrate_one_liner_matches_the_services(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_compose()
    migrate = documented("migrate")
    assert len(migrate) == 1, "document exactly one migrate one-liner"
    service, ctl, _ = migrate[0]
    assert service == "src" and service in compose["services"]
    src, _ = parse_daemon(monkeypatch, compose, "src")
    dst, _ = parse_daemon(monkeypatch, compose, "dst")
    assert ctl.qmp == src.qmp
    target = parse_address(ctl.uri)
    assert target.transport == "tcp"
    assert target.host == "dst" and target.host in compose["services"]
    assert target.port == parse_address(dst.incoming).port == MIGRATION_PORT
    assert ctl.channels == build_settings(src).param("multifd-channels")
    digests = {s: c for s, c, _ in documented("digest")}
    assert set(digests) == {"src", "dst"}, "document the digest check on both sides"
    assert digests["src"].qmp == src.qmp and digests["dst"].qmp == dst.qmp


# -- the image ----------------------------------------------------------------------------

def test_dockerfile_basics() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert instructions[1] == "FROM ${BASE_IMAGE}"
    assert "ARG PIP_OPTIONS=\"\"" in instructions
    assert not any(ln.startswith("ENTRYPOINT") for ln in instructions)
    assert any(ln.startswith("CMD [") for ln in instructions)
    text = "\n".join(instructions)
    assert "pip install ${PIP_OPTIONS}" in text
    assert "mkdir -p /run/migrate" in text
    assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.MULTILINE), "run as a non-root uid"


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    needed = ["pyproject.toml", "README.md", "wheels", "protocol", "vm", "migrate_src",
              "migrate_dst", "migrate_common", "migrate_ctl"]
    for name in needed:
        assert name not in patterns and f"/{name}" not in patterns, name
    assert ".venv" in patterns and ".git" in patterns


# -- the commands, run for real -----------------------------------------------------------

CTL = [sys.executable, "-c", "import sys; from migrate_ctl.cli import main; sys.exit(main())"]


async def run_ctl(argv: list[str], timeout: float = 120.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CTL, *argv, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def parse_digest_output(text: str) -> tuple[str, dict[str, str]]:
    lines = text.strip().splitlines()
    assert lines and lines[0].startswith("VM: "), text
    devices = {}
    for line in lines[1:]:
        parts = line.split()
        devices[parts[0]] = parts[-1]
    return lines[0][4:].strip(), devices


@pytest.mark.e2e
async def test_compose_commands_migrate_for_real(tmp_path: Path) -> None:
    """The compose commands as local processes: QMP sockets in a temporary directory,
    the destination on 127.0.0.1 and a free port, devices shrunk to 4 MiB; then the
    documented one-liners migrate and compare the digests."""
    compose = load_compose()
    qmp = {side: f"unix:{tmp_path / f'{side}.qmp'}" for side in SIDES}
    compose_qmp = {side: option_values(service_command(compose, side), "--qmp")[0]
                   for side in SIDES}

    def localize(side: str) -> list[str]:
        argv = service_command(compose, side)[1:]
        argv = rewrite_option(argv, "--qmp", lambda _: qmp[side])
        argv = rewrite_option(argv, "--incoming", lambda _: "tcp:127.0.0.1:0")
        return rewrite_option(argv, "--device",
                              lambda d: re.sub(r"state-size=[^,]+", "state-size=4M", d))

    def in_container(side: str, argv: list[str]) -> list[str]:
        """A migrate-ctl argv from compose.yaml, pointed at this test's sockets."""
        return [qmp[side] if a == compose_qmp[side] else a for a in argv]

    health = {side: compose["services"][side]["healthcheck"]["test"][2:] for side in SIDES}
    # the healthcheck reports unhealthy while nothing listens
    rc, _, _ = await run_ctl(in_container("dst", health["dst"]), timeout=30)
    assert rc != 0

    daemons: dict[str, DaemonProcess] = {}
    try:
        # compose order: dst first, src once dst is healthy
        daemons["dst"] = await start_daemon("dst", tmp_path, localize("dst"))
        for side in ("dst", "src"):
            if side == "src":
                daemons["src"] = await start_daemon("src", tmp_path, localize("src"))
            rc, out, err = await run_ctl(in_container(side, health[side]), timeout=30)
            assert rc == 0, f"{side} healthcheck failed: {out}{err}"

        info = await daemons["dst"].execute("query-migrate")
        port = info["socket-address"][0]["port"]

        ((service, _, migrate_argv),) = documented("migrate")
        argv = in_container(service, migrate_argv)
        argv = [f"tcp:127.0.0.1:{port}" if a == f"tcp:dst:{MIGRATION_PORT}" else a
                for a in argv]
        assert f"tcp:127.0.0.1:{port}" in argv
        rc, out, err = await run_ctl(argv)
        assert rc == 0, (f"migrate failed ({rc}):\n{out}\n{err}\n"
                         + "\n".join(f"--- {s} log ---\n{d.log_tail()}"
                                     for s, d in daemons.items()))

        seen: dict[str, tuple[str, dict[str, str]]] = {}
        for service, _, digest_argv in documented("digest"):
            rc, out, err = await run_ctl(in_container(service, digest_argv), timeout=30)
            assert rc == 0, f"{service} digest failed: {out}{err}"
            seen[service] = parse_digest_output(out)
        assert set(seen) == {"src", "dst"}
        (_, src_digests), (dst_status, dst_digests) = seen["src"], seen["dst"]
        assert dst_status == "running"
        assert sorted(dst_digests) == ["dev0", "dev1", "dev2", "dev3"]
        for digest in dst_digests.values():  # not "(no complete state)"
            assert re.fullmatch(r"[0-9a-f]{16,}", digest), dst_digests
        assert src_digests == dst_digests

        for side in ("src", "dst"):  # still healthy after the migration
            rc, out, err = await run_ctl(in_container(side, health[side]), timeout=30)
            assert rc == 0, f"{side} healthcheck after migration: {out}{err}"
    finally:
        for daemon in daemons.values():
            await daemon.stop()


# -- the real containers ------------------------------------------------------------------

COMPOSE_E2E = ROOT / "scripts" / "compose-e2e.sh"
#: cold (apt-get install of the engine, debootstrap of the base image): about 2 min here
COMPOSE_E2E_TIMEOUT = float(os.environ.get("MIGRATE_COMPOSE_TIMEOUT", "1500"))


def compose_e2e_skip_reason() -> str | None:
    how = (f"run it with: sudo bash {COMPOSE_E2E.relative_to(ROOT)}  "
           "(or MIGRATE_COMPOSE_TEST=1 python3 dev.py test -k compose_scenario, as root)")
    wanted = os.environ.get("MIGRATE_COMPOSE_TEST")
    if wanted == "0":
        return f"docker compose scenario disabled by MIGRATE_COMPOSE_TEST=0; {how}"
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return f"docker compose scenario needs root on Linux (it starts dockerd); {how}"
    if wanted != "1" and os.environ.get("CI") != "true":
        return ("docker compose scenario runs in CI (CI=true) or with MIGRATE_COMPOSE_TEST=1 "
                f"(it installs and starts a docker engine); {how}")
    return None


@pytest.mark.e2e
def test_compose_scenario_in_real_containers(tmp_path: Path) -> None:
    """``scripts/compose-e2e.sh``: compose.yaml in a real engine, migration from
    outside, digests through both QMP sockets, then the destination stopped
    mid-migration and a second migration to a new destination."""
    reason = compose_e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    log = tmp_path / "compose-e2e.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", str(COMPOSE_E2E)], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=COMPOSE_E2E_TIMEOUT)
        except subprocess.TimeoutExpired:
            # as Ctrl-C would: the script's trap tears the containers and engine down
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    text = log.read_text(errors="replace")
    print(text)  # pytest shows it when the test fails
    tail = "\n".join(text.splitlines()[-80:])
    assert rc is not None, f"compose-e2e.sh still running after {COMPOSE_E2E_TIMEOUT:g} s:\n{tail}"
    assert rc == 0, f"compose-e2e.sh exited {rc}:\n{tail}"
    assert "compose-e2e: PASSED" in text, tail
    # what the scenario saw, from its own output
    assert len(re.findall(r"^\s*\| status:\s+completed$", text, re.MULTILINE)) == 2, tail
    assert text.count("device digests equal on src and dst, destination running") == 2, tail
    assert re.search(r"source: status failed, error-desc: \S", text), tail
    assert re.search(r'source query-status: \{.*"running":true', text), tail
    assert "(the dst container, not loopback)" in text, tail
