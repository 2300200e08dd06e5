"""The broker closes the proxy's pooled upstream connection: clients with
channels on it get Connection.Close (320) within 1 s; clients without a
channel on it stay up; the next client gets a fresh upstream connection."""


import time

import pika
import pytest

from broker import wait_for
from conftest import DIRECT, Watcher, unique


@pytest.mark.timeout_s(90)
def test_upstream_closed_by_broker(start_proxy, broker):
    p = start_proxy("--workers", "1", "-t", "60")
    marker = unique("client-a")
    # A: a channel on the pooled connection. In direct mode A *is* the target.
    a = p.connect(client_properties={"connection_name": marker})
    a_ch = a.channel()
    q = unique()
    a_ch.queue_declare(q, arguments={"x-expires": 60000})
    a_ch.confirm_delivery()
    a_ch.basic_publish("", q, b"from A")
    # B: connected (authenticated through the same pool) but no channel
    b = p.connect()

    if DIRECT:
        targets = wait_for(lambda: [c for c in broker.connections() if c["connection_name"] == marker],
                           timeout=15, desc="client A's connection on the broker")
    else:
        targets = broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1, desc="1 upstream connection")
    assert len(targets) == 1, targets
    old = targets[0]

    watcher = Watcher(a)
    watcher.start()
    t_cmd = time.monotonic()
    broker.close_connection(old, "amqproxy test: upstream death")
    t_closed = time.monotonic()  # the broker closed it at some point in [t_cmd, t_closed]
    watcher.join(timeout=10)
    watcher.stop.set()
    assert watcher.closed_at is not None, "client A did not notice the upstream connection closing within 10 s"
    err = watcher.error
    assert isinstance(err, pika.exceptions.ConnectionClosedByBroker), repr(err)
    assert err.reply_code == 320, repr(err)
    assert "amqproxy test: upstream death" in err.reply_text, err.reply_text
    lag = watcher.closed_at - t_closed
    assert lag <= 1.0, "client A was told %.2fs after the close command returned" % lag
    assert watcher.closed_at >= t_cmd

    # B had no channel on it: still connected, and can work now
    b.process_data_events(time_limit=0.2)
    assert b.is_open
    b_ch = b.channel()
    b_ch.basic_publish("", q, b"from B")
    bodies = []
    while True:
        m, _p, body = b_ch.basic_get(q, auto_ack=True)
        if m is None:
            break
        bodies.append(body)
    assert bodies == [b"from A", b"from B"]

    # a new client works and rides a new upstream connection
    c = p.connect()
    c_ch = c.channel()
    c_ch.basic_publish("", q, b"from C")
    assert c_ch.basic_get(q, auto_ack=True)[2] == b"from C"
    if not DIRECT:
        broker.wait_named(p.upstream_prefix(),
                          lambda l: l and old["name"] not in [x["name"] for x in l],
                          desc="a new upstream connection (and the old one gone)")
    c_ch.queue_delete(q)
    c.close()
    b.close()


@pytest.mark.proxy_only
def test_upstream_death_spares_other_pools(start_proxy, broker, temp_user):
    """Closing one pool's upstream connection leaves clients of another pool alone."""
    p = start_proxy("--workers", "1", "-t", "60")
    user, password = temp_user()
    a = p.connect()
    a.channel()
    other = p.connect(user=user, password=password)
    och = other.channel()
    ups = broker.wait_named(p.pool_name(), lambda l: len(l) == 1, desc="1 upstream connection for guest")
    watcher = Watcher(a)
    watcher.start()
    broker.close_connection(ups[0], "only guest's pool")
    watcher.join(timeout=10)
    assert isinstance(watcher.error, pika.exceptions.ConnectionClosedByBroker), repr(watcher.error)
    q = unique()
    och.queue_declare(q, arguments={"x-expires": 60000})
    och.basic_publish("", q, b"other pool")
    assert och.basic_get(q, auto_ack=True)[2] == b"other pool"
    och.queue_delete(q)
    other.close()
