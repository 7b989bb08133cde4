"""migrate_common.settings: x-socket-buffer-size, x-verify-ram, x-multifd-packet-size and
x-device-state-packet-size, through the QMP arguments and the CLI text."""

from __future__ import annotations

import pytest

from migrate_common.qmp_client import QmpCommandError
from migrate_common.settings import PARAMETER_DEFAULTS, MigrationSettings
from protocol.errors import ConfigError

NAME = "x-socket-buffer-size"
MiB = 1024 * 1024


def test_default_is_auto() -> None:
    assert PARAMETER_DEFAULTS[NAME] == -1
    settings = MigrationSettings()
    assert settings.param(NAME) == -1 and settings.query_parameters()[NAME] == -1


@pytest.mark.parametrize("value", [-1, 0, 1, 4096, 262144, 64 * MiB])
def test_set_parameters_accepts(value: int) -> None:
    settings = MigrationSettings()
    settings.set_parameters({NAME: value})
    assert settings.param(NAME) == value
    assert settings.snapshot().param(NAME) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-2, "expects a value between -1 and 67108864"),
        (-(1 << 40), "between -1 and 67108864"),
        (64 * MiB + 1, "between -1 and 67108864"),
        (2**27, "between -1 and 67108864"),
        (True, "expected: integer"),
        (False, "expected: integer"),
        (262144.0, "expected: integer"),
        ("256K", "expected: integer"),
        (None, "expected: integer"),
    ],
)
def test_set_parameters_rejects(value: object, message: str) -> None:
    settings = MigrationSettings()
    settings.set_parameters({NAME: 65536})
    with pytest.raises(ConfigError, match=message):
        # atomic: the valid parameter alongside is not applied either
        settings.set_parameters({"multifd-channels": 8, NAME: value})
    assert settings.param(NAME) == 65536 and settings.param("multifd-channels") == 2


@pytest.mark.parametrize(
    ("text", "value"),
    [("256K", 262144), ("262144", 262144), ("-1", -1), (" -1", -1), ("0", 0), ("64M", 64 * MiB),
     ("1M", MiB), ("0.5M", 512 * 1024)],
)
def test_set_parameter_text(text: str, value: int) -> None:
    settings = MigrationSettings()
    settings.set_parameter_text(NAME, text)
    assert settings.param(NAME) == value


@pytest.mark.parametrize("text", ["-2", "-1K", "65M", "1G", "abc", "", "1.5"])
def test_set_parameter_text_rejects(text: str) -> None:
    settings = MigrationSettings()
    with pytest.raises(ConfigError):
        settings.set_parameter_text(NAME, text)
    assert settings.param(NAME) == -1


@pytest.mark.e2e
async def test_over_qmp(pair_factory) -> None:  # type: ignore[no-untyped-def]
    async with pair_factory([]) as pair:
        for end in (pair.src, pair.dst):
            assert (await end.execute("query-migrate-parameters"))[NAME] == -1
            for value in (-1, 0, 262144):
                await end.execute("migrate-set-parameters", {NAME: value})
                assert (await end.execute("query-migrate-parameters"))[NAME] == value
            for bad in (-2, 2**27, "256K", 1.5):
                with pytest.raises(QmpCommandError, match=NAME):
                    await end.execute("migrate-set-parameters", {NAME: bad})
            assert (await end.execute("query-migrate-parameters"))[NAME] == 262144


# -- x-verify-ram ------------------------------------------------------------------------

def test_verify_ram_defaults_on_and_takes_booleans() -> None:
    settings = MigrationSettings()
    assert PARAMETER_DEFAULTS["x-verify-ram"] is True and settings.param("x-verify-ram") is True
    settings.set_parameters({"x-verify-ram": False})
    assert settings.param("x-verify-ram") is False
    assert settings.query_parameters()["x-verify-ram"] is False


@pytest.mark.parametrize("value", [0, 1, "off", None, 1.0])
def test_verify_ram_rejects_what_is_not_a_boolean(value: object) -> None:
    settings = MigrationSettings()
    with pytest.raises(ConfigError, match="'x-verify-ram', expected: boolean"):
        settings.set_parameters({"x-verify-ram": value})
    assert settings.param("x-verify-ram") is True


