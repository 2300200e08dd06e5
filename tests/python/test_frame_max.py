"""frame_max: a client that negotiates 4096 while the upstream uses 131072.
Body frames must be split in both directions."""

import hashlib
import os
import time

import pytest

import rawamqp
from conftest import USER, PASSWORD, unique

SMALL = 4096
MIB = 1024 * 1024


def test_pika_frame_max_4096_1mib_roundtrip(proxy):
    conn = proxy.connect(frame_max=SMALL)
    try:
        assert conn._impl.params.frame_max == SMALL  # negotiated, not just asked for
        ch = conn.channel()
        q = unique()
        ch.queue_declare(q, arguments={"x-expires": 60000})
        bodies = [os.urandom(MIB) for _ in range(3)]
        for b in bodies:
            ch.basic_publish("", q, b)
        # Basic.Get path
        for b in bodies[:2]:
            m, _p, got = ch.basic_get(q, auto_ack=True)
            assert m is not None
            assert hashlib.sha256(got).digest() == hashlib.sha256(b).digest() and len(got) == MIB
        # Basic.Deliver path
        got = []
        ch.basic_consume(q, lambda c, m, p, body: got.append(body), auto_ack=True)
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
        assert got and got[0] == bodies[2]
        ch.queue_delete(q)
    finally:
        conn.close()


def test_small_frame_max_client_to_large_frame_max_client(proxy):
    """Published with frame_max 4096, fetched with the default, and back."""
    small = proxy.connect(frame_max=SMALL)
    big = proxy.connect()
    try:
        q = unique()
        sch, bch = small.channel(), big.channel()
        # confirmed publishes: in the queue before the other connection's Basic.Get
        sch.confirm_delivery()
        bch.confirm_delivery()
        sch.queue_declare(q, arguments={"x-expires": 60000})
        up, down = os.urandom(MIB + 17), os.urandom(MIB + 4089)
        sch.basic_publish("", q, up)
        assert bch.basic_get(q, auto_ack=True)[2] == up
        bch.basic_publish("", q, down)
        assert sch.basic_get(q, auto_ack=True)[2] == down
        sch.queue_delete(q)
    finally:
        small.close()
        big.close()


@pytest.mark.parametrize("client_frame_max", [4096, 8192, 131072])
def test_raw_received_frames_respect_negotiated_frame_max(proxy, client_frame_max):
    """pika does not check the size of frames it receives; check on the wire
    that no frame sent to the client exceeds the frame_max it negotiated."""
    c = rawamqp.RawClient(proxy.host, proxy.port, timeout=30)
    try:
        c.handshake(USER, PASSWORD, frame_max=client_frame_max)
        assert c.frame_max == client_frame_max
        c.channel_open(1)
        q = unique()
        c.queue_declare(1, q, arguments={"x-expires": 60000})
        body = os.urandom(MIB)
        c.publish(1, "", q, body)  # split into client_frame_max frames by us
        got = c.basic_get(1, q)
        assert got is not None
        oversize = [f for f in got["frames"] if f.size > client_frame_max]
        assert not oversize, "frames larger than the negotiated frame_max %d: %r" % (client_frame_max, oversize[:3])
        n_body = sum(1 for f in got["frames"] if f.type == rawamqp.FRAME_BODY)
        assert n_body >= MIB // (client_frame_max - 8)
        assert got["body"] == body
        c.connection_close()
    finally:
        c.close()
