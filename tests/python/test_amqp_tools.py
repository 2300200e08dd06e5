"""librabbitmq's command-line tools (Debian package amqp-tools) through the proxy."""

import os
import shutil
import subprocess

import pytest

from broker import wait_for
from conftest import unique


def run(tool, *args, input=None):
    exe = shutil.which(tool)
    assert exe, "%s not installed (apt-get install amqp-tools)" % tool
    r = subprocess.run([exe, *args], input=input, capture_output=True, timeout=60)
    assert r.returncode == 0, "%s %s exited %d: %s" % (tool, " ".join(args), r.returncode, r.stderr[-2000:])
    return r.stdout


def test_amqp_tools_declare_publish_get_consume(proxy, conn):
    url = proxy.url
    q = unique()
    try:
        out = run("amqp-declare-queue", "--url", url, "-q", q)
        assert out.strip() == q.encode()
        body1 = os.urandom(10000) + b"\x00end"
        body2 = b"second message"
        run("amqp-publish", "--url", url, "-r", q, "-C", "application/octet-stream", input=body1)
        run("amqp-publish", "--url", url, "-r", q, "-b", body2.decode())
        # amqp-publish has no confirms: wait until both are in the queue
        ch = conn.channel()
        wait_for(lambda: ch.queue_declare(q, passive=True).method.message_count == 2,
                 timeout=10, desc="2 messages in %s" % q)
        # Two publisher processes may ride two workers' upstream
        # connections; AMQP orders nothing across connections.
        got = run("amqp-get", "--url", url, "-q", q)
        # amqp-consume runs the command once per message with the body on stdin
        consumed = run("amqp-consume", "--url", url, "-q", q, "-c", "1", "cat")
        assert sorted([got, consumed]) == sorted([body1, body2])
        assert ch.queue_declare(q, passive=True).method.message_count == 0
        run("amqp-delete-queue", "--url", url, "-q", q)
    finally:
        if conn.is_open:
            try:
                conn.channel().queue_delete(q)
            except Exception:
                pass
