"""A running daemon fuzzed through its request port while a well-behaved client watches.

Rule 1: one daemon and one zoo IOC serve the whole fuzz; hypothesis generates the messages
(msgpack values of any shape, requests with a field changed, dropped or added, raw bytes,
envelopes of several frames) and a bare ``zmq.DEALER`` sends them in batches.
Rule 2: meanwhile a client subscribed to a PV that counts by itself sees every change: the
``seq`` of its updates goes up by one each time, in one ``epoch``, with no gap.
Rule 3: afterwards the daemon still reads, sets and subscribes, no actor restarted, and every
single-frame message was answered: at least once for each id the message carried readably
(a set is answered twice), with id 0 when it carried none.
Rule 4: no PV the fuzz may write changes what the watchers rely on (``fast_rate``, ``dt``),
and the daemon allows only this test's PVs, so made-up names cost it nothing.
Rule 5: the same strategies first fuzz the pure code in process (``decode``, the actor's
value checks), where a failure shrinks to its smallest example in a second.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import msgpack
import pytest
import zmq
from helpers import readings_in, wait_until
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pvhub import protocol as p
from pvhub.arrays import NDARRAY_EXT
from pvhub.actors.coercion import coerce_value
from pvhub.client import EpicsSignal, get_hub
from pvhub.errors import BadValueError, ProtocolError


EXAMPLES = 500
# Each example draws BATCH messages from the strategies, and MUTANTS more from each of them
# with the example's own Random (a byte changed, a cut, a splice, frames added): hypothesis'
# draws cost milliseconds each, these microseconds. At least EXAMPLES * 8 * 4 = 16,000.
BATCH = (8, 10)
MUTANTS = 3
MIN_MESSAGES = 10_000
FAST_RATE = 50.0  # Hz of the counting PV the watchers follow: plenty, and cheap on 2 cores

# PVs the fuzz may name (after the prefix); ``fast`` and its rate are the watchers'.
FUZZ_PVS = ["motor", "count", "wave", "text", "mode", "ro", "reject", "chars", "x", "nothere"]
OPS = ["hello", "read", "describe", "set", "status", "ping"]

# --- strategies -------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50),
    # msgpack's own timestamp extension (-1), which unpackb turns into a Timestamp itself.
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)
DTYPES = ["<f8", ">f8", "<i4", "|u1", "|b1", "<c16", "<U2", "|S3", "|O", "|V8", "<M8[s]", "f8,i4", "(2,)f8",
          "S0", "a", "", "nonsense", "<f8" * 20]


@st.composite
def arrays(draw) -> msgpack.ExtType:
    """An ndarray ext, often malformed: any dtype string, any shape, any bytes."""
    dtype = draw(st.sampled_from(DTYPES) | st.text(max_size=8))
    shape = draw(st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4) | st.just([]) | scalars)
    data = draw(st.binary(max_size=64))
    header = msgpack.packb([dtype, shape]) if draw(st.booleans()) else draw(st.binary(max_size=8))
    code = draw(st.sampled_from([NDARRAY_EXT, NDARRAY_EXT, 0, 2, 42, 127]))
    return msgpack.ExtType(code, header + data)


values = st.recursive(
    scalars | arrays(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), children, max_size=5),
    max_leaves=12,
)


@st.composite
def requests(draw, prefix: str) -> dict:
    """A request as a client would send it, then perhaps broken: a field changed, dropped or
    added, the version or the operation changed."""
    # Choices by a Random hypothesis seeds: spread evenly (hypothesis' own draws favour the
    # first of each list, and hello would be most of the fuzz).
    rng = draw(st.randoms(use_true_random=False))
    op = rng.choice(OPS)
    body: dict = {"v": p.PROTOCOL_VERSION, "op": op, "id": draw(st.integers(min_value=1, max_value=2**31))}
    pv = rng.choice([prefix + name for name in FUZZ_PVS] + ["elsewhere:pv", prefix])
    if op in ("read", "describe", "set"):
        body["pv"] = pv
    if op == "read":
        body["publish"] = draw(st.booleans())
        body["fresh"] = draw(st.booleans())
    if op == "set":
        # A value some PV takes (a put goes through to the IOC), or anything at all.
        body["value"] = (rng.choice([rng.uniform(-5, 5), rng.randrange(-3, 4), "On", "1.5"]) if rng.random() < 0.4
                         else draw(values))
    if op == "hello":
        body["client"] = draw(st.text(max_size=20))
    if op == "ping" and draw(st.booleans()):
        body["pvs"] = draw(st.lists(st.sampled_from([prefix + name for name in FUZZ_PVS]), max_size=4))
    mutation = rng.choice(["none", "none", "none", "drop", "change", "add", "version", "op"])
    if mutation == "drop":
        del body[rng.choice(sorted(body))]
    elif mutation == "change":
        body[rng.choice(sorted(body))] = draw(values)
    elif mutation == "add":
        body[draw(st.text(max_size=10))] = draw(values)
    elif mutation == "version":
        body["v"] = draw(st.integers(min_value=-(2**63), max_value=2**64 - 1))
    elif mutation == "op":
        body["op"] = draw(st.sampled_from(sorted(p.MESSAGES)) | st.text(max_size=12))
    return body


@st.composite
def deep(draw) -> bytes:
    """A request whose value nests deeper than msgpack's own packer goes (by hand)."""
    # Near the limit, or far past it.
    depth = draw(st.integers(min_value=2, max_value=40) | st.integers(min_value=2, max_value=3000))
    head = msgpack.packb({"v": p.PROTOCOL_VERSION, "op": "set", "id": draw(st.integers(1, 2**31)), "pv": "X:a", "value": "VALUE"})
    return head.replace(msgpack.packb("VALUE"), draw(st.sampled_from([b"\x91", b"\x81\x00"])) * depth + b"\x01")


