"""Capability filtering (issue 3 items 4 and 6; REQUIREMENTS "Frames in
flight"): the proxy advertises every capability upstream on behalf of all its
clients, so it must not pass on frames a client did not ask for:
Connection.Blocked/Unblocked only to clients that advertised
`connection.blocked`, a broker-initiated Basic.Cancel only to clients that
advertised `consumer_cancel_notify`.

Both tests run the canary (conftest.Canary) on the same upstream connection.
The Blocked test raises a memory alarm on the whole broker, so it is marked
serial: tests/run runs it alone, after the parallel tests.
"""

import json
import time

import pytest

import rawamqp
from rawamqp import (BASIC_CANCEL, BASIC_CANCEL_OK, BASIC_CONSUME_OK, CONNECTION_BLOCKED,
                     CONNECTION_UNBLOCKED, RawClient, basic_consume_frame, method_frame, shortstr)
from broker import wait_for
from conftest import PASSWORD, USER, unique

PROXY_FLAGS = ("--workers", "1", "-t", "60")
NO_CAPABILITIES = {"capabilities": {}}


def raw_client(p, client_properties):
    c = RawClient(p.host, p.port)
    c.handshake(USER, PASSWORD, client_properties=client_properties)
    return c


def methods(frames, *class_methods):
    return [f for f in frames if any(rawamqp.is_method(f, cm) for cm in class_methods)]


def wait_for_method(c, class_method, timeout):
    """Read frames until class_method arrives; returns (frame, frames read before it)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no %s within %.0fs; frames: %r" % (class_method, timeout, seen))
        try:
            f = c.read_frame(timeout=remaining)
        except OSError as e:  # socket.timeout, or the peer closed
            raise AssertionError("no %s within %.0fs (%r); frames: %r" % (class_method, timeout, e, seen))
        if rawamqp.is_method(f, class_method):
            return f, seen
        seen.append(f)


# ------------------------------------------------------------------ item 4

def memory_alarm(broker):
    status = json.loads(broker.ctl("status", "--formatter", "json"))
    return "memory" in json.dumps(status.get("alarms"))


@pytest.mark.serial
@pytest.mark.timeout_s(90)
def test_connection_blocked_only_to_clients_that_asked(start_proxy, canary, broker):
    if broker.backend != "ctl":
        pytest.skip("needs rabbitmqctl to set the memory watermark")
    p = start_proxy(*PROXY_FLAGS)
    can = canary(p)
    setup = p.connect()
    sch = setup.channel()
    q = unique()
    sch.queue_declare(q, arguments={"x-expires": 60000})

    a = raw_client(p, {"capabilities": {"connection.blocked": True}})
    a.channel_open(1)
    b = raw_client(p, NO_CAPABILITIES)
    b.channel_open(1)

    original = broker.memory_watermark()
    if original == ["0.0"]:  # left behind by a run that died: RabbitMQ's default
        original = ["0.4"]
    a_blocked = b_frames = None
    try:
        broker.set_memory_watermark(0)
        wait_for(lambda: memory_alarm(broker), timeout=20, interval=0.5, desc="the memory alarm")
        # RabbitMQ blocks (and notifies) a connection once it publishes
        a.publish(1, "", q, b"published under the alarm")
        a_blocked, a_before = wait_for_method(a, CONNECTION_BLOCKED, timeout=15)
        assert a_blocked.channel == 0
        b_frames, b_eof = rawamqp.drain(b, 1.0)
        assert not b_eof, "client B was disconnected"
    finally:
        broker.set_memory_watermark(*original)
    assert not methods(b_frames, CONNECTION_BLOCKED, CONNECTION_UNBLOCKED), \
        "client B (no connection.blocked capability) got %r" % b_frames
    _unblocked, _seen = wait_for_method(a, CONNECTION_UNBLOCKED, timeout=20)
    b_frames, b_eof = rawamqp.drain(b, 0.5)
    assert not b_eof and not methods(b_frames, CONNECTION_BLOCKED, CONNECTION_UNBLOCKED), b_frames

    # everything carries on: A's message went through, B's connection works
    got = wait_for(lambda: sch.basic_get(q, auto_ack=True)[2], timeout=10, desc="A's message")
    assert got == b"published under the alarm"
    b.channel_open(2)
    a.connection_close()
    b.connection_close()
    sch.queue_delete(q)
    setup.close()
    can.finish(None, tolerate_stall=True)  # it stalls while the broker blocks


# ------------------------------------------------------------------ item 6

def test_broker_cancel_only_to_clients_that_asked(start_proxy, canary):
    p = start_proxy(*PROXY_FLAGS)
    can = canary(p)
    t0 = time.monotonic()
    deleter = p.connect()
    dch = deleter.channel()
    qa, qb = unique(), unique()
    for q in (qa, qb):
        dch.queue_declare(q, arguments={"x-expires": 60000})

    # A: pika advertises consumer_cancel_notify
    a = p.connect()
    ach = a.channel()
    cancelled = []
    ach.add_on_cancel_callback(lambda frame: cancelled.append(frame))
    a_tag = ach.basic_consume(qa, lambda *args: None, auto_ack=True)

    # B: advertises no capabilities at all
    b = raw_client(p, NO_CAPABILITIES)
    b.channel_open(1)
    b.send(basic_consume_frame(1, qb, consumer_tag="b-consumer"))
    b.expect(BASIC_CONSUME_OK, channel=1)

    dch.queue_delete(qa)
    dch.queue_delete(qb)

    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        a.process_data_events(time_limit=0.05)
    assert cancelled, "client A (consumer_cancel_notify) got no Basic.Cancel within 5 s"
    assert cancelled[0].method.consumer_tag == a_tag, cancelled
    assert ach.is_open and a.is_open
    ach.queue_declare(unique(), exclusive=True)  # A's channel still works

    # absence: B must get nothing for ~2 s after the deletion
    frames, eof = rawamqp.drain(b, 2.0)
    assert not eof, "client B was disconnected: %r" % frames
    assert not methods(frames, BASIC_CANCEL), \
        "client B (no consumer_cancel_notify) got a Basic.Cancel: %r" % frames
    assert not [f for f in frames if f.type != rawamqp.FRAME_HEARTBEAT], frames
    # B's channel is still usable: cancelling its (gone) consumer is answered
    b.send(method_frame(1, BASIC_CANCEL, shortstr("b-consumer") + b"\x00"))
    b.expect(BASIC_CANCEL_OK, channel=1)
    b.channel_open(2)
    b.connection_close()
    a.close()
    deleter.close()
    can.finish(t0)
