"""``python -m bench fanout``, ``throughput`` and ``waveform``: monitors to many processes.

All three use the rsrv IOC (EPICS base's C server: caproto's server batches monitors above
about 100 Hz, with up to 1 s of latency) and ``fanout.py``'s subscriber processes and
measurement windows.

- fanout: ``fast`` counting at 1 kHz to 100 pvhub subscribers and at 5 kHz to 10: what was
  lost (by the counter's values, and by the actor's sequence numbers), latency from the IOC's
  timestamp to the callback.
- throughput: steps of (subscribers, rate of ``fast``), each subscriber also watching many
  PVs that count once a second; the most readings per second delivered, all subscribers
  together, in a step that lost nothing.
- waveform: ``big`` (1 MiB) at 10 Hz to 10 subscribers, through pvhub and straight from the
  IOC with caproto's client: MB/s delivered.

Rule 1: one set of subscribers at a time; each set is closed (and its processes checked)
before the next starts, so that the windows do not share the machine with stale clients.
Rule 2: the counting PV is paused between windows, so that subscribers start on a quiet IOC.
"""

from __future__ import annotations

import time
from typing import Any

from fanout import IOCControl, Subscribers, Window, measure
from stats import percentile

MIB = 1024 * 1024
# Direct caproto subscribers in the fan-out reference: 20 at 1 kHz already take most of two
# cores; 100 stop answering the benchmark at all.
MAX_DIRECT = 20


def _windows(bench: Any, control: IOCControl, mode: str, pv: str, n: int, rates: list[float],
             env: dict[str, str], hub_pids, extra: tuple[str, int] | None = None,
             stop_at_loss: bool = False) -> list[Window]:  # fmt: skip
    plan = bench.plan
    windows: list[Window] = []
    control.set_rate(0)
    with open(bench.logdir / f"subscribers-{mode}.log", "a") as stderr:
        subscribers = Subscribers(mode, pv, n, env, stderr, extra=extra)
        bench.started.update(subscribers.pids)
        hz = 0.0
        try:
            subscribers.wait_ready()
            for hz in rates:
                control.set_rate(hz)
                time.sleep(plan.settle)
                window = measure(subscribers, control, hub_pids(), hz, plan.window, plan.tail)
                windows.append(window)
                bench.step(
                    f"   {n} {mode} subscriber(s) at {hz:g} Hz: {window.received_per_s:,.0f} "
                    f"updates/s each, {window.lost_percent:.2f} % lost, "
                    f"{window.delivered_per_s:,.0f} readings/s in all"
                )
                if stop_at_loss and not lossless(window):
                    break
        finally:
            subscribers.close()
            control.quiet(after=f"{n} {mode} subscribers at {hz:g} Hz")
    return windows


def lossless(window: Window) -> bool:
    seq = window.seq_missed_percent
    return window.lost_percent == 0 and window.extra_lost == 0 and (seq != seq or seq == 0)


