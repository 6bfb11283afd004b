"""The benchmark's tables: one per part, then the pvhub / direct ratios in one place.

Rule 1: a ratio is always pvhub over the other client, so above 1 means pvhub takes longer
(or uses more CPU, or delivers more updates: the column says which).
"""

from __future__ import annotations

from typing import Any

from fanout import Window
from stats import Timing, duration, number, percentile, rate, ratio, table

LABELS = {
    "put": {
        "pvhub": "pvhub `EpicsSignal.set(v).wait()`",
        "ophyd": "ophyd `EpicsSignal(put_complete=True).set(v).wait()`",
        "caproto": "caproto `pv.write(v, wait=True)`",
        "caproto_monitored": "caproto `pv.write(v, wait=True)`, the same client monitoring the PV",
    },
    "read": {
        "pvhub": "pvhub `read()` (from the client's cache)",
        "ophyd": "ophyd `read()` (a CA get)",
        "caproto": "caproto `pv.read(data_type='time')`",
        "ophyd_monitored": "ophyd `read()` with `auto_monitor=True` (from its cache)",
    },
    "connect": {
        "pvhub": "pvhub, PV new to the daemon (spawns its actor)",
        "ophyd": "ophyd, PV new to the process (circuit up)",
        "caproto": "caproto, PV new to the context (circuit up)",
        "actor_start": "(share of the above: `python -c 'import pvhub.actors.loop'`)",
        "pvhub_fresh": "pvhub, new `Hub` (new client), PV's actor running",
        "caproto_fresh": "caproto, new `Context` (new client, new circuit)",
    },
}


def timing_table(part: str, timings: dict[str, Timing]) -> str:
    base = timings["pvhub"]
    rows = [
        [LABELS[part][name], str(t.n), duration(t.median), duration(t.p99), duration(t.maximum),
         rate(t.per_s), ratio(base.median, t.median) if name != "pvhub" else ""]
        for name, t in timings.items()
    ]  # fmt: skip
    return table(["client", "n", "median", "p99", "max", "per s", "pvhub / this (median)"], rows)


def _pairs(direct: list[Window], hub: list[Window], latency_rate: float) -> list[tuple[Window, Window]]:
    return [
        (d, h) for d in direct for h in hub
        if (d.n, d.rate) == (h.n, h.rate) and d.rate != latency_rate
    ]  # fmt: skip


def fan_out_tables(direct: list[Window], hub: list[Window], latency_rate: float) -> str:
    delivery, cpu = [], []
    for d, h in _pairs(direct, hub, latency_rate):
        delivery.append([
            f"{d.rate:g}", str(d.n), f"{rate(d.ioc_rate)} / {rate(h.ioc_rate)}",
            rate(d.received_per_s), rate(h.received_per_s), ratio(h.received_per_s, d.received_per_s),
            f"{number(d.dropped_percent, 1)} / {number(h.dropped_percent, 1)}",
            f"{number(d.late_percent, 1)} / {number(h.late_percent, 1)}",
            number(h.seq_missed_percent, 1),
            f"{d.monitors} / {h.monitors}", f"{duration(d.probe)} / {duration(h.probe)}",
            f"{duration(percentile(d.latencies, 50))} / {duration(percentile(h.latencies, 50))}",
            f"{duration(percentile(d.latencies, 99))} / {duration(percentile(h.latencies, 99))}",
        ])  # fmt: skip
        upstream = h.ioc_cpu + h.hub_cpu
        cpu.append([
            f"{d.rate:g}", str(d.n), number(d.ioc_cpu), number(h.ioc_cpu), number(h.hub_cpu),
            number(upstream), ratio(upstream, d.ioc_cpu),
            f"{number(d.clients_cpu)} / {number(h.clients_cpu)}", ratio(h.clients_cpu, d.clients_cpu),
            f"{number(d.others_cpu, 0)} / {number(h.others_cpu, 0)}",
        ])  # fmt: skip
    a = table(
        ["Hz", "N", "IOC produced/s d / p", "received/s per client, direct", "received/s per client, pvhub",
         "pvhub / direct", "% dropped d / p", "% late d / p",
         "% p lost after its actor", "IOC monitors d / p",
         "a new client's CA read d / p", "latency p50 d / p", "latency p99 d / p"],
        delivery,
    )  # fmt: skip
    b = table(
        ["Hz", "N", "IOC, direct", "IOC, pvhub", "daemon+actor", "IOC+daemon+actor",
         "(IOC+daemon+actor) / IOC direct", "one client d / p", "pvhub / direct (client)",
         "other processes d / p"],
        cpu,
    )  # fmt: skip
    return a + "\n\nCPU, % of one core:\n\n" + b


def latency_table(direct: list[Window], hub: list[Window]) -> str:
    rows = []
    for d, h in ((d, h) for d in direct for h in hub if d.n == h.n == 1 and d.rate == h.rate):
        d50, d99 = percentile(d.latencies, 50), percentile(d.latencies, 99)
        h50, h99 = percentile(h.latencies, 50), percentile(h.latencies, 99)
        rows.append([f"{d.rate:g}", f"{len(d.latencies)} / {len(h.latencies)}", duration(d50), duration(h50),
                     ratio(h50, d50), duration(d99), duration(h99), ratio(h99, d99)])  # fmt: skip
    return table(["Hz", "samples d / p", "p50 direct", "p50 pvhub", "ratio", "p99 direct", "p99 pvhub", "ratio"], rows)


def summary_table(results: dict[str, Any], direct: list[Window], hub: list[Window],
                  rates: tuple[float, ...], fan_out: tuple[int, ...], latency_rate: float) -> str:
    put, read, connect = results["put"], results["read"], results["connect"]
    rows = [
        ["put with completion, median", ratio(put["pvhub"].median, put["ophyd"].median),
         ratio(put["pvhub"].median, put["caproto"].median)],
        ["put with completion, median, vs caproto monitoring the PV too", "",
         ratio(put["pvhub"].median, put["caproto_monitored"].median)],
        ["read, median", ratio(read["pvhub"].median, read["ophyd"].median),
         ratio(read["pvhub"].median, read["caproto"].median)],
        ["first value of a new PV, median", ratio(connect["pvhub"].median, connect["ophyd"].median),
         ratio(connect["pvhub"].median, connect["caproto"].median)],
        ["first value, new client of a served PV, median", "",
         ratio(connect["pvhub_fresh"].median, connect["caproto_fresh"].median)],
    ]  # fmt: skip
    for d, h in _pairs(direct, hub, latency_rate):
        if d.n == max(fan_out):
            rows.append([f"{d.n} subscribers at {d.rate:g} Hz: updates/s received per client", "",
                         ratio(h.received_per_s, d.received_per_s)])  # fmt: skip
            rows.append([f"{d.n} subscribers at {d.rate:g} Hz: CPU of IOC+daemon+actor / IOC", "",
                         ratio(h.ioc_cpu + h.hub_cpu, d.ioc_cpu)])  # fmt: skip
    for d, h in ((d, h) for d in direct for h in hub if d.n == h.n == 1 and d.rate == h.rate == latency_rate):
        rows.append([f"monitor latency at {latency_rate:g} Hz, median", "",
                     ratio(percentile(h.latencies, 50), percentile(d.latencies, 50))])  # fmt: skip
    return table(["what", "pvhub / ophyd", "pvhub / caproto"], rows)
