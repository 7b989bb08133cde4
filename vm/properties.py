"""Option and device-property parsing shared by the CLIs and QMP.

This module is responsible for turning the strings an operator types --
``-device vfio-sim,id=gpu0,state-size=512M``, ``qom-set gpu0 stop-copy-latency 50ms``,
``migrate-set-parameters max-bandwidth=1G`` -- into validated values, and for
turning those values back into strings that parse to the same thing
(``format_size``, ``DeviceConfig.to_option``).

Everything here is pure and synchronous: no I/O, no device state.  Every
rejection raises :class:`protocol.errors.ConfigError` whose message quotes the
offending text, so a CLI or QMP error reply can show it verbatim.

Conventions follow QEMU where QEMU has one:

* sizes are binary (``K`` = 1024, up to ``E``), like ``qemu_strtosz``;
* device options are ``driver,name=value,...`` with QEMU-style dashed property
  names; the experimental VFIO migration knobs keep QEMU's ``x-migration-``
  spellings so that command lines read like real ones;
* on/off/auto properties are :class:`OnOffAuto`.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from typing import Any, Final
from collections.abc import Callable

from protocol.errors import ConfigError

__all__ = [
    "BOOL_WORDS",
    "KiB",
    "MiB",
    "GiB",
    "TiB",
    "UINT64_MAX",
    "MAX_STATE_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_STOP_COPY_LATENCY",
    "SUPPORTED_DRIVERS",
    "PROPERTY_NAMES",
    "OnOffAuto",
    "DeviceConfig",
    "parse_size",
    "parse_bandwidth",
    "parse_duration",
    "parse_on_off_auto",
    "format_size",
    "format_duration",
    "parse_device_option",
    "default_seed",
]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30
TiB: Final = 1 << 40
PiB: Final = 1 << 50
EiB: Final = 1 << 60

#: QEMU's "no limit" value for uint64/size properties (``UINT64_MAX``).
UINT64_MAX: Final = (1 << 64) - 1

#: Upper bound for ``state-size`` and ``precopy-size``.  The content of a
#: simulated device lives in RAM on both ends, so a typo like ``state-size=512G``
#: must fail at parse time rather than as an allocation failure mid-migration.
MAX_STATE_SIZE: Final = 64 * GiB
#: Upper bound for ``config-size``: a PCI config space plus vendor state is
#: kilobytes; 1 MiB leaves room while keeping the config packet a single buffer.
MAX_CONFIG_SIZE: Final = 1 * MiB
#: Upper bound for ``stop-copy-latency`` (seconds).
MAX_STOP_COPY_LATENCY: Final = 60.0

SUPPORTED_DRIVERS: Final = ("vfio-sim",)

_SIZE_UNITS: Final[dict[str, int]] = {
    "": 1,
    "B": 1,
    "K": KiB,
    "M": MiB,
    "G": GiB,
    "T": TiB,
    "P": PiB,
    "E": EiB,
}
# Largest unit first: format_size picks the biggest unit that still gives an
# exact short decimal.
_FORMAT_UNITS: Final = (("E", EiB), ("P", PiB), ("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB))
# Below this, sizes are shown in plain bytes ("4096", not "4K"): small values are
# usually page or header sizes, which people think of in bytes.
_FORMAT_PLAIN_BELOW: Final = 64 * KiB

# No sign, no spaces, no hex: anything else is a typo we would rather reject.
_NUMBER = r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE: Final = re.compile(_NUMBER + r"(?P<unit>[bBkKmMgGtTpPeE]?)")
_DURATION_RE: Final = re.compile(_NUMBER + r"(?P<unit>ns|us|µs|ms|s)?", re.IGNORECASE)
_DURATION_UNITS: Final[dict[str, Fraction]] = {
    "": Fraction(1, 1000),  # a bare number is milliseconds, like QEMU's downtime-limit
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "us": Fraction(1, 1_000_000),
    "µs": Fraction(1, 1_000_000),
    "ns": Fraction(1, 1_000_000_000),
}
_ID_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_UNLIMITED_WORDS: Final = frozenset({"unlimited", str(UINT64_MAX)})

_SIZE_HINT: Final = "expected a non-negative number with an optional B, K, M, G, T, P or E suffix"


def _scaled(text: object, what: str, *, allow_per_second: bool = False) -> int:
    """Parse ``<number><binary suffix>`` into an exact integer (shared by sizes and rates)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigError(f"invalid {what} {text!r}: {_SIZE_HINT}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"invalid {what} {text!r}: must not be negative")
        if text > UINT64_MAX:
            raise ConfigError(f"invalid {what} {text!r}: exceeds 2^64-1")
        return text
    body = text
    if allow_per_second and body.lower().endswith("/s"):
        body = body[:-2]
    match = _SIZE_RE.fullmatch(body)
    if match is None:
        raise ConfigError(f"invalid {what} {text!r}: {_SIZE_HINT}")
    # Fraction keeps "1.5G" exact; float would round 2^64-ish values.
    value = Fraction(match["num"]) * _SIZE_UNITS[match["unit"].upper()]
    if value.denominator != 1:
        raise ConfigError(f"invalid {what} {text!r}: not a whole number of bytes")
    if value > UINT64_MAX:
        raise ConfigError(f"invalid {what} {text!r}: exceeds 2^64-1")
    return int(value)


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``"4096"``, ``"4K"``, ``"512m"``, ``"1.5G"`` (binary units).

    Integers are accepted as byte counts.  Fractions are allowed only when they
    give a whole number of bytes.  Raises :class:`ConfigError` quoting ``text``.
    """
    return _scaled(text, "size")


def parse_bandwidth(text: str | int) -> int:
    """Parse a bandwidth in bytes/s: same syntax as :func:`parse_size`, optional ``/s``.

    ``0`` means unlimited (QEMU's convention for ``max-bandwidth`` style knobs).
    """
    return _scaled(text, "bandwidth", allow_per_second=True)


def parse_duration(text: str | int | float) -> float:
    """Parse a duration into seconds: ``"50ms"``, ``"1s"``, ``"1.5s"``, ``"250us"``, ``"0"``.

    A bare number -- string or int/float -- is **milliseconds**, matching QEMU's
    ``downtime-limit``; so ``parse_duration(50) == 0.05``.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 50ms, 1.5s or 0")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ConfigError(f"invalid duration {text!r}: must be a finite, non-negative number")
        return float(Fraction(text) / 1000)
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"invalid duration {text!r}: expected a non-negative number with an optional "
            "ns, us, ms or s suffix (bare numbers are milliseconds)"
        )
    unit = (match["unit"] or "").lower()
    return float(Fraction(match["num"]) * _DURATION_UNITS[unit])


def _decimal_text(value: Fraction) -> str:
    """Render an exact finite decimal fraction without exponent or trailing zeros."""
    dec = Decimal(value.numerator) / Decimal(value.denominator)
    text = format(dec.normalize(), "f")
    return text


def format_size(n: int) -> str:
    """Render a byte count the way an operator would write it: ``256M``, ``1.5G``, ``4096``.

    Uses the largest binary unit giving an exact value with at most three
    decimals; below 64 KiB (and for odd values) plain bytes.  The result always
    round-trips: ``parse_size(format_size(n)) == n``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"invalid size {n!r}: must be a non-negative integer")
    if n < _FORMAT_PLAIN_BELOW:
        return str(n)
    for suffix, unit in _FORMAT_UNITS:
        if n >= unit:
            q = Fraction(n, unit)
            if (q * 1000).denominator == 1:
                return _decimal_text(q) + suffix
    return str(n)


def format_duration(seconds: float) -> str:
    """Render seconds as ``"0"``, ``"50ms"``, ``"1.5s"``; round-trips through :func:`parse_duration`."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"invalid duration {seconds!r}: must be a finite, non-negative number")
    if seconds == 0:
        return "0"
    # repr() is the shortest text that maps back to the same float; scaling its
    # exact decimal value keeps the round trip exact ("0.05" s -> "50ms" -> 0.05).
    exact = Fraction(Decimal(repr(float(seconds))))
    if exact >= 1:
        return _decimal_text(exact) + "s"
    return _decimal_text(exact * 1000) + "ms"


class OnOffAuto(str, Enum):
    """QEMU's ``OnOffAuto`` property type."""

    ON = "on"
    OFF = "off"
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str | bool | OnOffAuto) -> OnOffAuto:
        """Accept on/off/auto, true/false, yes/no (any case) or a bool."""
        return parse_on_off_auto(value)