@pytest.mark.parametrize(("text", "value"), [("off", False), ("OFF", False), ("false", False),
                                             ("no", False), ("on", True), ("true", True),
                                             (" yes ", True)])
def test_verify_ram_text(text: str, value: bool) -> None:
    settings = MigrationSettings()
    settings.set_parameter_text("x-verify-ram", text)
    assert settings.param("x-verify-ram") is value


@pytest.mark.parametrize("text", ["", "0", "maybe"])
def test_verify_ram_text_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="expected: boolean"):
        MigrationSettings().set_parameter_text("x-verify-ram", text)


@pytest.mark.e2e
@pytest.mark.parametrize(("text", "value"), [("off", False), ("on", True), ("false", False)])
async def test_verify_ram_through_migrate_ctl(pair_factory, tmp_path, text, value) -> None:  # type: ignore[no-untyped-def]
    from migrate_ctl.cli import _parser, _run

    async with pair_factory([]) as pair:
        args = _parser().parse_args(["--qmp", f"unix:{tmp_path / 'src.qmp'}",
                                     "set-parameter", "x-verify-ram", text])
        assert await _run(args) == 0
        assert (await pair.src.execute("query-migrate-parameters"))["x-verify-ram"] is value


# -- x-multifd-packet-size ------------------------------------------------------------

PACKET = "x-multifd-packet-size"


def test_packet_size_default_is_2m() -> None:
    assert MigrationSettings().param(PACKET) == 2 * MiB


@pytest.mark.parametrize(("text", "value"), [("512K", 512 * 1024), ("2M", 2 * MiB),
                                             ("4096", 4096), ("1M", MiB)])
def test_packet_size_text(text: str, value: int) -> None:
    settings = MigrationSettings()
    settings.set_parameter_text(PACKET, text)
    assert settings.param(PACKET) == value


@pytest.mark.parametrize(("value", "message"), [
    (3 * 512 * 1024, "expects a power of two, got 1572864"),
    (4 * MiB, "between 4096 and 2097152"),
    (2048, "between 4096 and 2097152"),
    (-1, "between 4096 and 2097152"),
    (True, "expected: integer"),
    ("2M", "expected: integer"),
])
def test_packet_size_rejects(value: object, message: str) -> None:
    settings = MigrationSettings()
    with pytest.raises(ConfigError, match=message):
        settings.set_parameters({PACKET: value})
    assert settings.param(PACKET) == 2 * MiB


# -- x-device-state-packet-size ----------------------------------------------------------

DEVICE_PACKET = "x-device-state-packet-size"


def test_device_state_packet_size_default_is_4m() -> None:
    assert MigrationSettings().param(DEVICE_PACKET) == 4 * MiB


@pytest.mark.parametrize(("text", "value"), [("1M", MiB), ("8M", 8 * MiB), ("4096", 4096),
                                             ("3M", 3 * MiB)])
def test_device_state_packet_size_text(text: str, value: int) -> None:
    settings = MigrationSettings()
    settings.set_parameter_text(DEVICE_PACKET, text)
    assert settings.param(DEVICE_PACKET) == value


@pytest.mark.parametrize("value", [8 * MiB + 1, 4095, 0, -1])
def test_device_state_packet_size_rejects(value: int) -> None:
    settings = MigrationSettings()
    with pytest.raises(ConfigError, match="between 4096 and 8388608"):
        settings.set_parameters({DEVICE_PACKET: value})
    assert settings.param(DEVICE_PACKET) == 4 * MiB


@pytest.mark.e2e
@pytest.mark.parametrize(("name", "text", "value"), [
    ("x-multifd-packet-size", "512K", 512 * 1024),
    ("x-device-state-packet-size", "1M", 1024 * 1024),
    ("x-socket-buffer-size", "256K", 256 * 1024),
    ("max-bandwidth", "1G", 1 << 30),
])
async def test_sizes_through_migrate_ctl(pair_factory, tmp_path, name, text, value) -> None:  # type: ignore[no-untyped-def]
    from migrate_ctl.cli import _parser, _run

    async with pair_factory([]) as pair:
        args = _parser().parse_args(["--qmp", f"unix:{tmp_path / 'src.qmp'}",
                                     "set-parameter", name, text])
        assert await _run(args) == 0
        assert (await pair.src.execute("query-migrate-parameters"))[name] == value
