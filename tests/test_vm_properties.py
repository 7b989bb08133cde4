"""Tests for vm.properties: size/bandwidth/duration parsing, -device options, QOM access."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ConfigError
from vm.properties import (
    GiB,
    KiB,
    MiB,
    PROPERTY_NAMES,
    UINT64_MAX,
    DeviceConfig,
    OnOffAuto,
    format_duration,
    format_size,
    parse_bandwidth,
    parse_device_option,
    parse_duration,
    parse_on_off_auto,
    parse_size,
)

# -- sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4K", 4 * KiB),
        ("4k", 4 * KiB),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("1G", GiB),
        ("2T", 2 << 40),
        ("1P", 1 << 50),
        ("1E", 1 << 60),
        ("16B", 16),
        ("1.5G", 3 * GiB // 2),
        ("0.5K", 512),
        (".5K", 512),
        ("1.25M", 1310720),
        ("18446744073709551615", UINT64_MAX),
        (0, 0),
        (4096, 4096),
    ],
)
def test_parse_size_good(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "invalid size ''"),
        ("abc", "invalid size 'abc'"),
        ("-1", "invalid size '-1'"),
        ("-4K", "invalid size '-4K'"),
        ("4X", "invalid size '4X'"),
        ("4 K", "invalid size '4 K'"),
        ("0x10", "invalid size '0x10'"),
        ("1.3", "not a whole number of bytes"),
        ("0.3K", "not a whole number of bytes"),
        ("16E", "exceeds 2^64-1"),
        ("18446744073709551616", "exceeds 2^64-1"),
        (-5, "must not be negative"),
        (1 << 64, "exceeds 2^64-1"),
        (True, "invalid size True"),
    ],
)
def test_parse_size_bad(text: str | int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("100M", 100 * MiB), ("1G", GiB), ("1G/s", GiB), ("1.5k", 1536), (125, 125)],
)
def test_parse_bandwidth_good(text: str | int, expected: int) -> None:
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["fast", "-1M", "1Gbit", "/s"])
def test_parse_bandwidth_bad(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid bandwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (4096, "4096"),
        (65535, "65535"),
        (64 * KiB, "64K"),
        (256 * MiB, "256M"),
        (3 * GiB // 2, "1.5G"),
        (GiB + MiB, "1025M"),
        (65537, "65537"),
        (1 << 60, "1E"),
        (UINT64_MAX, str(UINT64_MAX)),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(min_value=0, max_value=UINT64_MAX))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from([KiB, MiB, GiB]))
def test_format_size_round_trips_on_unit_multiples(k: int, unit: int) -> None:
    assert parse_size(format_size(k * unit)) == k * unit


# -- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("50ms", 0.05),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("250", 0.25),  # bare number = milliseconds
        ("100us", 0.0001),
        ("2MS", 0.002),
        (50, 0.05),
        (0, 0.0),
    ],
)
def test_parse_duration_good(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1ms", "abc", "1h", "nan", "inf", "1.5 s", "ms"])
def test_parse_duration_bad(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0, "0"), (0.05, "50ms"), (1.0, "1s"), (1.5, "1.5s"), (60.0, "60s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# -- on/off/auto ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("on", OnOffAuto.ON),
        ("ON", OnOffAuto.ON),
        ("true", OnOffAuto.ON),
        ("yes", OnOffAuto.ON),
        (True, OnOffAuto.ON),
        ("off", OnOffAuto.OFF),
        ("false", OnOffAuto.OFF),
        ("no", OnOffAuto.OFF),
        (False, OnOffAuto.OFF),
        ("auto", OnOffAuto.AUTO),
        (OnOffAuto.AUTO, OnOffAuto.AUTO),
    ],
)
def test_on_off_auto(text: str | bool, expected: OnOffAuto) -> None:
    assert parse_on_off_auto(text) is expected
    assert OnOffAuto.parse(text) is expected


@pytest.mark.parametrize("text", ["", "maybe", "1", "enabled"])
def test_on_off_auto_bad(text: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid on/off/auto value {text!r}"):
        parse_on_off_auto(text)


def test_on_off_auto_is_a_plain_string() -> None:
    assert json.dumps({"v": OnOffAuto.ON}) == '{"v": "on"}'
    assert str(OnOffAuto.AUTO) == "auto"


# -- -device options ---------------------------------------------------------------------


def test_parse_device_option_example() -> None:
    cfg = parse_device_option("vfio-sim,id=gpu0,state-size=512M,stop-copy-latency=50ms")
    assert cfg.driver == "vfio-sim"
    assert cfg.id == "gpu0"
    assert cfg.state_size == 512 * MiB
    assert cfg.stop_copy_latency == 0.05
    assert cfg.precopy_size == 0
    assert cfg.config_size == 4096
    assert cfg.seed == zlib.crc32(b"gpu0")
    assert cfg.multifd_transfer is OnOffAuto.AUTO
    assert cfg.max_queued_buffers is None


def test_defaults() -> None:
    cfg = DeviceConfig(id="dev0")
    assert cfg == parse_device_option("vfio-sim,id=dev0")
    assert cfg.state_size == 256 * MiB
    assert (cfg.read_bandwidth, cfg.write_bandwidth, cfg.stop_copy_latency) == (0, 0, 0.0)
    assert cfg.load_config_after_iter is OnOffAuto.AUTO
    assert cfg.max_queued_buffers_size is None
    assert cfg.total_size == 256 * MiB
    assert not cfg.supports_precopy


def test_every_property_parses() -> None:
    cfg = parse_device_option(
        "vfio-sim,id=n.1_x-y,state-size=1G,precopy-size=64M,config-size=8K,"
        "read-bandwidth=2G,write-bandwidth=1G/s,stop-copy-latency=1.5s,seed=0x10,"
        "x-migration-multifd-transfer=on,x-migration-max-queued-buffers=8,"
        "x-migration-max-queued-buffers-size=32M,x-migration-load-config-after-iter=off"
    )
    assert cfg == DeviceConfig(
        id="n.1_x-y",
        state_size=GiB,
        precopy_size=64 * MiB,
        config_size=8 * KiB,
        read_bandwidth=2 * GiB,
        write_bandwidth=GiB,
        stop_copy_latency=1.5,
        seed=16,
        multifd_transfer=OnOffAuto.ON,
        max_queued_buffers=8,
        max_queued_buffers_size=32 * MiB,
        load_config_after_iter=OnOffAuto.OFF,
    )
    assert cfg.supports_precopy
    assert cfg.total_size == GiB + 64 * MiB


@pytest.mark.parametrize(
    "text",
    [
        "driver=vfio-sim,id=a",
        "vfio-sim,id=a,x-migration-max-queued-buffers=unlimited",
        "vfio-sim,id=a,x-migration-max-queued-buffers=18446744073709551615",
        "vfio-sim,id=a,x-migration-max-queued-buffers-size=unlimited",
        "vfio-sim,id=a,x-migration-max-queued-buffers-size=18446744073709551615",
    ],
)
def test_parse_device_option_equivalents(text: str) -> None:
    assert parse_device_option(text) == DeviceConfig(id="a")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["invalid -device option ''"]),
        ("virtio-net,id=x", ["unsupported device driver 'virtio-net'", "vfio-sim"]),
        ("id=x,state-size=1M", ["must start with the driver name"]),
        ("vfio-sim", ["requires id=NAME"]),
        ("vfio-sim,state-size=1M", ["requires id=NAME"]),
        ("vfio-sim,id=1abc", ["invalid device id '1abc'"]),
        ("vfio-sim,id=", ["invalid device id ''"]),
        ("vfio-sim,id=a b", ["invalid device id 'a b'"]),
        ("vfio-sim,id=" + "a" * 65, ["invalid device id"]),
        ("vfio-sim,id=a,foo=1", ["unknown property 'foo'", "valid properties:", "state-size"]),
        ("vfio-sim,id=a,state_size=1M", ["unknown property 'state_size'"]),
        ("vfio-sim,id=a,state-size=1M,state-size=2M", ["duplicate property 'state-size'"]),
        ("vfio-sim,id=a,id=b", ["duplicate property 'id'"]),
        ("vfio-sim,id=a,driver=vfio-sim", ["duplicate property 'driver'"]),
        ("vfio-sim,id=a,,state-size=1M", ["empty property"]),
        ("vfio-sim,id=a,", ["empty property"]),
        ("vfio-sim,id=a,state-size", ["property 'state-size' has no value"]),
        ("vfio-sim,id=a,state-size=abc", ["property 'state-size'", "invalid size 'abc'"]),
        ("vfio-sim,id=a,state-size=65G", ["'state-size' must be at most 64G", "65G"]),
        ("vfio-sim,id=a,precopy-size=100G", ["'precopy-size' must be at most 64G"]),
        ("vfio-sim,id=a,config-size=0", ["'config-size' must be at least 1"]),
        ("vfio-sim,id=a,config-size=2M", ["'config-size' must be at most 1M"]),
        ("vfio-sim,id=a,stop-copy-latency=61s", ["'stop-copy-latency' must be between 0 and 60s"]),
        ("vfio-sim,id=a,stop-copy-latency=soon", ["invalid duration 'soon'"]),
        ("vfio-sim,id=a,read-bandwidth=-1", ["invalid bandwidth '-1'"]),
        ("vfio-sim,id=a,seed=x", ["invalid seed 'x'"]),
        ("vfio-sim,id=a,seed=-1", ["invalid seed '-1'"]),
        ("vfio-sim,id=a,x-migration-multifd-transfer=maybe", ["invalid on/off/auto value 'maybe'"]),
        ("vfio-sim,id=a,x-migration-max-queued-buffers=0", ["must be at least 1", "unlimited"]),
        ("vfio-sim,id=a,x-migration-max-queued-buffers=-3", ["invalid count '-3'"]),
        ("vfio-sim,id=a,x-migration-max-queued-buffers-size=0", ["must be at least 1"]),
    ],
)
def test_parse_device_option_bad(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_device_option(text)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match="unsupported device driver 'vfio-pci'"):
        DeviceConfig(driver="vfio-pci", id="a")
    with pytest.raises(ConfigError, match="invalid device id"):
        DeviceConfig(id="-a")
    with pytest.raises(ConfigError, match="'state-size' must be at least 0"):
        DeviceConfig(id="a", state_size=-1)
    with pytest.raises(ConfigError, match="'state-size' must be an integer"):
        DeviceConfig(id="a", state_size=True)
    with pytest.raises(ConfigError, match="x-migration-max-queued-buffers"):
        DeviceConfig(id="a", max_queued_buffers=0)


def test_explicit_seed_and_coercions() -> None:
    cfg = DeviceConfig(id="a", seed=7, stop_copy_latency=1, multifd_transfer="off")  # type: ignore[arg-type]
    assert cfg.seed == 7
    assert cfg.stop_copy_latency == 1.0 and isinstance(cfg.stop_copy_latency, float)
    assert cfg.multifd_transfer is OnOffAuto.OFF


def test_config_is_frozen() -> None:
    cfg = DeviceConfig(id="a")
    with pytest.raises(AttributeError):
        cfg.state_size = 1  # type: ignore[misc]


# -- round trips and QOM access ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "vfio-sim,id=a",
        "vfio-sim,id=gpu0,state-size=512M,stop-copy-latency=50ms",
        "vfio-sim,id=b,state-size=0,precopy-size=1.5M,config-size=1,seed=0",
        "vfio-sim,id=c,read-bandwidth=100M,write-bandwidth=12345,seed=18446744073709551615",
        "vfio-sim,id=d,x-migration-multifd-transfer=off,x-migration-max-queued-buffers=3,"
        "x-migration-max-queued-buffers-size=64K,x-migration-load-config-after-iter=on",
    ],
)
def test_to_option_round_trips(text: str) -> None:
    cfg = parse_device_option(text)
    assert parse_device_option(cfg.to_option()) == cfg


def test_to_option_omits_defaults() -> None:
    assert DeviceConfig(id="a").to_option() == "vfio-sim,id=a"
    assert (
        DeviceConfig(id="a", state_size=512 * MiB, stop_copy_latency=0.05).to_option()
        == "vfio-sim,id=a,state-size=512M,stop-copy-latency=50ms"
    )


_configs = st.builds(
    DeviceConfig,
    id=st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,10}", fullmatch=True),
    state_size=st.integers(0, 64 * GiB),
    precopy_size=st.integers(0, 64 * GiB),
    config_size=st.integers(1, MiB),
    read_bandwidth=st.integers(0, UINT64_MAX),
    write_bandwidth=st.integers(0, UINT64_MAX),
    stop_copy_latency=st.floats(0, 60, allow_nan=False),
    seed=st.integers(0, UINT64_MAX),
    multifd_transfer=st.sampled_from(OnOffAuto),
    max_queued_buffers=st.none() | st.integers(1, UINT64_MAX - 1),
    max_queued_buffers_size=st.none() | st.integers(1, UINT64_MAX - 1),
    load_config_after_iter=st.sampled_from(OnOffAuto),
)


@given(_configs)
def test_to_option_round_trips_for_any_config(cfg: DeviceConfig) -> None:
    assert parse_device_option(cfg.to_option()) == cfg


@given(_configs)
def test_properties_strings_feed_back_into_with_property(cfg: DeviceConfig) -> None:
    rebuilt = DeviceConfig(id=cfg.id)
    for name, text in cfg.properties().items():
        rebuilt = rebuilt.with_property(name, text)
    assert rebuilt == cfg


def test_properties_display() -> None:
    cfg = parse_device_option("vfio-sim,id=gpu0,state-size=512M,stop-copy-latency=50ms,seed=5")
    assert list(cfg.properties()) == list(PROPERTY_NAMES)
    assert cfg.properties() == {
        "state-size": "512M",
        "precopy-size": "0",
        "config-size": "4096",
        "read-bandwidth": "0",
        "write-bandwidth": "0",
        "stop-copy-latency": "50ms",
        "seed": "5",
        "x-migration-multifd-transfer": "auto",
        "x-migration-max-queued-buffers": "unlimited",
        "x-migration-max-queued-buffers-size": "unlimited",
        "x-migration-load-config-after-iter": "auto",
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("id", "gpu0"),
        ("driver", "vfio-sim"),
        ("state-size", 512 * MiB),
        ("config-size", 4096),
        ("read-bandwidth", 0),
        ("stop-copy-latency", "50ms"),
        ("seed", 5),
        ("x-migration-multifd-transfer", "auto"),
        ("x-migration-max-queued-buffers", None),
        ("x-migration-max-queued-buffers-size", None),
    ],
)
def test_get_property(name: str, expected: object) -> None:
    cfg = parse_device_option("vfio-sim,id=gpu0,state-size=512M,stop-copy-latency=50ms,seed=5")
    value = cfg.get_property(name)
    assert value == expected
    assert type(value) is type(expected)  # plain str/int, never an Enum


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("state-size", "1G", "state_size", GiB),
        ("state-size", 4096, "state_size", 4096),
        ("precopy-size", "1.5M", "precopy_size", 3 * MiB // 2),
        ("read-bandwidth", "100M/s", "read_bandwidth", 100 * MiB),
        ("stop-copy-latency", "1.5s", "stop_copy_latency", 1.5),
        ("stop-copy-latency", 20, "stop_copy_latency", 0.02),
        ("seed", 42, "seed", 42),
        ("seed", "42", "seed", 42),
        ("x-migration-multifd-transfer", "off", "multifd_transfer", OnOffAuto.OFF),
        ("x-migration-multifd-transfer", True, "multifd_transfer", OnOffAuto.ON),
        ("x-migration-max-queued-buffers", 4, "max_queued_buffers", 4),
        ("x-migration-max-queued-buffers", "unlimited", "max_queued_buffers", None),
        ("x-migration-max-queued-buffers", None, "max_queued_buffers", None),
        ("x-migration-max-queued-buffers-size", "1M", "max_queued_buffers_size", MiB),
        ("x-migration-load-config-after-iter", "yes", "load_config_after_iter", OnOffAuto.ON),
    ],
)
def test_with_property(name: str, value: str | int | bool | None, field: str, expected: object) -> None:
    cfg = DeviceConfig(id="a", max_queued_buffers=9)
    new = cfg.with_property(name, value)
    assert getattr(new, field) == expected
    assert cfg.max_queued_buffers == 9  # the original is untouched


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("id", "b", "property 'id' is read-only"),
        ("driver", "vfio-sim", "property 'driver' is read-only"),
        ("colour", "red", "unknown property 'colour'"),
        ("state-size", "huge", "invalid size 'huge'"),
        ("state-size", True, "invalid size True"),
        ("state-size", "100G", "must be at most 64G"),
        ("config-size", 0, "must be at least 1"),
        ("stop-copy-latency", "2min", "invalid duration '2min'"),
        ("x-migration-multifd-transfer", 1, "invalid on/off/auto value 1"),
        ("x-migration-max-queued-buffers", 0, "must be at least 1"),
        ("seed", None, "invalid seed None"),
    ],
)
def test_with_property_rejects(name: str, value: str | int | bool | None, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceConfig(id="a").with_property(name, value)
    assert fragment in str(info.value)


def test_get_property_unknown() -> None:
    with pytest.raises(ConfigError, match="unknown property 'nope'"):
        DeviceConfig(id="a").get_property("nope")


def test_property_names() -> None:
    assert PROPERTY_NAMES == (
        "state-size",
        "precopy-size",
        "config-size",
        "read-bandwidth",
        "write-bandwidth",
        "stop-copy-latency",
        "seed",
        "x-migration-multifd-transfer",
        "x-migration-max-queued-buffers",
        "x-migration-max-queued-buffers-size",
        "x-migration-load-config-after-iter",
    )
