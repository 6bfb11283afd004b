"""Stand-in for coverage.py in the IOC processes ophyd's tests start.

caproto's ``caproto.tests.example_runner`` (how ophyd's fixtures launch their IOCs) imports
``coverage`` only to call ``process_startup()``; this environment does not install it, and
no coverage is measured, so that call does nothing here.
"""


def process_startup():
    return None
