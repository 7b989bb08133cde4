"""migrate-analyze: read recorded migration channels (QEMU's or ours).

``qemu_stream``  walker for QEMU's native main stream (QEVM v3)
``analyze``      per-channel and main-channel analysis of a recording folder
``extract``      rebuild a RAM block from a recording
``cli``          the ``migrate-analyze`` command
"""

from migrate_analyze.analyze import Analysis, analyze, open_capture
from migrate_analyze.extract import ExtractResult, extract_ram
from migrate_analyze.qemu_stream import QemuMainStream, walk_qemu_main

__all__ = ["Analysis", "analyze", "open_capture", "ExtractResult", "extract_ram",
           "QemuMainStream", "walk_qemu_main"]
