"""A pytest plugin that runs ophyd's shipped tests with pvhub as ophyd's control layer.

Rule 1: ophyd's conftest picks the control layer in a session fixture (``cl_selector``) by
calling ``ophyd.set_cl("caproto")`` (and ``"pyepics"``); a conftest fixture cannot be
overridden from a plugin, so this plugin replaces ``ophyd.set_cl`` before that conftest
imports it: asked for "caproto", it installs pvhub's layer instead. The runner deselects
the "pyepics" half (``-k "not pyepics"``).
Rule 2: before each test, ``EPICS_CA_SERVER_PORT`` moves on to the next of the runner's
ports, so the IOCs a test starts never share a port with those of the test before.
Rule 3: ophyd's fixtures give an IOC 5 s to start; here they give it 30 (with either layer):
a loaded machine should not decide which tests pass.
Rule 4: the daemon is not started here: ``$PVHUB_ADDRESS`` names one that reaches the IOCs
the tests start (the runner's fixture starts it), so each test file runs against a real
``pvhub serve``. With ``$PVHUB_SHIPPED_LAYER`` set to "caproto" the plugin changes nothing:
that is the baseline run.
"""

from __future__ import annotations

import itertools
import os

import ophyd
import pytest

LAYER = os.environ.get("PVHUB_SHIPPED_LAYER", "pvhub")
_original_set_cl = ophyd.set_cl


def _set_cl(control_layer=None, *, pv_telemetry=False):
    """``ophyd.set_cl``, with "caproto" (and the default) meaning pvhub's layer."""
    if control_layer in (None, "caproto", "any"):
        from pvhub.client import ophyd_layer

        ophyd_layer.install(address=os.environ.get("PVHUB_ADDRESS"))
        return
    _original_set_cl(control_layer, pv_telemetry=pv_telemetry)


if LAYER == "pvhub":
    ophyd.set_cl = _set_cl


_server_ports = itertools.cycle(os.environ.get("PVHUB_SHIPPED_SERVER_PORTS", "").split() or [None])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The next test's IOCs serve on the next of the runner's ports (its Rule 2)."""
    port = next(_server_ports)
    if port is not None:
        os.environ["EPICS_CA_SERVER_PORT"] = port


def _patient_readiness():
    """ophyd's IOC fixtures wait 5 s for an IOC to start (caproto's ``poll_readiness``), which
    a loaded machine sometimes misses with either layer; they wait up to 30 s here."""
    from caproto.tests import conftest as caproto_conftest

    original = caproto_conftest.poll_readiness

    def poll_readiness(pv_to_check, attempts=5, timeout=1, process=None):
        return original(pv_to_check, attempts=max(attempts, 30), timeout=timeout, process=process)

    caproto_conftest.poll_readiness = poll_readiness


_patient_readiness()


def pytest_report_header(config):
    return f"ophyd control layer for EPICS tests: {LAYER} ({os.environ.get('PVHUB_ADDRESS', 'no daemon')})"