def packed(value) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):  # deeper or larger than the packer goes
        return b"\xc1"


def messages(prefix: str) -> st.SearchStrategy[list[bytes]]:
    """What a fuzz sends at once: a list of frames (one frame is an ordinary message)."""
    request = requests(prefix).map(packed)
    one = st.one_of(
        request,  # weighted: requests reach furthest (the router, the actors, the IOC)
        request,
        request,
        request,
        values.map(packed),
        st.dictionaries(st.sampled_from(["v", "op", "id", "pv", "value", "pvs", "client"]), values,
                        max_size=6).map(packed),
        st.binary(max_size=200),
        deep(),
    )
    several = st.lists(one | st.binary(max_size=20), min_size=2, max_size=5)
    return st.one_of(one.map(lambda frame: [frame]), one.map(lambda frame: [frame]), several)


def mutants(frame: bytes, rng: random.Random, count: int) -> list[list[bytes]]:
    """``count`` envelopes made from ``frame`` by hand: bytes changed, cut, spliced, or extra
    frames added (what a flaky link or a careless peer does to a good message)."""
    made = []
    for _ in range(count):
        data = bytearray(frame)
        kind = rng.randrange(5)
        if kind == 0 and data:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            del data[rng.randrange(len(data) + 1):]
        elif kind == 2 and data:
            at = rng.randrange(len(data))
            data[at:at] = data[rng.randrange(len(data)):][: rng.randrange(1, 16)]
        elif kind == 3:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            made.append([bytes(data)] + [bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
                                         for _ in range(rng.randrange(1, 4))])
            continue
        made.append([bytes(data)])
    return made


def readable_id(frame: bytes) -> int:
    """The id the daemon can answer a single-frame message with (0 when none is readable)."""
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:  # anything msgpack cannot read carries no id
        return 0
    if isinstance(body, dict) and type(body.get("id")) is int:
        return body["id"]
    return 0


# --- the pure code, in process (Rule 5) --------------------------------------------------------

PV_KINDS = [{"native_type": kind, "count": count, "enum_strs": ["Off", "On"]}
            for kind in ("float", "int", "char", "enum", "string") for count in (1, 4, 40)]


@pytest.mark.timeout(120)
@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(messages("X:"), st.randoms(use_true_random=False))
def test_decode_gives_a_message_or_a_protocol_error_and_the_message_travels_back(frames, rng):
    for derived in [frames, *mutants(frames[0], rng, 5)]:
        try:
            message = p.decode(derived[0])
        except ProtocolError:
            continue
        # What the daemon does with what it decoded: show it, and send it on.
        repr(message)
        p.decode(p.encode(message))