#: the words every on/off option takes (lower case), for the one meaning each has
BOOL_WORDS: Final[dict[str, bool]] = {
    "on": True,
    "true": True,
    "yes": True,
    "off": False,
    "false": False,
    "no": False,
}
_ON_OFF_AUTO_WORDS: Final[dict[str, OnOffAuto]] = {
    **{word: OnOffAuto.ON if on else OnOffAuto.OFF for word, on in BOOL_WORDS.items()},
    "auto": OnOffAuto.AUTO,
}


def parse_on_off_auto(value: str | bool | OnOffAuto) -> OnOffAuto:
    """Parse an on/off/auto value; see :meth:`OnOffAuto.parse`."""
    if isinstance(value, OnOffAuto):
        return value
    if isinstance(value, bool):
        return OnOffAuto.ON if value else OnOffAuto.OFF
    if isinstance(value, str):
        found = _ON_OFF_AUTO_WORDS.get(value.lower())
        if found is not None:
            return found
    raise ConfigError(f"invalid on/off/auto value {value!r}: expected on, off or auto")


def default_seed(device_id: str) -> int:
    """The content seed of a device that has no ``seed=``: stable across processes.

    ``hash()`` is salted per process, so it would give the two daemons different
    content for the same ``id``; CRC-32 of the id does not.
    """
    return zlib.crc32(device_id.encode("utf-8"))