def fanout(bench: Any, ioc: Any, address: str, env: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """pvhub's subscribers, then direct caproto monitors (the reference: the same machine, IOC
    and rate, without pvhub; at most ``MAX_DIRECT`` of them, as more swamp two cores and stop
    answering), each set alone (Rule 1)."""
    control = IOCControl(ioc, monitors=None)
    bench.controls.append(control)
    pairs: list[tuple[Window, Window | None]] = []
    for rate, n in bench.plan.fanout:
        bench.step(f"fanout: {n} pvhub subscribers, fast at {rate:g} Hz")
        (hub,) = _windows(bench, control, "pvhub", ioc.pv("fast"), n, [rate],
                          {**env, "PVHUB_ADDRESS": address}, bench.hub_pids)  # fmt: skip
        direct_n = min(n, MAX_DIRECT)
        bench.step(f"fanout: {direct_n} direct caproto subscribers, fast at {rate:g} Hz")
        try:
            (direct,) = _windows(bench, control, "caproto", ioc.pv("fast"), direct_n, [rate], env, lambda: [])
        except (TimeoutError, RuntimeError) as exc:  # swamped: the rows say so
            bench.step(f"   direct caproto subscribers: {exc}")
            direct = None
        pairs.append((hub, direct))
    rows = []
    for w, d in pairs:
        label = f"{w.n} subscribers at {w.rate:g} Hz (IOC made {w.ioc_rate:,.0f}/s)"
        p99 = percentile(w.latencies, 99)
        ref99 = percentile(d.latencies, 99) if d is not None and d.latencies else None
        ref_is = f"{d.n if d else min(w.n, MAX_DIRECT)} caproto direct" + ("" if d else ": no answer")
        rows += [
            {"part": "fanout", "what": f"{label}: lost, by the counter's values", "pvhub": w.lost_percent,
             "reference": d.lost_percent if d else None, "reference_is": ref_is, "unit": "%", "target": "0",
             "pass": w.lost_percent == 0},
            {"part": "fanout", "what": f"{label}: lost between actor and clients, by seq",
             "pvhub": w.seq_missed_percent, "unit": "%", "target": "0", "pass": w.seq_missed_percent == 0},
            {"part": "fanout", "what": f"{label}: latency IOC timestamp to callback, p99",
             "pvhub": p99, "p50": percentile(w.latencies, 50), "reference": ref99,
             "reference_is": ref_is, "ratio": p99 / ref99 if ref99 else None, "unit": "s",
             "target": "< 10 ms", "pass": p99 < 0.010},
            {"part": "fanout", "what": f"{label}: CPU of IOC / daemon+actors / one client",
             "pvhub": w.hub_cpu, "text": f"{w.ioc_cpu:.0f} / {w.hub_cpu:.0f} / {w.clients_cpu:.1f} % of a core"
             + (f" (direct: {d.ioc_cpu:.0f} / - / {d.clients_cpu:.1f})" if d else ""),
             "unit": "%", "target": "", "pass": None},
        ]  # fmt: skip
    return rows, [w.summary() for pair in pairs for w in pair if w is not None]


def throughput(bench: Any, ioc: Any, address: str, env: dict[str, str]) -> tuple[list[dict], list[dict]]:
    plan = bench.plan
    control = IOCControl(ioc, monitors=None)
    bench.controls.append(control)
    extra = (ioc.pv("scale:c"), bench.extra_pvs) if bench.extra_pvs else None
    windows: list[Window] = []
    for n, rates in plan.throughput:
        bench.step(f"throughput: {n} pvhub subscribers on fast"
                   + (f" and {extra[1]} PVs at 1 Hz each" if extra else ""))  # fmt: skip
        found = _windows(bench, control, "pvhub", ioc.pv("fast"), n, list(rates),
                         {**env, "PVHUB_ADDRESS": address}, bench.hub_pids, extra, stop_at_loss=True)  # fmt: skip
        windows += found  # a loss ends this number of subscribers' ramp, not the next one's
    clean = [w for w in windows if lossless(w)]
    best = max(clean, key=lambda w: w.delivered_per_s, default=None)
    first_loss = next((w for w in windows if not lossless(w)), None)
    value = best.delivered_per_s if best else 0.0
    text = (f"{value:,.0f}/s ({best.n} clients, fast at {best.rate:g} Hz"
            + (f", +{bench.extra_pvs} PVs each" if bench.extra_pvs else "") + ")") if best else "none lossless"
    if first_loss is None and best is not None:
        text += "; no step lost anything: the ramp ended first"
    if first_loss is not None:
        text += (f"; first loss at {first_loss.delivered_per_s:,.0f}/s ({first_loss.n} clients, "
                 f"{first_loss.rate:g} Hz: {first_loss.lost_percent:.2f} % of fast lost)")
    rows = [{"part": "throughput", "what": "readings/s delivered with no loss, all clients together",
             "pvhub": value, "text": text, "unit": "/s", "target": ">= 200,000/s", "pass": value >= 200_000}]
    return rows, [w.summary() for w in windows]  # fmt: skip


def waveform(bench: Any, ioc: Any, address: str, env: dict[str, str]) -> tuple[list[dict], list[dict]]:
    plan = bench.plan
    control = IOCControl(ioc, counter="big", rate="big_rate", monitors=None)
    bench.controls.append(control)
    result: dict[str, Window] = {}
    for mode, mode_env in (("caproto", env), ("pvhub", {**env, "PVHUB_ADDRESS": address})):
        bench.step(f"waveform: {plan.waveform_clients} {mode} subscribers, 1 MiB at {plan.waveform_rate:g} Hz")
        pids = bench.hub_pids if mode == "pvhub" else (lambda: [])
        (result[mode],) = _windows(bench, control, mode, ioc.pv("big"), plan.waveform_clients,
                                   [plan.waveform_rate], mode_env, pids)  # fmt: skip
    hub, direct = result["pvhub"], result["caproto"]

    def mb_s(w: Window) -> float:
        return w.received_per_s * w.n * MIB / 1e6

    rows = [
        {"part": "waveform", "what": f"1 MiB at {plan.waveform_rate:g} Hz to {hub.n} clients: MB/s delivered",
         "pvhub": mb_s(hub), "reference": mb_s(direct), "reference_is": "caproto direct", "unit": "MB/s",
         "ratio": mb_s(hub) / mb_s(direct) if mb_s(direct) else float("nan"),
         "target": "= IOC's rate, no loss", "pass": hub.lost_percent == 0},
        {"part": "waveform", "what": "  lost, by the arrays' count", "pvhub": hub.lost_percent,
         "reference": direct.lost_percent, "reference_is": "caproto direct", "unit": "%", "target": "0",
         "pass": hub.lost_percent == 0},
        {"part": "waveform", "what": "  latency IOC timestamp to callback, p99", "pvhub": percentile(hub.latencies, 99),
         "reference": percentile(direct.latencies, 99), "reference_is": "caproto direct", "unit": "s",
         "target": "", "pass": None},
        {"part": "waveform", "what": "  CPU of daemon+actors", "pvhub": hub.hub_cpu, "unit": "%",
         "text": f"{hub.hub_cpu:.0f} % of a core (IOC {hub.ioc_cpu:.0f} / {direct.ioc_cpu:.0f} % direct)",
         "target": "", "pass": None},
    ]  # fmt: skip
    return rows, [w.summary() for w in (direct, hub)]
