"""Broker-side inspection and administration for the tests.

Two back ends:
  * ``ctl``  - rabbitmqctl (local broker only). Connection listings are live,
               with no statistics lag. Default when rabbitmqctl exists and the
               broker in AMQP_URL is on this host.
  * ``http`` - the management HTTP API (RABBITMQ_API_URL, default
               http://<broker host>:15672, credentials from AMQP_URL or
               guest/guest). Its connection list lags by up to ~5 s, so
               every caller polls with a deadline.
Force one with BROKER_ADMIN=ctl|http.
"""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def parse_amqp_url(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("amqp", "amqps"):
        raise ValueError("AMQP_URL must be amqp://host[:port], got %r" % url)
    host = u.hostname or "127.0.0.1"
    port = u.port or (5671 if u.scheme == "amqps" else 5672)
    user = urllib.parse.unquote(u.username) if u.username else "guest"
    password = urllib.parse.unquote(u.password) if u.password else "guest"
    return {"scheme": u.scheme, "host": host, "port": port, "user": user, "password": password}


def wait_for(fn, timeout, interval=0.2, desc="condition"):
    """Poll fn() until it returns something truthy; return that value.
    On timeout raise AssertionError including the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s; last value: %r"
                                 % (timeout, desc, last))
        time.sleep(interval)


class Broker:
    def __init__(self, amqp_url=None):
        self.url = amqp_url or os.environ.get("AMQP_URL", "amqp://127.0.0.1:5672")
        p = parse_amqp_url(self.url)
        self.host, self.port = p["host"], p["port"]
        self.admin_user, self.admin_password = p["user"], p["password"]
        backend = os.environ.get("BROKER_ADMIN")
        if not backend:
            backend = "ctl" if (shutil.which("rabbitmqctl") and self.host in LOCAL_HOSTS) else "http"
        if backend not in ("ctl", "http"):
            raise ValueError("BROKER_ADMIN must be ctl or http")
        self.backend = backend
        self.api = os.environ.get("RABBITMQ_API_URL", "http://%s:15672" % self.host).rstrip("/")

    # ------------------------------------------------------------ plumbing
    def ctl(self, *args, timeout=60):
        r = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("rabbitmqctl %s failed (%d): %s%s"
                               % (" ".join(args), r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
        return r.stdout

    def http(self, method, path, body=None, ok=(200, 201, 204), headers=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method, headers=headers or {})
        token = base64.b64encode(("%s:%s" % (self.admin_user, self.admin_password)).encode()).decode()
        req.add_header("Authorization", "Basic " + token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        if status not in ok:
            raise RuntimeError("%s %s -> %d %s" % (method, path, status, raw[:500]))
        return json.loads(raw) if raw else None

    @staticmethod
    def q(s):
        return urllib.parse.quote(s, safe="")

    # ------------------------------------------------------------ connections
    def connections(self):
        """All connections on the broker, as dicts with keys
        id (pid or name, for close_connection), name, user, vhost, channels,
        peer_port, connection_name (client-provided, or None)."""
        out = []
        if self.backend == "ctl":
            data = json.loads(self.ctl("list_connections", "-q", "--formatter", "json",
                                       "name", "user", "vhost", "channels", "peer_host",
                                       "peer_port", "client_properties") or "[]")
            for c in data:
                cname = None
                for entry in c.get("client_properties") or []:
                    if entry and entry[0] == "connection_name":
                        cname = entry[2]
                out.append({"id": c["name"], "name": c["name"], "user": c["user"],
                            "vhost": c["vhost"], "channels": c["channels"],
                            "peer_port": c["peer_port"], "connection_name": cname})
        else:
            for c in self.http("GET", "/api/connections") or []:
                cp = c.get("client_properties") or {}
                out.append({"id": c["name"], "name": c["name"], "user": c.get("user"),
                            "vhost": c.get("vhost"), "channels": c.get("channels"),
                            "peer_port": c.get("peer_port"),
                            "connection_name": c.get("user_provided_name") or cp.get("connection_name")})
        return out

    def named(self, connection_name_prefix):
        return [c for c in self.connections()
                if (c["connection_name"] or "").startswith(connection_name_prefix)]

    def wait_named(self, connection_name_prefix, pred, timeout=None, desc="expected connections"):
        """Poll named(prefix) until pred(list) holds; return the list. The
        default deadline allows for the management API's statistics lag."""
        if timeout is None:
            timeout = 5 if self.backend == "ctl" else 15
        deadline = time.monotonic() + timeout
        while True:
            conns = self.named(connection_name_prefix)
            if pred(conns):
                return conns
            if time.monotonic() >= deadline:
                raise AssertionError("timed out after %.0fs waiting for %s; broker has: %r"
                                     % (timeout, desc, conns))
            time.sleep(0.2)

    def close_connection(self, conn, reason="closed by test"):
        if self.backend == "ctl":
            # close_connection wants the pid; map our connection's name to it
            for line in self.ctl("list_connections", "-q", "--no-table-headers", "pid", "name").splitlines():
                pid, _, name = line.partition("\t")
                if name.strip() == conn["name"]:
                    self.ctl("close_connection", pid.strip(), reason)
                    return
            raise AssertionError("connection %r not found on the broker" % conn["name"])
        self.http("DELETE", "/api/connections/" + self.q(conn["name"]), ok=(200, 204),
                  headers={"X-Reason": reason})

    # ------------------------------------------------------------ users, vhosts
    def add_user(self, user, password):
        if self.backend == "ctl":
            self.ctl("add_user", user, password)
        else:
            self.http("PUT", "/api/users/" + self.q(user), {"password": password, "tags": ""})

    def delete_user(self, user):
        try:
            if self.backend == "ctl":
                self.ctl("delete_user", user)
            else:
                self.http("DELETE", "/api/users/" + self.q(user), ok=(200, 204, 404))
        except RuntimeError:
            pass

    def set_permissions(self, user, vhost="/"):
        if self.backend == "ctl":
            self.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        else:
            self.http("PUT", "/api/permissions/%s/%s" % (self.q(vhost), self.q(user)),
                      {"configure": ".*", "write": ".*", "read": ".*"})

    def add_vhost(self, vhost):
        if self.backend == "ctl":
            self.ctl("add_vhost", vhost)
        else:
            self.http("PUT", "/api/vhosts/" + self.q(vhost))

    def delete_vhost(self, vhost):
        try:
            if self.backend == "ctl":
                self.ctl("delete_vhost", vhost)
            else:
                self.http("DELETE", "/api/vhosts/" + self.q(vhost), ok=(200, 204, 404))
        except RuntimeError:
            pass


# ---------------------------------------------------------------- appended helpers
# (queues, upstream channel counts, the memory watermark; used by the
# isolation / capability tests)

def _broker_queues(self):
    """{queue name: messages} for the default vhost."""
    if self.backend == "ctl":
        data = json.loads(self.ctl("list_queues", "-q", "--formatter", "json", "name", "messages") or "[]")
        return {q["name"]: q["messages"] for q in data}
    return {q["name"]: q.get("messages", 0) for q in self.http("GET", "/api/queues/%2F") or []}


def _broker_connection_by_name(self, name):
    """The broker's current record of the connection called `name` (the
    broker's own name, e.g. '127.0.0.1:40000 -> 127.0.0.1:5672'), or None."""
    for c in self.connections():
        if c["name"] == name:
            return c
    return None


def _broker_memory_watermark(self):
    """The memory high watermark now in force, as rabbitmqctl
    set_vm_memory_high_watermark arguments: ['0.4'] or ['absolute', '1073741824']."""
    if self.backend != "ctl":
        raise RuntimeError("the memory watermark needs rabbitmqctl (BROKER_ADMIN=ctl)")
    setting = json.loads(self.ctl("status", "--formatter", "json"))["vm_memory_high_watermark_setting"]
    if "relative" in setting:
        return [repr(float(setting["relative"]))]
    return ["absolute", str(int(setting["absolute"]))]


def _broker_set_memory_watermark(self, *args):
    self.ctl("set_vm_memory_high_watermark", *[str(a) for a in args])


Broker.queues = _broker_queues
Broker.connection_by_name = _broker_connection_by_name
Broker.memory_watermark = _broker_memory_watermark
Broker.set_memory_watermark = _broker_set_memory_watermark


# ---------------------------------------------------------------- appended helpers
# (channel reuse tests: the broker's live channels, its channel-created counter)

_CHANNEL_ITEMS = ("pid", "name", "number", "prefetch_count", "global_prefetch_count", "confirm",
                  "transactional", "consumer_count", "messages_unacknowledged", "messages_uncommitted")


def _broker_channels(self, connection_name=None):
    """The broker's channels as dicts with keys _CHANNEL_ITEMS; name is
    '<connection name> (<channel number>)'. pid identifies one channel for
    its lifetime (ctl only; None over HTTP, whose list also lags ~5 s).
    connection_name (the broker's name of a connection): only its channels."""
    if self.backend == "ctl":
        data = json.loads(self.ctl("list_channels", "-q", "--formatter", "json", *_CHANNEL_ITEMS) or "[]")
    else:
        data = [dict({k: c.get(k) for k in _CHANNEL_ITEMS}, pid=None)
                for c in self.http("GET", "/api/channels") or []]
    if connection_name is not None:
        data = [c for c in data if c["name"].rsplit(" (", 1)[0] == connection_name]
    return data


def _broker_channels_created(self):
    """(count, live): how many channels the broker has created since it
    started (all connections; the counter behind the management API's
    churn_rates.channel_created). live=True: read from the broker through
    rabbitmqctl eval, exact at this moment. live=False: read over HTTP, where
    the statistics collector publishes it every collect_statistics_interval
    (5 s by default): wait that long after the events to be counted."""
    if self.backend == "ctl":
        try:
            out = self.ctl("eval", "[{_, _, _, C, _, _, _, _}] = "
                                   "ets:lookup(connection_churn_metrics, node()), C.")
            return int(out.strip()), True
        except (RuntimeError, ValueError):
            pass  # another RabbitMQ version's internals: use the API
    return self.http("GET", "/api/overview")["churn_rates"]["channel_created"], False


Broker.channels = _broker_channels
Broker.channels_created = _broker_channels_created
