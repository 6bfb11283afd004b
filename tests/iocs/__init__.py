"""caproto IOCs written for pvhub's tests; each runs as its own process (see ``pvhub.testing``).

Run one by hand from the repository root, e.g.
``python -m tests.iocs.zoo --prefix zoo: --interfaces 127.0.0.1``.
"""
