"""Client libraries beyond pika and PHP: Ruby bunny and Go amqp091-go
(both from Debian), each doing a round trip through the proxy."""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
GO_PATH = "/usr/share/gocode"


def run(cmd, env=None, timeout=120):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, "%s failed (%d):\n%s\n%s" % (cmd, r.returncode, r.stdout, r.stderr)
    return r.stdout


def test_ruby_bunny(proxy):
    if not shutil.which("ruby"):
        pytest.skip("ruby-bunny is not installed")
    out = run(["ruby", os.path.join(TESTS, "ruby", "bunny_roundtrip.rb"), proxy.host, str(proxy.port)])
    assert "bunny ok" in out


def test_go_amqp091(proxy, tmp_path):
    if not shutil.which("go") or not os.path.isdir(os.path.join(GO_PATH, "src/github.com/rabbitmq/amqp091-go")):
        pytest.skip("golang-go / golang-github-rabbitmq-amqp091-go-dev are not installed")
    env = dict(os.environ, GOPATH=GO_PATH, GO111MODULE="off", GOCACHE=str(tmp_path / "gocache"), GOFLAGS="")
    out = run(["go", "run", os.path.join(TESTS, "go", "amqp091_roundtrip.go"), proxy.host, str(proxy.port)],
              env=env, timeout=300)
    assert "go ok" in out
