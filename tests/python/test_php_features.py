"""PHP feature tours through the proxy, with php-amqplib
(tests/php/amqplib_features.php) and with the php-amqp extension
(tests/php/ext_amqp_features.php): qos/manual ack/nack/reject/ack multiple,
publisher confirms, mandatory returns, transactions, topic/headers/
exchange-to-exchange routing, 1 and 4 MiB bodies, a channel error that
leaves the connection up, 30 short connections (the PHP request pattern) and
50 channels on one connection, and (php-amqplib) 7 s idle with 2 s
heartbeats. Every step must report "ok"."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO, closed_port

PHP_DIR = os.path.join(REPO, "tests", "php")

# script -> (name in its messages, step numbers of the task list it covers).
# Step 8 (consumer cancel notification) is bunny-only; step 10 (heartbeats)
# php-amqplib only: see the scripts' headers.
PROGRAMS = {
    "amqplib_features.php": ("php-amqplib", [1, 2, 3, 4, 5, 6, 7, 9, 10]),
    "ext_amqp_features.php": ("php-amqp", [1, 2, 3, 4, 5, 6, 7, 9]),
}


def run(script, host, port, timeout=100):
    php = shutil.which("php")
    assert php, "php not installed (apt-get install php-cli php-amqplib php-amqp)"
    return subprocess.run([php, os.path.join(PHP_DIR, script), host, str(port)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("script", sorted(PROGRAMS))
def test_php_features(proxy, script):
    name, steps = PROGRAMS[script]
    r = run(script, proxy.host, proxy.port)
    assert r.returncode == 0, "%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
        script, r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    done = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert done == steps, "steps reported ok: %r, want %r\n%s" % (done, steps, r.stdout)
    assert r.stdout.rstrip().endswith("%s features ok" % name), r.stdout
    if not proxy.direct:
        assert proxy.proc.poll() is None, "the proxy exited:\n%s" % proxy.log_tail()


@pytest.mark.parametrize("script", sorted(PROGRAMS))
def test_php_features_reports_failure(script):
    """The programs do fail (non-zero, a message naming the step) when they
    cannot do their work, so a pass above means something."""
    name, _ = PROGRAMS[script]
    r = run(script, "127.0.0.1", closed_port(), timeout=60)
    assert r.returncode != 0, r.stdout
    assert "%s features FAILED in step (connect)" % name in r.stderr, r.stderr
    assert "features ok" not in r.stdout
