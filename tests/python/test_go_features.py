"""The Go client (rabbitmq/amqp091-go, from Debian) through the proxy: the
feature tour of tests/go/amqp091_features.go, one test per step (prefetch
and acks, concurrent consumers, confirms, mandatory returns, consumer
cancel notifications, tx, exchange-to-exchange and headers routing, large
bodies, channel errors, direct reply-to, channel/connection churn,
exclusive queues, clean close, exclusive queues gone when their owner's
Close() returns). Every step must pass through the proxy and against
RabbitMQ itself (AMQPROXY_TEST_DIRECT=1). The program is built once per module and
run with the step number; it prints "ok N ..." and "go features ok"."""

import os
import re
import shutil
import subprocess

import pytest


HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
GO_PATH = "/usr/share/gocode"
SOURCE = os.path.join(TESTS, "go", "amqp091_features.go")

STEPS = [
    (1, "qos-acks"),
    (2, "concurrent-consumers"),
    (3, "confirms"),
    (4, "mandatory-return"),
    (5, "cancel-notify"),
    (6, "tx"),
    (7, "e2e-headers-routing"),
    (8, "large-bodies"),
    (9, "channel-errors"),
    (10, "direct-reply-to"),
    (11, "channel-connection-churn"),
    (12, "exclusive-queue"),
    (13, "clean-close"),
    (14, "exclusive-gone-at-close"),
]


# Steps 13 and 14 found two proxy discrepancies, fixed since: the proxy
# closed the client's socket right after Connection.Close-Ok (amqp091-go
# then reported Exception (501) "EOF" on NotifyClose after most clean
# Close() calls), and it answered Close before the owner's exclusive queues
# were deleted upstream (right after Close() another client got 405 or even
# used the queue instead of 404). RabbitMQ does neither.


def _env(gocache):
    return dict(os.environ, GOPATH=GO_PATH, GO111MODULE="off", GOCACHE=str(gocache), GOFLAGS="")


@pytest.fixture(scope="module")
def features_bin(tmp_path_factory):
    if not shutil.which("go") or not os.path.isdir(os.path.join(GO_PATH, "src/github.com/rabbitmq/amqp091-go")):
        pytest.skip("golang-go / golang-github-rabbitmq-amqp091-go-dev are not installed")
    d = tmp_path_factory.mktemp("gofeatures")
    out = str(d / "amqp091_features")
    r = subprocess.run(["go", "build", "-o", out, SOURCE], capture_output=True, text=True,
                       timeout=300, env=_env(d / "gocache"))
    assert r.returncode == 0, "go build failed:\n%s\n%s" % (r.stdout, r.stderr)
    return out


@pytest.mark.parametrize("num", [pytest.param(n, id="%02d-%s" % (n, name)) for n, name in STEPS])
def test_go_features(proxy, features_bin, num):
    r = subprocess.run([features_bin, proxy.host, str(proxy.port), str(num)],
                       capture_output=True, text=True, timeout=110)
    report = "amqp091_features step %d exited %d:\n%s\n%s" % (num, r.returncode, r.stdout, r.stderr)
    assert r.returncode == 0, report
    assert re.search(r"^ok +%d " % num, r.stdout, re.M), report
    assert "go features ok" in r.stdout, report
    assert "FAIL" not in r.stdout, report
