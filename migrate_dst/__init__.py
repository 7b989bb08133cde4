"""The destination daemon (``migrate-dst``).

Data arrives here: ``incoming.py`` accepts and classifies connections,
``channels.py`` runs one receive task per multifd channel (wire → receive task),
``reassembly.py`` puts device-state buffers back in order, ``load.py`` holds the
per-device load handlers and load tasks (reassembly → load task → device), and
``migration.py`` drives the main channel of one incoming migration.  ``daemon.py``
exposes it over QMP and ``cli.py`` is the command line.
"""