@pytest.mark.timeout(120)
@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(values | st.lists(st.floats() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5), max_size=50))
def test_a_put_value_is_coerced_or_a_bad_value_for_every_kind_of_pv(value):
    try:  # as the actor gets it: through the wire
        value = p.decode(packed({"v": p.PROTOCOL_VERSION, "op": "set", "id": 1, "pv": "X:a", "value": value})).value
    except ProtocolError:
        return
    for metadata in PV_KINDS:
        try:
            coerce_value(value, metadata)
        except BadValueError:
            pass


# --- the watchers -------------------------------------------------------------------------------


class SeqWatcher:
    """A raw SUB on one PV's topic that checks every update (Rule 2), on its own thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, pv: str) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # never drop here: a drop would look like a loss
        self.sock.connect(endpoint)
        self.sock.setsockopt(zmq.SUBSCRIBE, p.topic(pv))
        self.updates = 0
        self.values: list = []  # of the changes (not the snapshots)
        self.problems: list[str] = []
        self.epoch: int | None = None
        self.seq: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seq-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            _, *payloads = self.sock.recv_multipart()  # one or more updates of one PV
            for update in readings_in(payloads):
                self._check(update)

    def _check(self, update: p.Message) -> None:
        if not isinstance(update, p.Update):
            self.problems.append(f"not an update: {update!r}")
            return
        if self.epoch is not None and update.epoch != self.epoch:
            self.problems.append(f"epoch {self.epoch} -> {update.epoch}: the actor restarted")
        if self.seq is not None:
            expected = self.seq if update.snapshot else self.seq + 1
            if update.seq != expected:
                self.problems.append(f"seq {self.seq} -> {update.seq} (snapshot={update.snapshot})")
        self.epoch, self.seq = update.epoch, update.seq
        self.updates += 1
        if not update.snapshot and update.reading is not None:
            self.values.append(update.reading.value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.mark.system
@pytest.mark.timeout(300)
def test_a_fuzzed_daemon_answers_everything_loses_nothing_and_goes_on(
    zoo_ioc, hub_factory, prefix, tmp_path, monkeypatch
):
    config = tmp_path / "pvhub.toml"
    config.write_text(f'[pvs]\nallow = ["{prefix}*"]\n')
    daemon = hub_factory(zoo_ioc, args=["--config", str(config)])
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)

    # The well-behaved client: a Signal subscribed to a PV that counts by itself.
    rate = EpicsSignal(f"{prefix}fast_rate", name="rate")
    rate.wait_for_connection(timeout=20)
    rate.set(FAST_RATE).wait(10)
    fast = EpicsSignal(f"{prefix}fast", name="fast")
    fast.wait_for_connection(timeout=20)
    seen: list[int] = []
    fast.subscribe(lambda value, **kwargs: seen.append(value), run=False)
    hub = get_hub()
    status = hub.call(lambda i: p.StatusRequest(id=i), timeout=10).status
    readings = status["readings"]
    ctx = zmq.Context()
    watcher = SeqWatcher(ctx, readings, f"{prefix}fast")
    fuzzer = ctx.socket(zmq.DEALER)
    fuzzer.setsockopt(zmq.LINGER, 0)
    fuzzer.connect(daemon.address)

    expected: Counter[int] = Counter()  # readable id -> how many messages carried it
    answered: Counter[int] = Counter()  # id -> how many replies came with it
    kinds: Counter[str] = Counter()  # reply op, or error code: how deep the fuzz reached
    sent = {"messages": 0, "single": 0, "multi": 0}

    def decode_reply(payload: bytes) -> p.Message:
        # A message in an older version is refused in that version, so that its sender can
        # read why: an ErrorReply whose fields ours has too.
        body = msgpack.unpackb(payload)
        if body.get("v") != p.PROTOCOL_VERSION:
            assert 1 <= body["v"] < p.PROTOCOL_VERSION and body["code"] == "unsupported_version", body
            body["v"] = p.PROTOCOL_VERSION
            payload = msgpack.packb(body)
        return p.decode(payload)

    def drain(wait_ms: int = 0) -> None:
        while fuzzer.poll(wait_ms):
            for _ in range(10_000):
                try:
                    reply = decode_reply(fuzzer.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                answered[getattr(reply, "id", 0)] += 1
                kinds[reply.code if isinstance(reply, p.ErrorReply) else reply.OP] += 1
            wait_ms = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # a daemon that failed is not worth shrinking against
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(messages(prefix), min_size=BATCH[0], max_size=BATCH[1]), st.randoms(use_true_random=False))
    def fuzz(drawn: list[list[bytes]], rng: random.Random) -> None:
        batch = [derived for frames in drawn for derived in [frames, *mutants(frames[0], rng, MUTANTS)]]
        for frames in batch:
            fuzzer.send_multipart(frames)
            sent["messages"] += 1
            if len(frames) == 1:
                sent["single"] += 1
                expected[readable_id(frames[0])] += 1
            else:
                sent["multi"] += 1
        drain()
        assert daemon.process.poll() is None, "the daemon died"

    try:
        wait_until(lambda: watcher.updates >= 3 and len(seen) >= 3, timeout=20, message="no updates of fast")
        actors = hub.call(lambda i: p.StatusRequest(id=i), timeout=10).status["actors"]
        pids_before = {a["actor"]: a["pid"] for a in actors}
        started = time.monotonic()
        fuzz()
        fuzz_seconds = time.monotonic() - started

        # Rule 3: every single-frame message answered, with its id when it had one.
        def all_answered() -> bool:
            drain(100)
            return all(answered[i] >= n for i, n in expected.items())

        def unanswered() -> str:
            return f"unanswered ids: {[(i, n - answered[i]) for i, n in expected.items() if answered[i] < n][:20]}"

        wait_until(all_answered, timeout=60, interval=0, message=unanswered)
        assert sum(answered.values()) >= sent["single"]
        assert sent["messages"] >= MIN_MESSAGES, sent
        # Every layer was reached: decode's refusals, the router's, and good replies of each
        # kind (the actors' refusals come too, but too few to count on: test_bad_input has them).
        reached = {"bad_message", "unsupported_version", "unknown_operation", "pv_not_allowed",
                   "hello_reply", "snapshot", "describe_reply", "set_accepted", "set_done", "status_reply", "pong"}
        assert reached <= set(kinds), kinds

        # Rule 2: the watchers saw every change, in one epoch.
        updates_before = watcher.updates
        wait_until(lambda: watcher.updates > updates_before + 3, timeout=20, message="updates stopped")
        assert watcher.problems == []
        # It watched throughout (the IOC's rate sags on a loaded machine: a fifth will do).
        assert watcher.updates > FAST_RATE * fuzz_seconds * 0.2, (watcher.updates, fuzz_seconds)
        assert fast.update_gaps == 0 and fast.missed_updates == 0
        assert hub.losses == 0
        # The Signal saw every value the raw watcher saw while both were subscribed, in order.
        # (Values may skip: the IOC's monitor may merge changes before they reach pvhub.)
        assert seen == sorted(seen), "the Signal's values went back"
        low, high = max(seen[0], watcher.values[0]), min(seen[-1], watcher.values[-1])
        both = [v for v in watcher.values if low <= v <= high]
        assert len(both) > 10 and set(both) <= set(seen), "the Signal missed values the watcher saw"

        # Still reads, sets (round trip) and subscribes.
        motor = EpicsSignal(f"{prefix}motor", name="motor")
        motor.wait_for_connection(timeout=20)
        motor.set(4.25).wait(10)
        assert motor.get() == 4.25
        count = EpicsSignal(f"{prefix}count", name="count")
        count.wait_for_connection(timeout=20)
        counted: list[int] = []
        count.subscribe(lambda value, **kwargs: counted.append(value), run=False)
        count.set(1234).wait(10)
        wait_until(lambda: 1234 in counted, timeout=10, message="a new subscription got nothing")

        # No actor restarted (Rule 3).
        actors = hub.call(lambda i: p.StatusRequest(id=i), timeout=10).status["actors"]
        assert all(a["restarts"] == 0 for a in actors), actors
        assert all(pids_before.get(a["actor"], a["pid"]) == a["pid"] for a in actors), (pids_before, actors)
        assert daemon.process.poll() is None
    finally:
        watcher.stop()
        fuzzer.close()
        ctx.term()
    print(f"fuzz: {sent} in {fuzz_seconds:.1f} s, {sum(answered.values())} answers "
          f"({sum(n for i, n in expected.items() if i)} messages with an id), {watcher.updates} updates watched; "
          f"answers: {dict(kinds.most_common())}")
