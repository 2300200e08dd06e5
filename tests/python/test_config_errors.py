"""End to end: a bad configuration value makes the binary exit with code 2
and one clear line on stderr naming the setting (config details have their
own unit tests)."""

import os
import re
import subprocess

import pytest

from conftest import PROXY_BIN, _PROXY_ENV_VARS, free_port

SETTING = re.compile(r"idle[-_ ]connection[-_ ]timeout", re.I)


def run_proxy(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_ENV_VARS}
    env.update(env_extra or {})
    cmd = [PROXY_BIN, "--listen", "127.0.0.1", "--port", str(free_port()),
           "--http-port", str(free_port()), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("proxy kept running with a bad setting: %s" % " ".join(cmd))
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return r.returncode, lines


def assert_one_line_exit_2(rc, lines):
    assert rc == 2, "exit code %s, stderr: %r" % (rc, lines)
    assert len(lines) == 1, "expected one line on stderr, got %d: %r" % (len(lines), lines)


@pytest.mark.proxy_only
def test_bad_cli_value():
    rc, lines = run_proxy(["-t", "soon", "amqp://127.0.0.1:5672"])
    assert_one_line_exit_2(rc, lines)
    assert SETTING.search(lines[0]) or "-t" in lines[0], lines[0]


@pytest.mark.proxy_only
def test_bad_env_value():
    rc, lines = run_proxy(["amqp://127.0.0.1:5672"], {"IDLE_CONNECTION_TIMEOUT": "soon"})
    assert_one_line_exit_2(rc, lines)
    assert "IDLE_CONNECTION_TIMEOUT" in lines[0], lines[0]


@pytest.mark.proxy_only
def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("definitely_not_a_setting = 1\n")
    rc, lines = run_proxy(["-c", str(cfg), "amqp://127.0.0.1:5672"])
    assert_one_line_exit_2(rc, lines)
    assert "definitely_not_a_setting" in lines[0], lines[0]


@pytest.mark.proxy_only
def test_bad_upstream_url():
    rc, lines = run_proxy(["ftp://127.0.0.1:5672"])
    assert_one_line_exit_2(rc, lines)
