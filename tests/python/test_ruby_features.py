"""Ruby bunny (Debian ruby-bunny) feature tour through the proxy:
tests/ruby/bunny_features.rb does qos/manual ack/nack/reject/ack multiple,
publisher confirms, mandatory returns, transactions, topic/headers/
exchange-to-exchange routing, 1 and 4 MiB bodies, a channel error that
leaves the connection up, consumer cancel notification, and many short
connections and channels. Every step must report "ok"."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO, closed_port

SCRIPT = os.path.join(REPO, "tests", "ruby", "bunny_features.rb")
# step numbers of the task list this program covers (10, heartbeats, is
# covered for bunny by bunny_roundtrip.rb / bunny_heartbeat_idle.rb)
STEPS = [1, 2, 3, 4, 5, 6, 7, 8, 9]

pytestmark = pytest.mark.skipif(not shutil.which("ruby"), reason="ruby / ruby-bunny are not installed")


def run(host, port, timeout=100):
    return subprocess.run(["ruby", SCRIPT, host, str(port)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_bunny_features(proxy):
    r = run(proxy.host, proxy.port)
    assert r.returncode == 0, "bunny_features.rb exited %d\nstdout:\n%s\nstderr:\n%s" % (
        r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    done = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert done == STEPS, "steps reported ok: %r, want %r\n%s" % (done, STEPS, r.stdout)
    assert r.stdout.rstrip().endswith("bunny features ok"), r.stdout
    if not proxy.direct:
        assert proxy.proc.poll() is None, "the proxy exited:\n%s" % proxy.log_tail()


def test_bunny_features_reports_failure():
    """The program does fail (non-zero, a message naming the step) when it
    cannot do its work, so a pass above means something."""
    r = run("127.0.0.1", closed_port(), timeout=60)
    assert r.returncode != 0, r.stdout
    assert "bunny features FAILED in step (connect)" in r.stderr, r.stderr
    assert "features ok" not in r.stdout
