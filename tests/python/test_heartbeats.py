"""Client-side heartbeats (issue 3 item 3; REQUIREMENTS "Client side"): the
proxy honours the interval the client picks in TuneOk, sends a heartbeat
whenever it has sent the client nothing for half the interval (so a client
that only publishes still gets them), counts any frame as a sign of life and
closes a client that missed two intervals.

Three client implementations that check the server's heartbeats: pika (gives
up after interval + 5 s of silence), Ruby bunny (2.2 intervals) and Go
amqp091-go (3 s read deadline with a 2 s interval); and raw sockets for the
exact counts and timings. Each test runs the canary (conftest.Canary) on the
same upstream connection.
"""

import os
import shutil
import subprocess
import time

import pytest

import rawamqp
from rawamqp import FRAME_HEARTBEAT, RawClient
from conftest import PASSWORD, USER, unique

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
GO_PATH = "/usr/share/gocode"
PROXY_FLAGS = ("--workers", "1", "-t", "60")
HEARTBEAT = 2
IDLE = 7


def test_pika_heartbeat_2s_idles_7s(start_proxy, canary):
    p = start_proxy(*PROXY_FLAGS)
    can = canary(p)
    t0 = time.monotonic()
    c = p.connect(heartbeat=HEARTBEAT)
    ch = c.channel()
    q = unique()
    ch.queue_declare(q, arguments={"x-expires": 60000})
    # pika sent 2 in TuneOk and now watches the server's side too
    assert c._impl.params.heartbeat == HEARTBEAT and c._impl._heartbeat_checker is not None
    checker = c._impl._heartbeat_checker
    beats_before = checker._heartbeat_frames_received
    end = time.monotonic() + IDLE
    while time.monotonic() < end:  # nothing but pika's own heartbeats
        c.process_data_events(time_limit=0.2)
    assert c.is_open and ch.is_open, "pika's connection did not survive %d s idle" % IDLE
    # pika only checks the server's side every interval + 5 s (7 s), so also
    # look at what it counted: one heartbeat a second is expected
    beats = checker._heartbeat_frames_received - beats_before
    assert beats >= 3, "pika received %d heartbeats in %d s idle" % (beats, IDLE)
    ch.basic_publish("", q, b"after idle")
    m, _p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"after idle"
    ch.queue_delete(q)
    c.close()
    can.finish(t0)


def _run_ruby(p, tmp_path):
    if not shutil.which("ruby"):
        pytest.skip("ruby-bunny is not installed")
    return ["ruby", os.path.join(TESTS, "ruby", "bunny_heartbeat_idle.rb"), p.host, str(p.port), str(IDLE)], None


def _run_go(p, tmp_path):
    if not shutil.which("go") or not os.path.isdir(os.path.join(GO_PATH, "src/github.com/rabbitmq/amqp091-go")):
        pytest.skip("golang-go / golang-github-rabbitmq-amqp091-go-dev are not installed")
    env = dict(os.environ, GOPATH=GO_PATH, GO111MODULE="off", GOCACHE=str(tmp_path / "gocache"), GOFLAGS="")
    exe = str(tmp_path / "amqp091_heartbeat_idle")
    r = subprocess.run(["go", "build", "-o", exe, os.path.join(TESTS, "go", "amqp091_heartbeat_idle.go")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, "go build failed:\n%s%s" % (r.stdout, r.stderr)
    return [exe, p.host, str(p.port), str(IDLE)], env


@pytest.mark.parametrize("lib", ["ruby-bunny", "go-amqp091"])
def test_other_library_heartbeat_2s_idles_7s(start_proxy, canary, tmp_path, lib):
    p = start_proxy(*PROXY_FLAGS)
    cmd, env = (_run_ruby if lib == "ruby-bunny" else _run_go)(p, tmp_path)
    can = canary(p)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "heartbeat ok" in r.stdout, \
        "%s failed (%d):\n%s\n%s" % (lib, r.returncode, r.stdout, r.stderr)
    can.finish(t0)


def test_publish_only_client_gets_heartbeats(start_proxy, canary):
    """A client that only sends (a publish every 100 ms) and never reads: the
    proxy still sends it heartbeats, since it sends it nothing else."""
    p = start_proxy(*PROXY_FLAGS)
    can = canary(p)
    t0 = time.monotonic()
    c = RawClient(p.host, p.port)
    c.handshake(USER, PASSWORD, heartbeat=HEARTBEAT)
    c.channel_open(1)
    rk = unique("nowhere")  # unroutable: the broker drops them
    end = time.monotonic() + IDLE
    n = 0
    while time.monotonic() < end:
        c.publish(1, "", rk, b"publish-only %d" % n)
        n += 1
        time.sleep(0.1)
    frames, eof = rawamqp.drain(c, 0.5)
    beats = [f for f in frames if f.type == FRAME_HEARTBEAT]
    others = [f for f in frames if f.type != FRAME_HEARTBEAT]
    assert not eof, "the proxy closed a client that published every 100 ms: %r" % frames
    assert not others, "unexpected frames: %r" % others
    assert len(beats) >= 3, "%d heartbeat frames in %d s with heartbeat %d s (want >= 3)" \
        % (len(beats), IDLE, HEARTBEAT)
    assert all(f.channel == 0 and f.payload == b"" for f in beats), beats
    c.connection_close()
    can.finish(t0)


def test_silent_client_closed_after_two_missed_intervals(start_proxy, canary):
    """A client that negotiates 2 s and then sends nothing at all (not even
    heartbeats) is closed after two missed intervals: not before 3.5 s, and
    within 7 s."""
    p = start_proxy(*PROXY_FLAGS)
    can = canary(p)
    t0 = time.monotonic()
    c = RawClient(p.host, p.port)
    c.handshake(USER, PASSWORD, heartbeat=HEARTBEAT)
    silent_since = time.monotonic()  # Connection.Open was its last frame
    frames, eof = rawamqp.drain(c, 10)
    closed_after = time.monotonic() - silent_since
    c.close()
    assert eof, "the silent client was still connected after 10 s (frames: %r)" % frames
    assert closed_after >= 3.5, "closed after only %.2fs (frames: %r)" % (closed_after, frames)
    assert closed_after <= 7.0, "closed after %.2fs (frames: %r)" % (closed_after, frames)
    # while it lived, the proxy kept sending heartbeats
    assert sum(1 for f in frames if f.type == FRAME_HEARTBEAT) >= 2, frames
    can.finish(t0)
