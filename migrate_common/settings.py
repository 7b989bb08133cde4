"""Migration capabilities and parameters, with QEMU's names, defaults and checks.

Both daemons keep one :class:`MigrationSettings`; ``migrate-set-capabilities`` and
``migrate-set-parameters`` change it between migrations, and a migration takes a
snapshot when it starts, so a change never affects a migration already running.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import ConfigError
from vm.properties import BOOL_WORDS, OnOffAuto

__all__ = ["MigrationSettings", "BOOLEAN_PARAMETERS", "bool_text", "compression_level", "effective_multifd_transfer", "effective_load_config_after_iter", "CAPABILITIES", "SUPPORTED_CAPABILITIES", "PARAMETER_DEFAULTS"]

#: every capability name QEMU 10.x knows, in its enum order
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack",
    "dirty-limit", "mapped-ram",
)
#: the ones this implementation acts on; the others can be queried but not enabled
SUPPORTED_CAPABILITIES = frozenset({"events", "return-path", "multifd", "switchover-ack",
                                    "validate-uuid"})

PARAMETER_DEFAULTS: dict[str, Any] = {
    "multifd-channels": 2,
    "multifd-compression": "none",
    "zero-page-detection": "multifd",
    "multifd-zlib-level": 1,
    "multifd-zstd-level": 1,
    "downtime-limit": 300,            # ms
    "max-bandwidth": 128 * 1024 * 1024,  # bytes/s, live phase only
    "x-connect-timeout": 10_000,      # ms: connecting, handshakes, waiting for channels
    "x-switchover-timeout": 120_000,  # ms: from the devices' quiesce to the destination's SHUT
    "x-channel-stall-timeout": 30_000,  # ms: a channel that accepts no byte at all
    "x-socket-buffer-size": -1,       # multifd SO_SNDBUF/SO_RCVBUF: -1 auto, 0 kernel autotuning
    "tls-creds": "",                  # id of a --object tls-creds-x509; "" = no TLS
    "tls-hostname": "",               # name the destination's certificate must carry
    "x-verify-ram": True,             # compare guest RAM digests before the destination runs
    # bytes of guest pages per multifd RAM packet; QEMU's is fixed at 512 KiB
    "x-multifd-packet-size": 2 * 1024 * 1024,
    # data bytes per multifd device-state packet (source), the most accepted
    # (destination); QEMU reads device state in pieces of 1 MiB
    "x-device-state-packet-size": 4 * 1024 * 1024,
}

#: parameters that are booleans (QMP true/false; on/off and the like as text)
BOOLEAN_PARAMETERS = frozenset({"x-verify-ram"})


def bool_text(text: str) -> bool | str:
    """``on``/``off``, ``true``/``false``, ``yes``/``no`` as a bool; other text as it
    is (for the parameter's own check to refuse)."""
    return BOOL_WORDS.get(text.strip().lower(), text)

_INT_RANGES = {
    "multifd-channels": (1, 255),
    "multifd-zlib-level": (0, 9),
    "multifd-zstd-level": (0, 20),
    "downtime-limit": (0, 2_000_000),
    "max-bandwidth": (0, 2**63 - 1),
    "x-connect-timeout": (100, 3_600_000),
    "x-switchover-timeout": (100, 3_600_000),
    "x-channel-stall-timeout": (100, 3_600_000),
    "x-socket-buffer-size": (-1, 64 * 1024 * 1024),
    "x-multifd-packet-size": (4096, 2 * 1024 * 1024),
    "x-device-state-packet-size": (4096, 8 * 1024 * 1024),
}
#: integer parameters that are sizes: ``1G``, ``512K`` as text
SIZE_PARAMETERS = frozenset({"max-bandwidth", "x-socket-buffer-size", "x-multifd-packet-size",
                             "x-device-state-packet-size"})
#: integer parameters that must be a power of two
_POWERS_OF_TWO = frozenset({"x-multifd-packet-size"})
_COMPRESSION = ("none", "zlib", "zstd")
_ZERO_PAGE_DETECTION = ("none", "legacy", "multifd")


@dataclass
class MigrationSettings:
    capabilities: dict[str, bool] = field(
        default_factory=lambda: {name: False for name in CAPABILITIES})
    parameters: dict[str, Any] = field(default_factory=lambda: dict(PARAMETER_DEFAULTS))

    def snapshot(self) -> MigrationSettings:
        return copy.deepcopy(self)

    def cap(self, name: str) -> bool:
        return self.capabilities[name]

    def param(self, name: str) -> Any:
        return self.parameters[name]

    # -- capabilities -------------------------------------------------------------------
    def set_capabilities(self, entries: Any) -> None:
        """Apply QMP ``migrate-set-capabilities`` entries atomically."""
        if not isinstance(entries, list):
            raise ConfigError("'capabilities' must be a list of {capability, state}")
        wanted = dict(self.capabilities)
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"capability", "state"}:
                raise ConfigError("each capability entry needs exactly 'capability' and 'state'")
            name, state = entry["capability"], entry["state"]
            if name not in wanted:
                raise ConfigError(f"Invalid parameter 'capability': unknown capability {name!r}")
            if not isinstance(state, bool):
                raise ConfigError(f"capability {name!r}: 'state' must be true or false")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise ConfigError(f"capability {name!r} is not supported by multifd-migrate "
                                  f"(supported: {', '.join(sorted(SUPPORTED_CAPABILITIES))})")
            wanted[name] = state
        if wanted["switchover-ack"] and not wanted["return-path"]:
            raise ConfigError("Capability 'switchover-ack' requires capability 'return-path'")
        self.capabilities = wanted

    def set_capability(self, name: str, state: bool) -> None:
        self.set_capabilities([{"capability": name, "state": state}])

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": n, "state": s} for n, s in self.capabilities.items()]

    # -- parameters ---------------------------------------------------------------------
    def set_parameters(self, args: dict[str, Any]) -> None:
        """Apply QMP ``migrate-set-parameters`` arguments atomically."""
        new = dict(self.parameters)
        for name, value in args.items():
            if name not in new:
                raise ConfigError(f"Parameter '{name}' is unexpected (known: "
                                  f"{', '.join(sorted(PARAMETER_DEFAULTS))})")
            if name in _INT_RANGES:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"Invalid parameter type for '{name}', expected: integer")
                lo, hi = _INT_RANGES[name]
                if not lo <= value <= hi:
                    raise ConfigError(f"Parameter '{name}' expects a value between {lo} and {hi}")
                if name in _POWERS_OF_TWO and value & (value - 1):
                    raise ConfigError(f"Parameter '{name}' expects a power of two, got {value}")
            elif name in ("tls-creds", "tls-hostname"):
                if value is None:
                    value = ""  # QMP's StrOrNull: null resets it
                if not isinstance(value, str) or len(value) > 255:
                    raise ConfigError(f"Invalid parameter type for '{name}', expected: string")
            elif name in BOOLEAN_PARAMETERS:
                if not isinstance(value, bool):
                    raise ConfigError(f"Invalid parameter type for '{name}', expected: boolean")
            elif name == "zero-page-detection":
                if value not in _ZERO_PAGE_DETECTION:
                    raise ConfigError("Parameter 'zero-page-detection' expects one of "
                                      + ", ".join(_ZERO_PAGE_DETECTION))
            elif name == "multifd-compression":
                if value not in _COMPRESSION:
                    raise ConfigError(f"Parameter 'multifd-compression' expects one of "
                                      f"{', '.join(_COMPRESSION)}")
            new[name] = value
        self.parameters = new

    def set_parameter_text(self, name: str, text: str) -> None:
        """Apply a ``NAME=VALUE`` given on a command line."""
        value: Any = text
        if name in BOOLEAN_PARAMETERS:
            value = bool_text(text)
        elif name in _INT_RANGES:
            from vm.properties import parse_size

            value = (parse_size(text) if name in SIZE_PARAMETERS and text.lstrip()[:1] != "-"
                     else _int(name, text))
        self.set_parameters({name: value})

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.parameters)


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"parameter {name!r} expects an integer, got {text!r}") from None


def compression_level(settings: MigrationSettings) -> int:
    method = settings.param("multifd-compression")
    return int(settings.param(f"multifd-{method}-level")) if method != "none" else 0


def effective_multifd_transfer(setting: OnOffAuto, settings: MigrationSettings,
                               device_id: str) -> bool:
    """QEMU's rule for ``x-migration-multifd-transfer`` (spec §4.8)."""
    supported = settings.cap("multifd") and settings.param("multifd-compression") == "none"
    if setting is OnOffAuto.OFF:
        return False
    if setting is OnOffAuto.AUTO:
        return bool(supported)
    if not supported:
        raise ConfigError(f"device {device_id}: multifd device transfer requested "
                          "(x-migration-multifd-transfer=on) but unsupported in the current "
                          "config: it needs the multifd capability and "
                          "multifd-compression=none")
    return True


def effective_load_config_after_iter(setting: OnOffAuto, multifd: bool) -> bool:
    # AUTO means "only where the platform needs it" (ARM64 in QEMU); this model never does
    return multifd and setting is OnOffAuto.ON
