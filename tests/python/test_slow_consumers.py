"""Many slow consumers and the global buffer budget (issue 9, item 3).

50 raw consumers on one shared upstream connection (one worker, one pool)
consume with unlimited prefetch and then never read again, while the broker
pushes 200 MB at them (4 MB each, from a queue per consumer). No single
client passes client_buffer_limit (16 MiB), so only client_buffer_budget
(32 MiB here) can hold the proxy's memory down:

  * the proxy's RSS must stay within the budget plus a small constant;
  * clients are disconnected as slow consumers (506, counted in
    amqproxy_slow_consumer_disconnects_total), and every disconnected one's
    queue has all its messages ready again (its unacked deliveries went back);
  * a canary on the same upstream connection (confirmed publish + get every
    100 ms) never stalls, and the upstream connection is the same one after;
  * once every consumer is gone, amqproxy_client_buffer_bytes is back to
    what it was before.
"""

import os
import struct
import time

import pika
import pytest

from conftest import BROKER_HOST, BROKER_PORT, USER, PASSWORD, proxy_metrics, unique
from broker import wait_for
import rawamqp
from test_backpressure import BASIC_CONSUME, Canary, RssSampler, SlowClient, proxy_side_states, TCP_ESTABLISHED

CONSUMERS = 50
MSGS_EACH = 40
MSG_SIZE = 100 * 1024          # 50 x 40 x 100 KiB = 200 MiB pushed in all
BUDGET = 32 * 1024 * 1024
RSS_SLACK = 16 * 1024 * 1024   # the proxy's own working memory, allocator slack
SLOW_RCVBUF = 4096
CANARY_MAX_LATENCY = 2.0
SETTLE_DEADLINE = 60.0

SLOW = "amqproxy_slow_consumer_disconnects_total"
BUF = "amqproxy_client_buffer_bytes"


def _m(p, name):
    return proxy_metrics(p).get(name, 0.0)


