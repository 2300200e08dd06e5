"""TLS on both sides (issue 8).

Upstream amqps: the tests put stunnel (Debian's stunnel4) in front of the
local broker as a TLS terminator, with throwaway certificates from
tests/tls/make-certs; the shared broker itself is not reconfigured.
Client side: the proxy's own TLS listener, with pika over TLS.
"""

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pika
import pytest

from conftest import BROKER_PORT, free_port, unique, wait_log

pytestmark = pytest.mark.proxy_only

HERE = os.path.dirname(os.path.abspath(__file__))
MAKE_CERTS = os.path.join(os.path.dirname(HERE), "tls", "make-certs")
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([MAKE_CERTS, str(d)], check=True)
    return d


class Terminator:
    """stunnel accepting TLS on a free port and forwarding to the broker."""

    def __init__(self, certs, tmp, cert="server", verify_clients=False):
        if not STUNNEL:
            pytest.fail("stunnel4 is not installed (tests/run installs it)")
        self.port = free_port()
        conf = tmp / ("stunnel-%d.conf" % self.port)
        lines = [
            "foreground = yes",
            "pid =",
            "debug = 4",
            "[amqps]",
            "accept = 127.0.0.1:%d" % self.port,
            "connect = 127.0.0.1:%d" % BROKER_PORT,
            "cert = %s" % (certs / ("%s.pem" % cert)),
            "key = %s" % (certs / ("%s-key.pem" % cert)),
        ]
        if verify_clients:
            lines += ["CAfile = %s" % (certs / "ca.pem"), "verifyChain = yes"]
        conf.write_text("\n".join(lines) + "\n")
        self.log = open(tmp / ("stunnel-%d.log" % self.port), "wb")
        self.proc = subprocess.Popen([STUNNEL, str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.proc.poll() is None, "stunnel exited"
            time.sleep(0.05)
        pytest.fail("stunnel did not listen on %d" % self.port)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def terminator(certs, tmp_path):
    started = []

    def start(**kw):
        t = Terminator(certs, tmp_path, **kw)
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()


def round_trip(p, size=100_000):
    c = p.connect()
    try:
        ch = c.channel()
        q = unique()
        ch.queue_declare(q, arguments={"x-expires": 60000})
        body = os.urandom(size)
        ch.confirm_delivery()
        ch.basic_publish("", q, body, pika.BasicProperties(headers={"tls": True}))
        m, props, got = ch.basic_get(q, auto_ack=True)
        assert got == body and props.headers == {"tls": True}
        # and a consumer
        ch.basic_publish("", q, b"consumed")
        for method, _props, b in ch.consume(q, auto_ack=True, inactivity_timeout=5):
            assert b == b"consumed"
            break
        ch.cancel()
        ch.queue_delete(q)
    finally:
        c.close()


def refused_with(p, words):
    """The client gets a Connection.Close whose text contains `words`."""
    with pytest.raises(pika.exceptions.AMQPConnectionError) as e:
        p.connect().close()
    text = repr(e.value)
    assert any(w in text for w in words), text
    return text


def test_upstream_amqps_with_custom_ca(start_proxy, terminator, certs):
    t = terminator()
    p = start_proxy("--upstream-ca-file", str(certs / "ca.pem"), upstream="amqps://localhost:%d" % t.port)
    round_trip(p)


def test_upstream_untrusted_ca_is_a_clear_close(start_proxy, terminator, certs):
    t = terminator()
    # The system trust store does not know our throwaway CA.
    p = start_proxy(upstream="amqps://localhost:%d" % t.port)
    refused_with(p, ["unknown CA"])
    # Nor does a CA file with a different CA.
    p2 = start_proxy("--upstream-ca-file", str(certs / "other-ca.pem"), upstream="amqps://localhost:%d" % t.port)
    refused_with(p2, ["unknown CA"])


def test_upstream_hostname_mismatch_and_override(start_proxy, terminator, certs):
    t = terminator(cert="wrong-name")
    ca = str(certs / "ca.pem")
    p = start_proxy("--upstream-ca-file", ca, upstream="amqps://localhost:%d" % t.port)
    refused_with(p, ["does not match its host name"])
    ok = start_proxy("--upstream-ca-file", ca, "--upstream-tls-server-name", "wrong.example",
                     upstream="amqps://localhost:%d" % t.port)
    round_trip(ok, size=10)


def test_upstream_insecure_switch_warns_and_works(start_proxy, terminator):
    t = terminator(cert="wrong-name")
    p = start_proxy("--upstream-tls-insecure", upstream="amqps://localhost:%d" % t.port)
    round_trip(p, size=10)
    assert "NOT verified" in p.log_tail(200)


def test_upstream_mutual_tls(start_proxy, terminator, certs):
    t = terminator(verify_clients=True)
    ca = str(certs / "ca.pem")
    without = start_proxy("--upstream-ca-file", ca, upstream="amqps://localhost:%d" % t.port)
    refused_with(without, ["TLS", "failed", "lost"])
    p = start_proxy("--upstream-ca-file", ca, "--upstream-tls-cert", str(certs / "client.pem"),
                    "--upstream-tls-key", str(certs / "client-key.pem"),
                    upstream="amqps://localhost:%d" % t.port)
    round_trip(p, size=10)


def tls_proxy(start_proxy, certs, *flags, cert=None, key=None):
    """A proxy with a TLS listener; returns (proxy, TLS port) once that port
    accepts (the fixture waits for the plain port, bound just before it)."""
    port = free_port()
    p = start_proxy("--tls-port", str(port), "--tls-cert", str(cert or certs / "server.pem"),
                    "--tls-key", str(key or certs / "server-key.pem"), *flags)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return p, port
        assert time.monotonic() < deadline, "the TLS port %d never accepted" % port
        time.sleep(0.02)


def tls_params(p, port, certs, client_cert=False):
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client-key.pem"))
    params = p.params(ssl_options=pika.SSLOptions(ctx, "localhost"))
    params.port = port
    return params


def test_client_tls_listener(start_proxy, certs):
    p, port = tls_proxy(start_proxy, certs)
    c = pika.BlockingConnection(tls_params(p, port, certs))
    ch = c.channel()
    q = unique()
    ch.queue_declare(q, arguments={"x-expires": 60000})
    body = os.urandom(300_000)
    ch.basic_publish("", q, body)
    assert ch.basic_get(q, auto_ack=True)[2] == body
    ch.queue_delete(q)
    c.close()
    # The plain listener keeps working alongside.
    round_trip(p, size=10)


def test_plain_client_on_the_tls_port_is_refused_cleanly(start_proxy, certs):
    p, port = tls_proxy(start_proxy, certs)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        s.settimeout(5)
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    # A TLS alert record (type 21) or nothing, then the close; never AMQP.
    assert not data.startswith(b"AMQP") and (data == b"" or data[0] == 21), data[:20]
    assert p.proc.poll() is None
    round_trip(p, size=10)


def test_client_certificate_verification(start_proxy, certs):
    p, port = tls_proxy(start_proxy, certs, "--tls-client-ca", str(certs / "ca.pem"))
    with pytest.raises(Exception):
        pika.BlockingConnection(tls_params(p, port, certs, client_cert=False)).close()
    c = pika.BlockingConnection(tls_params(p, port, certs, client_cert=True))
    assert c.channel().is_open
    c.close()


# ------------------------------------------------------------ SIGHUP re-reads

def replace_file(src, dst):
    """Puts a copy of src at dst atomically, as a certificate renewal does."""
    tmp = str(dst) + ".new"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def peer_ca_verifies(p, port, ca):
    """Whether a TLS connection to the listener verifies against `ca`."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost"):
                return True
        except ssl.SSLCertVerificationError:
            return False


def test_sighup_rereads_the_listener_certificate(start_proxy, certs, tmp_path):
    """A renewed certificate at the same path is served to connections made
    after SIGHUP; connections made before it carry on; a key that does not
    load leaves the running certificate in place."""
    renewed = tmp_path / "renewed"
    subprocess.run([MAKE_CERTS, str(renewed)], check=True)  # a new CA too
    cert, key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    replace_file(certs / "server.pem", cert)
    replace_file(certs / "server-key.pem", key)
    p, port = tls_proxy(start_proxy, certs, cert=cert, key=key)
    before = pika.BlockingConnection(tls_params(p, port, certs))
    ch = before.channel()
    q = unique()
    ch.queue_declare(q, arguments={"x-expires": 60000})
    assert peer_ca_verifies(p, port, certs / "ca.pem")

    replace_file(renewed / "server.pem", cert)
    replace_file(renewed / "server-key.pem", key)
    # Not re-read on its own: only SIGHUP does it.
    assert peer_ca_verifies(p, port, certs / "ca.pem")
    p.proc.send_signal(signal.SIGHUP)
    _, pos = wait_log(p, r"SIGHUP: TLS listener certificate re-read$")
    assert peer_ca_verifies(p, port, renewed / "ca.pem")
    assert not peer_ca_verifies(p, port, certs / "ca.pem")
    after = pika.BlockingConnection(tls_params(p, port, renewed))
    after_ch = after.channel()
    after_ch.confirm_delivery()  # enqueued before the other connection looks
    after_ch.basic_publish("", q, b"after the renewal")
    # The connection made before the reload still works, on the old session.
    assert ch.basic_get(q, auto_ack=True)[2] == b"after the renewal"
    after.close()

    # A key that does not load: the reload is refused, nothing changes.
    key.write_text("not a key\n")
    p.proc.send_signal(signal.SIGHUP)
    m, _ = wait_log(p, r"SIGHUP: configuration not reloaded.*$", after=pos)
    assert "private key" in m.group(0), m.group(0)
    assert peer_ca_verifies(p, port, renewed / "ca.pem")
    ch.queue_delete(q)
    before.close()
    assert p.proc.poll() is None


def test_sighup_rereads_the_upstream_ca_file(start_proxy, terminator, certs, tmp_path):
    """The upstream CA file is re-read by SIGHUP: new upstream connections
    verify against what it holds now."""
    t = terminator()
    ca = tmp_path / "upstream-ca.pem"
    replace_file(certs / "other-ca.pem", ca)
    p = start_proxy("--upstream-ca-file", str(ca), upstream="amqps://localhost:%d" % t.port)
    refused_with(p, ["unknown CA"])
    replace_file(certs / "ca.pem", ca)
    p.proc.send_signal(signal.SIGHUP)
    wait_log(p, r"SIGHUP: upstream TLS files re-read$")
    round_trip(p, size=10)
