"""A client process for ``test_fan_out.py``: subscribe to a fast PV, print what arrived.

Prints one JSON line: the values its callback received, in order. Environment:
``PVHUB_ADDRESS``, ``PV`` and ``COUNT`` (stop after that many values).
"""

import json
import os
import threading

from pvhub.client import EpicsSignalRO, close_hubs

values = []
enough = threading.Event()
count = int(os.environ["COUNT"])


def collect(value, **kwargs):
    values.append(value)
    if len(values) >= count:
        enough.set()


signal = EpicsSignalRO(os.environ["PV"], name="fast")
signal.wait_for_connection(timeout=20)
print("subscribed", flush=True)
signal.subscribe(collect)
finished = enough.wait(60)
signal.unsubscribe_all()
close_hubs()
print(json.dumps({"values": values, "finished": finished}), flush=True)
