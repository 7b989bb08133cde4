"""The source daemon (``migrate-src``).

Data leaves the VM here: ``save.py`` holds the per-device save handlers (device →
save task), ``channels.py`` the main channel and the multifd send channels (save
task → channel → wire), and ``migration.py`` the orchestration of one migration.
``daemon.py`` exposes it over QMP and ``cli.py`` is the command line.
"""
