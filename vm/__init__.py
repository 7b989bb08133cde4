"""The VM model: simulated VFIO devices and the VM that holds them.

This package is responsible for everything the daemons migrate *from* and
*into*, with no networking and no protocol knowledge:

* :mod:`vm.properties` -- parsing and formatting of sizes, bandwidths,
  durations, on/off/auto values and QEMU-style ``-device`` options into a
  validated :class:`DeviceConfig` (shared by the CLIs and QMP ``qom-get``/``qom-set``);
* :mod:`vm.vfio_sim` -- :class:`VfioSimDevice`, a device that follows the
  kernel's VFIO migration uAPI v2 state machine and produces/consumes a
  deterministic, digest-verifiable data stream plus config space;
* :mod:`vm.machine` -- :class:`VirtualMachine`: devices in command-line order,
  lookup by ``(idstr, instance_id)``, and the ``query-status`` run state.
"""

from vm.machine import (
    DEFAULT_DEVICE_OPTIONS,
    RUN_STATE_TRANSITIONS,
    RunState,
    VirtualMachine,
    default_device_configs,
)
from vm.properties import (
    PROPERTY_NAMES,
    SUPPORTED_DRIVERS,
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
from vm.vfio_sim import (
    ALL_FEATURES,
    DIRECT_ARCS,
    MAX_DATA_BUFFER_SIZE,
    PRE_COPY_STATES,
    SAVING_STATES,
    DeviceState,
    MigrationFeature,
    Role,
    VfioSimDevice,
    transition_path,
)

__all__ = [
    "ALL_FEATURES",
    "DEFAULT_DEVICE_OPTIONS",
    "DIRECT_ARCS",
    "MAX_DATA_BUFFER_SIZE",
    "PRE_COPY_STATES",
    "PROPERTY_NAMES",
    "RUN_STATE_TRANSITIONS",
    "SAVING_STATES",
    "SUPPORTED_DRIVERS",
    "DeviceConfig",
    "DeviceState",
    "MigrationFeature",
    "OnOffAuto",
    "Role",
    "RunState",
    "VfioSimDevice",
    "VirtualMachine",
    "default_device_configs",
    "format_duration",
    "format_size",
    "parse_bandwidth",
    "parse_device_option",
    "parse_duration",
    "parse_on_off_auto",
    "parse_size",
    "transition_path",
]
