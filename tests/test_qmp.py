"""The management socket speaks real QMP: our client, raw lines, and QEMU's qemu.qmp."""

from __future__ import annotations

import asyncio
import json

import pytest

from migrate_common.net import Address
from migrate_common.qmp import QmpError, QmpServer
from migrate_common.qmp_client import QmpClient, QmpCommandError


@pytest.fixture
async def server(tmp_path):
    async def echo(args):
        return {"echo": args}

    async def boom(args):
        raise QmpError("it broke")

    srv = QmpServer({"echo": echo, "boom": boom})
    await srv.start(Address("unix", path=str(tmp_path / "q.sock")))
    yield srv, f"unix:{tmp_path / 'q.sock'}", str(tmp_path / "q.sock")
    await srv.close()


async def raw_session(path: str, lines: list[str]) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(path)
    out = [json.loads(await reader.readline())]
    for line in lines:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        out.append(json.loads(await reader.readline()))
    writer.close()
    return out


async def test_greeting_negotiation_and_errors(server):
    _, _, path = server
    out = await raw_session(path, [
        '{"execute": "echo"}',
        '{"execute": "qmp_capabilities", "id": 1}',
        '{"execute": "echo", "arguments": {"a": 1}, "id": "x"}',
        '{"execute": "nope", "id": 2}',
        '{"execute": "boom"}',
        'this is not json',
        '[1, 2]',
        '{"execute": "echo", "bogus": 1}',
    ])
    greeting, before, ok, echo, unknown, boom, bad_json, not_obj, extra = out
    assert greeting["QMP"]["version"]["qemu"]["major"] >= 10
    assert before["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in before["error"]["desc"]
    assert ok == {"return": {}, "id": 1}
    assert echo == {"return": {"echo": {"a": 1}}, "id": "x"}
    assert unknown["error"]["class"] == "CommandNotFound" and unknown["id"] == 2
    assert boom == {"error": {"class": "GenericError", "desc": "it broke"}}
    assert "JSON parse error" in bad_json["error"]["desc"]
    assert "object" in not_obj["error"]["desc"]
    assert "unexpected" in extra["error"]["desc"]


async def test_events_only_after_negotiation(server):
    srv, addr, _ = server
    client = QmpClient()
    await client.connect(addr)
    srv.emit_event("MIGRATION", {"status": "setup"})
    event = await asyncio.wait_for(client.events.get(), 5)
    assert event["event"] == "MIGRATION" and event["data"] == {"status": "setup"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    with pytest.raises(QmpCommandError, match="it broke"):
        await client.execute("boom")
    await client.close()


async def test_overlong_line_closes_session_and_server_survives(server):
    _, addr, path = server
    reader, writer = await asyncio.open_unix_connection(path)
    await reader.readline()
    writer.write(b"x" * (2 << 20) + b"\n")
    try:
        await writer.drain()
        reply = await reader.readline()
        # either the error reply arrives, or the reset of the closed session beats it
        assert reply == b"" or b"longer than" in reply
        assert await reader.read() == b""
    except ConnectionResetError:
        pass
    writer.close()
    client = QmpClient()
    await client.connect(addr)
    assert await client.execute("echo", {"b": 2}) == {"echo": {"b": 2}}
    await client.close()


async def test_qemu_qmp_library_drives_a_whole_migration(pair_factory, tmp_path):
    """QEMU's own Python QMP client configures both sides and migrates."""
    from qemu.qmp import QMPClient

    async with pair_factory(["vfio-sim,id=gpu0,state-size=4M",
                             "vfio-sim,id=gpu1,state-size=2M"]):
        src, dst = QMPClient("src"), QMPClient("dst")
        await src.connect(str(tmp_path / "src.qmp"))
        await dst.connect(str(tmp_path / "dst.qmp"))
        try:
            caps = [{"capability": "multifd", "state": True},
                    {"capability": "return-path", "state": True},
                    {"capability": "events", "state": True}]
            for c in (src, dst):
                await c.execute("migrate-set-capabilities", {"capabilities": caps})
                await c.execute("migrate-set-parameters", {"multifd-channels": 4})
            params = await dst.execute("query-migrate-parameters")
            assert params["multifd-channels"] == 4
            info = await dst.execute("query-migrate")
            port = info["socket-address"][0]["port"]
            with src.listener(("MIGRATION",)) as listener:
                await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
                seen = []
                async for event in listener:
                    seen.append(event["data"]["status"])
                    if seen[-1] in ("completed", "failed"):
                        break
            assert seen == ["setup", "active", "device", "completed"]
            final = await src.execute("query-migrate")
            assert final["status"] == "completed"
            assert isinstance(final["downtime"], int)
            d_src = await src.execute("x-query-state-digest")
            d_dst = await dst.execute("x-query-state-digest")
            assert [d["digest"] for d in d_src["devices"]] == [
                d["digest"] for d in d_dst["devices"]]
            assert (await dst.execute("query-status"))["running"] is True
            value = await dst.execute("qom-get", {"path": "/machine/peripheral/gpu0",
                                                  "property": "state-size"})
            assert value == 4 * 1024 * 1024
        finally:
            await src.disconnect()
            await dst.disconnect()
