"""The broker-side helpers the proxy tests count and kill connections with.
Checked against connections we make directly, so that a proxy test cannot
pass because a helper silently finds nothing."""

import pika

from broker import wait_for
from conftest import BROKER_HOST, BROKER_PORT, unique


def direct(name):
    return pika.BlockingConnection(pika.ConnectionParameters(
        BROKER_HOST, BROKER_PORT, client_properties={"connection_name": name},
        connection_attempts=1, socket_timeout=10))


def test_named_finds_connections_and_channels(broker):
    prefix = unique("helper-check") + " pool "
    a, b = direct(prefix + "guest@/"), direct(prefix + "other@/")
    try:
        a.channel()
        a.channel()
        b.channel()
        found = wait_for(lambda: (lambda l: l if len(l) == 2 and sum(c["channels"] for c in l) == 3 else None)(broker.named(prefix)),
                         timeout=15, desc="2 connections with 3 channels")
        assert sorted(c["connection_name"] for c in found) == [prefix + "guest@/", prefix + "other@/"]
        assert all(c["user"] == "guest" and c["vhost"] == "/" for c in found)
        assert broker.named(unique("nobody")) == []
    finally:
        a.close()
        b.close()


def test_close_connection_sends_320(broker):
    name = unique("helper-close")
    c = direct(name)
    c.channel()
    target = wait_for(lambda: broker.named(name), timeout=15, desc="the connection")
    broker.close_connection(target[0], "helper test")
    try:
        while True:
            c.process_data_events(time_limit=0.05)
    except pika.exceptions.ConnectionClosedByBroker as e:
        assert e.reply_code == 320 and "helper test" in e.reply_text


def test_temp_user(temp_user, broker):
    user, password = temp_user()
    c = pika.BlockingConnection(pika.ConnectionParameters(
        BROKER_HOST, BROKER_PORT, credentials=pika.PlainCredentials(user, password),
        connection_attempts=1))
    try:
        c.channel()
        found = wait_for(lambda: [x for x in broker.connections() if x["user"] == user],
                         timeout=15, desc="the temp user's connection")
        assert len(found) == 1
    finally:
        c.close()