@pytest.mark.proxy_only
@pytest.mark.timeout_s(240)
def test_fifty_slow_consumers_stay_within_the_buffer_budget(start_proxy, broker):
    p = start_proxy("--workers", "1", "--client-buffer-budget", str(BUDGET))
    pid = p.proc.pid
    prefix = unique("amqproxy-test-slow50")
    queues = ["%s-%02d" % (prefix, i) for i in range(CONSUMERS)]
    canary_q = unique("amqproxy-test-canary")

    direct = pika.BlockingConnection(pika.ConnectionParameters(
        host=BROKER_HOST, port=BROKER_PORT, credentials=pika.PlainCredentials(USER, PASSWORD),
        connection_attempts=1, socket_timeout=10, stack_timeout=20))
    dch = direct.channel()
    dch.confirm_delivery()
    payload = os.urandom(MSG_SIZE)
    t = time.monotonic()
    for q in queues:
        dch.queue_declare(q, arguments={"x-expires": 300000})
        for i in range(MSGS_EACH):
            dch.basic_publish("", q, struct.pack(">I", i) + payload[4:])
    fill_s = time.monotonic() - t

    def ready_consumers(q):
        ok = dch.queue_declare(q, passive=True).method
        return ok.message_count, ok.consumer_count

    slow = []
    canary = canary_conn = sampler = None
    try:
        canary_conn = p.connect()
        canary = Canary(canary_conn, canary_q)
        for _ in queues:
            c = SlowClient(p.host, p.port, SLOW_RCVBUF)
            c.handshake(USER, PASSWORD)
            c.channel_open(1)
            slow.append(c)
        upstream = broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1,
                                     desc="one upstream connection shared by all 51 clients")
        canary.start()
        wait_for(lambda: len(canary.rounds) >= 3 or canary.error is not None, 10,
                 desc="canary running")
        assert canary.error is None, canary.error
        buf_before = _m(p, BUF)
        slow_before = _m(p, SLOW)

        sampler = RssSampler(pid)
        sampler.start()
        wait_for(lambda: len(sampler.samples) >= 20, 5, interval=0.01, desc="RSS samples")
        rss_before = max(r for _t, r in sampler.samples)

        t_consume = time.monotonic()
        for c, q in zip(slow, queues):
            # Basic.Consume (no_ack=0, no Basic.Qos: unlimited prefetch), and
            # no read ever after, not even of ConsumeOk: a client that is
            # already past the budget may be cut off before it would see it.
            c.send(rawamqp.method_frame(1, BASIC_CONSUME, struct.pack(">H", 0) + rawamqp.shortstr(q)
                                        + rawamqp.shortstr("slow") + b"\x00" + rawamqp.table({})))
        ports = [c.sock.getsockname()[1] for c in slow]

        # The proxy must get its memory under the budget by disconnecting
        # slow consumers; settle = nothing in flight any more: every queue
        # either has its consumer or has all its messages back.
        def settled():
            if canary.error is not None or canary.in_flight_for() > CANARY_MAX_LATENCY:
                return True
            states = [ready_consumers(q) for q in queues]
            gone = [s for s in states if s[1] == 0]
            return gone and all(s == (MSGS_EACH, 0) for s in gone) and _m(p, SLOW) - slow_before >= len(gone)

        canary_stall = 0.0
        deadline = time.monotonic() + SETTLE_DEADLINE
        while time.monotonic() < deadline:
            canary_stall = max(canary_stall, canary.in_flight_for())
            if settled():
                break
            time.sleep(0.1)
        # keep the canary and the RSS sampler going for at least 3 s of load
        while time.monotonic() - t_consume < 3:
            canary_stall = max(canary_stall, canary.in_flight_for())
            time.sleep(0.05)
        canary_stall = max(canary_stall, canary.in_flight_for())
        sampler.stop_evt.set()
        sampler.join(timeout=5)
        rss_max = sampler.max_since(t_consume)

        states = {q: ready_consumers(q) for q in queues}
        gone = [q for q, s in states.items() if s[1] == 0]
        still = [q for q, s in states.items() if s[1] == 1]
        disconnected = _m(p, SLOW) - slow_before
        buffered = _m(p, BUF)
        report = ("fill %.1fs; RSS before %.1f MiB, max %.1f MiB (+%.1f MiB; budget %d MiB + slack %d MiB); "
                  "%d of %d consumers disconnected as slow (%d counted), %d still connected; "
                  "client buffers now %.1f MiB; canary %d rounds, max latency %.3fs"
                  % (fill_s, rss_before / 2**20, rss_max / 2**20, (rss_max - rss_before) / 2**20,
                     BUDGET >> 20, RSS_SLACK >> 20, len(gone), CONSUMERS, disconnected, len(still),
                     buffered / 2**20, len(canary.rounds),
                     max([dt for _t, dt in canary.rounds] + [canary_stall])))
        print("\n" + report)

        assert canary.error is None, "canary failed: %r\n%s" % (canary.error, report)
        assert canary_stall <= CANARY_MAX_LATENCY and \
            max(dt for _t, dt in canary.rounds) <= CANARY_MAX_LATENCY, "shared upstream stalled\n" + report
        assert rss_max - rss_before <= BUDGET + RSS_SLACK, "RSS past the budget\n" + report
        # 200 MiB cannot fit in 32 MiB plus what 50 small sockets hold: most
        # consumers had to go, and each one that went is counted
        assert len(gone) >= CONSUMERS // 2, report
        assert disconnected == len(gone), report
        assert buffered <= BUDGET, report
        for q in gone:
            assert states[q] == (MSGS_EACH, 0), "unacked deliveries of %s not requeued: %r" % (q, states[q])
        # the slow ones' sockets are closed by the proxy although they never read
        closed = [port for port in ports if TCP_ESTABLISHED not in proxy_side_states(p.port, port)]
        assert len(closed) >= len(gone), (len(closed), len(gone), report)
        assert [c["name"] for c in broker.named(p.upstream_prefix())] == [c["name"] for c in upstream]

        # everyone else leaves: every buffer byte is given back
        for c in slow:
            c.abort()
        slow = []
        wait_for(lambda: _m(p, BUF) <= buf_before and _m(p, "amqproxy_client_connections") == 1,
                 10, desc="client buffers back to %d bytes" % buf_before)
        for q in queues:
            wait_for(lambda: ready_consumers(q) == (MSGS_EACH, 0), 10, desc="%s requeued" % q)
    finally:
        if sampler is not None:
            sampler.stop_evt.set()
        if canary is not None:
            canary.stop_evt.set()
            canary.join(timeout=5)
        for c in slow:
            c.abort()
        if canary_conn is not None and canary_conn.is_open:
            try:
                canary_conn.channel().queue_delete(canary_q)
                canary_conn.close()
            except Exception:
                pass
        try:
            for q in queues:
                dch.queue_delete(q)
            direct.close()
        except Exception:
            pass