def _parse_seed(value: str | int | bool) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"invalid seed {value!r}: expected an integer in 0..2^64-1")
    if isinstance(value, str):
        try:
            number = int(value, 0)
        except ValueError:
            raise ConfigError(f"invalid seed {value!r}: expected an integer in 0..2^64-1") from None
    else:
        number = value
    if not 0 <= number <= UINT64_MAX:
        raise ConfigError(f"invalid seed {value!r}: expected an integer in 0..2^64-1")
    return number


def _parse_count_or_unlimited(value: str | int | bool | None) -> int | None:
    """A buffer count >= 1, or None for unlimited (``unlimited`` or QEMU's UINT64_MAX)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"invalid count {value!r}: expected an integer >= 1 or 'unlimited'")
    if isinstance(value, str):
        if value.lower() in _UNLIMITED_WORDS:
            return None
        if not value.isdigit():
            raise ConfigError(f"invalid count {value!r}: expected an integer >= 1 or 'unlimited'")
        value = int(value)
    if value == UINT64_MAX:
        return None
    if not 1 <= value < UINT64_MAX:
        raise ConfigError(
            f"invalid count {value!r}: must be at least 1 (use 'unlimited' to remove the cap)"
        )
    return value


def _parse_size_or_unlimited(value: str | int | bool | None) -> int | None:
    """A byte cap >= 1, or None for unlimited (``unlimited`` or QEMU's UINT64_MAX)."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in _UNLIMITED_WORDS:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"invalid size {value!r}: {_SIZE_HINT}")
    size = parse_size(value)
    if size == UINT64_MAX:
        return None
    if size < 1:
        raise ConfigError(
            f"invalid size {value!r}: must be at least 1 (use 'unlimited' to remove the cap)"
        )
    return size


def _size_value(value: str | int | bool | None) -> int:
    return _scaled(value, "size")


def _bandwidth_value(value: str | int | bool | None) -> int:
    return _scaled(value, "bandwidth", allow_per_second=True)


def _duration_value(value: str | int | bool | None) -> float:
    if value is None:
        raise ConfigError("invalid duration None: expected e.g. 50ms, 1.5s or 0")
    return parse_duration(value)


def _on_off_auto_value(value: str | int | bool | None) -> OnOffAuto:
    if isinstance(value, (str, bool)):
        return parse_on_off_auto(value)
    raise ConfigError(f"invalid on/off/auto value {value!r}: expected on, off or auto")


def _seed_value(value: str | int | bool | None) -> int:
    if value is None:
        raise ConfigError("invalid seed None: expected an integer in 0..2^64-1")
    return _parse_seed(value)


QomValue = str | int | bool | None


@dataclass(frozen=True, slots=True)
class _Property:
    """How one QEMU-style property maps onto a DeviceConfig field."""

    name: str
    field: str
    parse: Callable[[str | int | bool | None], object]
    display: Callable[[object], str]
    qom: Callable[[object], QomValue]


def _display_size(v: object) -> str:
    assert isinstance(v, int)
    return format_size(v)


def _display_optional_size(v: object) -> str:
    return "unlimited" if v is None else _display_size(v)


def _display_optional_count(v: object) -> str:
    return "unlimited" if v is None else str(v)


def _display_duration(v: object) -> str:
    assert isinstance(v, float)
    return format_duration(v)


def _display_enum(v: object) -> str:
    assert isinstance(v, OnOffAuto)
    return v.value


def _qom_int(v: object) -> QomValue:
    assert isinstance(v, int)
    return v


def _qom_optional_int(v: object) -> QomValue:
    assert v is None or isinstance(v, int)
    return v


def _qom_enum(v: object) -> QomValue:
    assert isinstance(v, OnOffAuto)
    # plain str, not the Enum: every serializer (json, msgpack) handles it
    return v.value


_PROPERTIES: Final[tuple[_Property, ...]] = (
    _Property("state-size", "state_size", _size_value, _display_size, _qom_int),
    _Property("precopy-size", "precopy_size", _size_value, _display_size, _qom_int),
    _Property("config-size", "config_size", _size_value, _display_size, _qom_int),
    _Property(
        "read-bandwidth", "read_bandwidth", _bandwidth_value, _display_size, _qom_int
    ),
    _Property(
        "write-bandwidth", "write_bandwidth", _bandwidth_value, _display_size, _qom_int
    ),
    # durations go out as strings ("50ms"): qom-get has no float in our value type,
    # and the string feeds straight back into qom-set.
    _Property(
        "stop-copy-latency",
        "stop_copy_latency",
        _duration_value,
        _display_duration,
        _display_duration,
    ),
    _Property("seed", "seed", _seed_value, str, _qom_int),
    _Property(
        "x-migration-multifd-transfer",
        "multifd_transfer",
        _on_off_auto_value,
        _display_enum,
        _qom_enum,
    ),
    _Property(
        "x-migration-max-queued-buffers",
        "max_queued_buffers",
        _parse_count_or_unlimited,
        _display_optional_count,
        _qom_optional_int,
    ),
    _Property(
        "x-migration-max-queued-buffers-size",
        "max_queued_buffers_size",
        _parse_size_or_unlimited,
        _display_optional_size,
        _qom_optional_int,
    ),
    _Property(
        "x-migration-load-config-after-iter",
        "load_config_after_iter",
        _on_off_auto_value,
        _display_enum,
        _qom_enum,
    ),
)
_BY_NAME: Final[dict[str, _Property]] = {p.name: p for p in _PROPERTIES}

#: Settable property names, in display order (``id`` and ``driver`` are read-only).
PROPERTY_NAMES: Final[tuple[str, ...]] = tuple(p.name for p in _PROPERTIES)
_READ_ONLY: Final = ("driver", "id")

#: Sentinel for "derive the seed from the id" (outside the valid 0..2^64-1 range).
_AUTO_SEED: Final = -1


def _unknown_property(device_id: str, name: str) -> ConfigError:
    return ConfigError(
        f"device {device_id!r}: unknown property {name!r}; "
        f"valid properties: {', '.join(PROPERTY_NAMES)}"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """The validated configuration of one simulated VFIO device (one ``-device``).

    Construction validates every field, so holding a ``DeviceConfig`` means
    holding a usable one.  ``seed`` defaults to :func:`default_seed` of the id
    (``seed=-1`` also means "derive"), so both daemons generate/expect the same
    content for the same command line.  Fields are keyword-only because ``id``
    is required while ``driver`` has a default.
    """

    driver: str = "vfio-sim"
    id: str
    #: stop-copy data in bytes (what is left after pre-copy)
    state_size: int = 256 * MiB
    #: pre-copy "initial bytes"; 0 = the device has no PRE_COPY support
    precopy_size: int = 0
    #: config-space blob size (sent last, as the config packet)
    config_size: int = 4096
    #: bytes/s the save side can read; 0 = unlimited
    read_bandwidth: int = 0
    #: bytes/s the load side can absorb; 0 = unlimited
    write_bandwidth: int = 0
    #: seconds the device needs to quiesce when entering STOP_COPY
    stop_copy_latency: float = 0.0
    seed: int = _AUTO_SEED
    multifd_transfer: OnOffAuto = OnOffAuto.AUTO
    #: cap on queued-but-unwritten buffers at the destination; None = unlimited
    max_queued_buffers: int | None = None
    #: cap on queued-but-unwritten payload bytes at the destination; None = unlimited
    max_queued_buffers_size: int | None = None
    load_config_after_iter: OnOffAuto = OnOffAuto.AUTO

    def __post_init__(self) -> None:
        if self.driver not in SUPPORTED_DRIVERS:
            raise ConfigError(
                f"unsupported device driver {self.driver!r}; "
                f"supported drivers: {', '.join(SUPPORTED_DRIVERS)}"
            )
        if not isinstance(self.id, str) or _ID_RE.fullmatch(self.id) is None:
            raise ConfigError(
                f"invalid device id {self.id!r}: must match [A-Za-z][A-Za-z0-9_.-]{{0,63}}"
            )
        # Coerce the few fields whose natural Python spelling differs from the
        # stored type (object.__setattr__ because the dataclass is frozen).
        if self.seed == _AUTO_SEED:
            object.__setattr__(self, "seed", default_seed(self.id))
        if not isinstance(self.multifd_transfer, OnOffAuto):
            object.__setattr__(self, "multifd_transfer", parse_on_off_auto(self.multifd_transfer))
        if not isinstance(self.load_config_after_iter, OnOffAuto):
            object.__setattr__(
                self, "load_config_after_iter", parse_on_off_auto(self.load_config_after_iter)
            )
        if isinstance(self.stop_copy_latency, bool) or not isinstance(
            self.stop_copy_latency, (int, float)
        ):
            self._bad("stop-copy-latency", "must be a number of seconds")
        object.__setattr__(self, "stop_copy_latency", float(self.stop_copy_latency))
        for name in ("state_size", "precopy_size", "config_size", "read_bandwidth",
                     "write_bandwidth", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                self._bad(name.replace("_", "-"), f"must be an integer (got {value!r})")
        self._check_range("state-size", self.state_size, 0, MAX_STATE_SIZE, format_size)
        self._check_range("precopy-size", self.precopy_size, 0, MAX_STATE_SIZE, format_size)
        self._check_range("config-size", self.config_size, 1, MAX_CONFIG_SIZE, format_size)
        self._check_range("read-bandwidth", self.read_bandwidth, 0, UINT64_MAX, str)
        self._check_range("write-bandwidth", self.write_bandwidth, 0, UINT64_MAX, str)
        self._check_range("seed", self.seed, 0, UINT64_MAX, str)
        latency = self.stop_copy_latency
        if not math.isfinite(latency) or not 0 <= latency <= MAX_STOP_COPY_LATENCY:
            self._bad("stop-copy-latency", f"must be between 0 and 60s (got {latency!r}s)")
        if self.max_queued_buffers is not None:
            if isinstance(self.max_queued_buffers, bool) or not isinstance(
                self.max_queued_buffers, int
            ):
                self._bad("x-migration-max-queued-buffers", "must be an integer or None")
            self._check_range(
                "x-migration-max-queued-buffers", self.max_queued_buffers, 1, UINT64_MAX - 1, str
            )
        if self.max_queued_buffers_size is not None:
            if isinstance(self.max_queued_buffers_size, bool) or not isinstance(
                self.max_queued_buffers_size, int
            ):
                self._bad("x-migration-max-queued-buffers-size", "must be an integer or None")
            self._check_range(
                "x-migration-max-queued-buffers-size",
                self.max_queued_buffers_size,
                1,
                UINT64_MAX - 1,
                str,
            )

    def _bad(self, prop: str, why: str) -> None:
        raise ConfigError(f"device {self.id!r}: property {prop!r} {why}")

    def _check_range(
        self, prop: str, value: int, low: int, high: int, show: Callable[[int], str]
    ) -> None:
        if value < low:
            self._bad(prop, f"must be at least {show(low)} (got {value})")
        if value > high:
            self._bad(prop, f"must be at most {show(high)} (got {show(value)})")

    # -- derived values --------------------------------------------------------

    @property
    def total_size(self) -> int:
        """Bytes of the device's migratable data stream: pre-copy part + stop-copy part."""
        return self.precopy_size + self.state_size

    @property
    def supports_precopy(self) -> bool:
        """Whether the device advertises PRE_COPY (it has pre-copy initial bytes)."""
        return self.precopy_size > 0

    # -- QOM-style access ------------------------------------------------------

    def get_property(self, name: str) -> QomValue:
        """Value of a property for ``qom-get``: sizes/rates/seed as ints, on/off/auto as
        strings, durations as strings (``"50ms"``), unlimited caps as ``None``."""
        if name in _READ_ONLY:
            return str(getattr(self, name))
        prop = _BY_NAME.get(name)
        if prop is None:
            raise _unknown_property(self.id, name)
        return prop.qom(getattr(self, prop.field))

    def with_property(self, name: str, value: str | int | bool | None) -> DeviceConfig:
        """A copy with one property changed (``qom-set``); validated like the CLI.

        Strings use the ``-device`` syntax; ints are bytes (sizes, rates),
        milliseconds (``stop-copy-latency``) or plain numbers; bools set on/off
        properties; ``None`` sets an ``x-migration-max-queued-*`` cap to unlimited.
        """
        if name in _READ_ONLY:
            raise ConfigError(f"device {self.id!r}: property {name!r} is read-only")
        prop = _BY_NAME.get(name)
        if prop is None:
            raise _unknown_property(self.id, name)
        try:
            parsed = prop.parse(value)
        except ConfigError as exc:
            raise ConfigError(f"device {self.id!r}: property {name!r}: {exc}") from None
        changes: dict[str, Any] = {prop.field: parsed}
        return replace(self, **changes)

    def properties(self) -> dict[str, str]:
        """Every settable property as a display string (all of them parse back)."""
        return {p.name: p.display(getattr(self, p.field)) for p in _PROPERTIES}

    def to_option(self) -> str:
        """The ``-device`` text for this config; ``parse_device_option`` gives it back.

        Only non-default properties are written, so the text stays readable.
        """
        defaults = {f.name: f.default for f in fields(DeviceConfig)}
        parts = [self.driver, f"id={self.id}"]
        for prop in _PROPERTIES:
            value = getattr(self, prop.field)
            default = default_seed(self.id) if prop.field == "seed" else defaults[prop.field]
            if value != default:
                parts.append(f"{prop.name}={prop.display(value)}")
        return ",".join(parts)


def parse_device_option(text: str) -> DeviceConfig:
    """Parse a QEMU-style ``-device`` option, e.g. ``vfio-sim,id=gpu0,state-size=512M``.

    The driver comes first (``driver=vfio-sim`` is also accepted there); ``id``
    is required.  Unknown and duplicate properties are rejected, each with a
    :class:`ConfigError` naming the property.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"invalid -device option {text!r}: expected 'vfio-sim,id=NAME,...'")
    parts = text.strip().split(",")
    head = parts[0]
    if "=" in head:
        key, _, driver = head.partition("=")
        if key != "driver":
            raise ConfigError(
                f"invalid -device option {text!r}: must start with the driver name, "
                f"e.g. 'vfio-sim,id=dev0' (supported drivers: {', '.join(SUPPORTED_DRIVERS)})"
            )
    else:
        driver = head
    if driver not in SUPPORTED_DRIVERS:
        raise ConfigError(
            f"unsupported device driver {driver!r}; supported drivers: {', '.join(SUPPORTED_DRIVERS)}"
        )
    pairs: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            raise ConfigError(f"invalid -device option {text!r}: empty property (stray ',')")
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(
                f"invalid -device option {text!r}: property {key!r} has no value "
                "(expected name=value)"
            )
        if key in pairs or key == "driver":
            raise ConfigError(f"invalid -device option {text!r}: duplicate property {key!r}")
        pairs[key] = value
    device_id = pairs.pop("id", None)
    if device_id is None:
        raise ConfigError(f"invalid -device option {text!r}: device {driver!r} requires id=NAME")
    if _ID_RE.fullmatch(device_id) is None:
        raise ConfigError(
            f"invalid device id {device_id!r}: must match [A-Za-z][A-Za-z0-9_.-]{{0,63}}"
        )
    values: dict[str, Any] = {}
    for key, value in pairs.items():
        prop = _BY_NAME.get(key)
        if prop is None:
            raise _unknown_property(device_id, key)
        try:
            values[prop.field] = prop.parse(value)
        except ConfigError as exc:
            raise ConfigError(f"device {device_id!r}: property {key!r}: {exc}") from None
    return DeviceConfig(driver=driver, id=device_id, **values)
