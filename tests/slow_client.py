"""A client process for ``test_slow_client.py``: follows a PV and reports, twice a second, one
JSON line: updates received, the Signal's missed-update counters, the last value's counter.
Environment: ``PVHUB_ADDRESS``, ``PV``."""

import json
import os
import time

from pvhub.client import EpicsSignalRO

received = 0
last = None


def on_value(value, **kwargs):
    global received, last
    received += 1
    last = float(value[0])


signal = EpicsSignalRO(os.environ["PV"], name="big")
signal.wait_for_connection(timeout=20)
signal.subscribe(on_value)
print("subscribed", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    time.sleep(0.5)
    print(json.dumps({"received": received, "missed": signal.missed_updates,
                      "gaps": signal.update_gaps, "last": last}), flush=True)
