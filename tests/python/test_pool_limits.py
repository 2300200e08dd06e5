"""Idle upstream connections close after idle_connection_timeout;
max_upstream_channels caps the channels per upstream connection."""

import time

import pytest

from broker import wait_for
from conftest import unique


@pytest.mark.proxy_only
def test_idle_upstream_connection_closes(start_proxy, broker):
    p = start_proxy("--workers", "1", "-t", "1")
    c = p.connect()
    ch = c.channel()
    q = unique()
    ch.queue_declare(q, arguments={"x-expires": 60000})
    ch.basic_publish("", q, b"x")
    ups = broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1, desc="1 upstream connection")
    # while a client holds a channel the connection is not idle, whatever -t says
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        c.process_data_events(time_limit=0.25)
    assert [x["name"] for x in broker.named(p.upstream_prefix())] == [ups[0]["name"]], \
        "upstream connection closed while a client had a channel on it"
    ch.queue_delete(q)
    c.close()
    # rabbitmqctl lists connections live; the management API lags up to ~5 s more
    wait_for(lambda: not broker.named(p.upstream_prefix()),
             timeout=10 if broker.backend == "ctl" else 20, interval=0.25,
             desc="the idle upstream connection to close")
    # and the pool opens a new one on demand
    c = p.connect()
    c.channel()
    broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1 and l[0]["name"] != ups[0]["name"],
                      desc="one new upstream connection")
    c.close()


@pytest.mark.proxy_only
@pytest.mark.parametrize("layout", ["one-client-5-channels", "5-clients-1-channel"])
def test_max_upstream_channels(start_proxy, broker, layout):
    p = start_proxy("--max-upstream-channels", "3", "--workers", "1", "-t", "60")
    conns, chans = [], []
    try:
        if layout == "one-client-5-channels":
            c = p.connect()
            conns.append(c)
            chans = [c.channel() for _ in range(5)]
        else:
            for _ in range(5):
                c = p.connect()
                conns.append(c)
                chans.append(c.channel())
        q = unique()
        chans[0].queue_declare(q, arguments={"x-expires": 60000})
        for i, ch in enumerate(chans):  # every channel really works
            ch.confirm_delivery()
            ch.basic_publish("", q, b"%d" % i)
        # 5 channels, at most 3 per upstream connection: exactly 2 connections, 3 + 2
        broker.wait_named(p.upstream_prefix(),
                          lambda l: len(l) == 2 and sorted(x["channels"] for x in l) == [2, 3],
                          desc="2 upstream connections with 3 and 2 channels")
        assert chans[-1].queue_declare(q, passive=True).method.message_count == 5
        chans[-1].queue_delete(q)
    finally:
        for c in conns:
            c.close()
