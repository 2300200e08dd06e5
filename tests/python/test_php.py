"""The seed's named users: PHP with php-amqplib (AMQPLAIN) and with the
php-amqp extension, each publishing and getting through the proxy."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO

PHP_DIR = os.path.join(REPO, "tests", "php")


@pytest.mark.parametrize("script", ["amqplib_roundtrip.php", "ext_amqp_roundtrip.php"])
def test_php_roundtrip(proxy, script):
    php = shutil.which("php")
    assert php, "php not installed (apt-get install php-cli php-amqplib php-amqp)"
    r = subprocess.run([php, os.path.join(PHP_DIR, script), proxy.host, str(proxy.port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, "%s exited %d\nstdout: %s\nstderr: %s" % (script, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "roundtrip ok" in r.stdout


def test_php_script_fails_against_nothing():
    """The scripts do report failure (so a pass above means something)."""
    from conftest import closed_port
    r = subprocess.run(["php", os.path.join(PHP_DIR, "amqplib_roundtrip.php"), "127.0.0.1", str(closed_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "failed" in r.stderr
