"""Tools for people: ``migrate-ctl`` (drive a daemon over QMP), ``migrate-demo`` (a
real migration between two local daemons), and the process-pair helper they share
with the tests and benchmarks."""
