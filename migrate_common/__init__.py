"""Pieces both daemons share: QMP server and client, sockets, settings, status,
the failure funnel, logging and the common command line."""
