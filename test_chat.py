"""Tests for chat.py. Run: python3 -m unittest -v

Filed by the part of chat.py they test, under the same section names and
numbers. The tools come first: the Harness (the server's core in memory,
on a fake loop and a fake clock, as h11 tests its connection) for the
protocol's rules, then real servers on 127.0.0.1 port 0, in a thread or a
subprocess, with real sockets, client processes, pseudo-terminals and a
throwaway redis-server. Nothing waits by sleeping: every wait is for a
condition (a frame, a line of output, an exit) with a timeout.
"""
import argparse
import atexit
import base64
import codecs
import contextlib
import errno
import fcntl
import fnmatch
import heapq
import io
import itertools
import json
import logging
import os
import queue
import random
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import unicodedata
import unittest
import unittest.mock

import chat

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = os.path.join(HERE, "chat.py")
TIMEOUT = 5.0
logging.getLogger("chat").setLevel(logging.CRITICAL)    # the server's log is not test output
CONFIG_HOME = tempfile.mkdtemp(prefix="chat-test-config-")  # where clients the tests run keep their files,
atexit.register(shutil.rmtree, CONFIG_HOME, True)            # never the user's own ~/.config

# A self-signed test certificate (CN=localhost, valid until 2126), and a second one for "changed".
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUG5shICawWPdxg/Rwhmq+5vZIxrAwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNjA4NTg1OVoYDzIxMjYxMTAy
MDg1ODU5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAR/3vhgdyiWRWvYgbwR2bUFejz2eqF/vsltQV9NhtwDgHVkGzp1cipx
RlNC4Qz+2JXSrFh0Pp1rzX1+TM6zWwnLo28wbTAdBgNVHQ4EFgQUrfTHapMa09bt
UMJqEx/CCXlY0KAwHwYDVR0jBBgwFoAUrfTHapMa09btUMJqEx/CCXlY0KAwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSAAwRQIhALkTgX0jxxoPsBEMJJOV/k3DnL7nqgdyb5wfTn+QY8ptAiAg
of5Y/sxdVZIxoDrZxDeGvXOpIbPUp24iJBQ7ckCImA==
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgpjSEy/8NP97KYDiU
wBy9WB+Xd58gY2C14DM8n9aj+dChRANCAAR/3vhgdyiWRWvYgbwR2bUFejz2eqF/
vsltQV9NhtwDgHVkGzp1cipxRlNC4Qz+2JXSrFh0Pp1rzX1+TM6zWwnL
-----END PRIVATE KEY-----
"""
OTHER_CERT = """-----BEGIN CERTIFICATE-----
MIIBgDCCASWgAwIBAgIUWEZB6jnRaXwLhdaTC8DMerKKEoQwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNjA4NTg1OVoYDzIxMjYxMTAy
MDg1ODU5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARf3H7D+qFocxkvzkV7VddJL+fvYVJm6h1YsGbUbumN9f6LlOPHI+YQ
WbshcAAWImJaOwcY9e8t1tTyZCon01fUo1MwUTAdBgNVHQ4EFgQUEYEjd53jFEIy
TWKrCnGHHutE9SswHwYDVR0jBBgwFoAUEYEjd53jFEIyTWKrCnGHHutE9SswDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEA38TrCBEc4byI1tg60KNG
oUvx81DKzjaAVegBeEgoqdcCIQDO47LMv+jgXTRzVg31zapNIwI3YbwaI+Uh0t2N
oXYU4Q==
-----END CERTIFICATE-----
"""
OTHER_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgnOuuPGw0r6GEL5ak
6QUpjh8oAzo1w+VgOZQuOFEe43GhRANCAARf3H7D+qFocxkvzkV7VddJL+fvYVJm
6h1YsGbUbumN9f6LlOPHI+YQWbshcAAWImJaOwcY9e8t1tTyZCon01fU
-----END PRIVATE KEY-----
"""


# ---------------------------------------------------------------------------
# Test tools: helpers
# ---------------------------------------------------------------------------

def frame_bytes(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def wait_until(predicate, timeout=TIMEOUT, what="a condition"):
    """Poll `predicate` until true (for server state that sends no frame)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LONE = '"\\ud800"'     # a lone surrogate, spelled as JSON escapes it


# ---------------------------------------------------------------------------
# Test tools: the server's core in memory (Harness: a fake loop, a fake clock)
# ---------------------------------------------------------------------------

class Harness:
    """The loop's side of chat.Chat with no socket and no real time, as h11
    tests its Connection: a fake clock, a heap of timers, and each
    connection's bytes in both directions. Everything runs synchronously,
    so what a test sends has been handled when send() returns."""

    def __init__(self, **config):
        self.now, self.wall = 1000.0, 1.8e9
        self.timers = []
        self._seq = itertools.count()
        self.config = chat.ServerConfig(port=0, **config)
        self.chat = chat.Chat(self.config, self)
        self.clients = {}       # conn -> FakeClient
        self.ports = itertools.count(40000)
        self.stopped = None
        self.turn()

    # -- what the core asks of its loop --------------------------------------

    def call_later(self, delay, function, *args):
        heapq.heappush(self.timers, (self.now + delay, next(self._seq), function, args))

    def update_interest(self, conn):
        pass    # reading is modelled in pump(): a paused connection is not read

    def close_soon(self, conn):
        self.clients[conn].closing = True

    def stop(self, reason="server shutting down"):
        self.stopped = reason

    def work(self, function, *args, done):
        """Work the loop hands to a thread is done here at once (the clock does not move)."""
        try:
            result = function(*args)
        except Exception as error:
            result = error
        done(result)

    # -- driving it ----------------------------------------------------------

    def connect(self, nick=None, ip="192.0.2.1", autopong=True, **hello):
        conn = chat.Conn(None, f"{ip}:{next(self.ports)}", ip, self.config.max_payload, self.now,
                         self.config.flood_burst)
        client = self.clients[conn] = FakeClient(self, conn, autopong)
        self.turn(lambda: self.chat.open(conn))
        if nick is not None:
            client.send({"type": "hello", "nick": nick, **hello})
            client.welcome = client.expect("welcome")
        return client

    def irc(self, nick=None, ip="192.0.2.1", caps=(), user="user", password=None):
        """An IRC client (registered as `nick`, with `caps`, if given)."""
        conn = chat.Conn(None, f"{ip}:{next(self.ports)}", ip, self.config.max_payload, self.now,
                         self.config.flood_burst)
        client = self.clients[conn] = FakeIrcClient(self, conn)
        self.turn(lambda: self.chat.open(conn))
        if nick is not None:
            lines = (["CAP LS 302"] + [f"CAP REQ :{' '.join(caps)}"] * bool(caps) +
                     [f"PASS {password}"] * (password is not None) +
                     [f"NICK {nick}", f"USER {user} 0 * :Real {nick}"] + ["CAP END"])
            client.send(*lines)
            client.welcome = client.expect("001")
        return client

    def turn(self, action=None):
        """One loop turn: the time, what happened, then fan-out and writing."""
        self.chat.tick(self.now, self.wall)
        if action is not None:
            action()
        self._deliver()
        while self.chat.has_work():     # the real loop takes another turn at once
            self.chat.tick(self.now, self.wall)
            self._deliver()
        for client in list(self.clients.values()):
            if client.closing and not client.conn.out:
                client.close("closed")      # all said: the peer sees the connection end
        for client in list(self.clients.values()):
            client.pump()

    def _deliver(self):
        """The loop's half of the contract: write to each connection the core
        names, and tell it what was taken (all, or nothing for one that stopped reading)."""
        while True:
            conns = self.chat.end_turn()
            if not conns:
                return
            for conn in conns:
                self.clients[conn].take()

    def call(self, function, *args):
        """Run `function` in a turn of the loop, as the real loop's call_soon_threadsafe does."""
        result = []
        self.turn(lambda: result.append(function(*args)))
        return result[0]

    def advance(self, seconds):
        """Let `seconds` of fake time pass, firing each timer in a turn of its own."""
        end = self.now + seconds
        while self.timers and self.timers[0][0] <= end:
            when, _, function, args = heapq.heappop(self.timers)
            self.wall += max(0.0, when - self.now)
            self.now = max(self.now, when)
            self.turn(lambda: function(*args))
        self.wall += end - self.now
        self.now = end
        self.turn()


class FakeClient:
    """One connection of a Harness, seen from the client's side."""

    def __init__(self, harness, conn, autopong=True):
        self.harness, self.conn = harness, conn
        self.autopong = autopong        # answer the server's keepalive pings, as Peer does
        self.outbound = bytearray()     # sent, not yet read by the server (its socket buffer)
        self.decoder = chat.FrameDecoder(chat.MAX_SERVER_PAYLOAD)
        self.received = []
        self.reading = True             # False: a client that stopped reading
        self.closing = self.gone = False
        self.welcome = None

    def send(self, *frames):
        self.send_raw(b"".join(chat.encode(frame) for frame in frames))

    def send_raw(self, data):
        self.outbound += data
        self.pump()

    def pump(self):
        """The server reads what it is willing to: nothing while paused."""
        conn = self.conn
        while self.outbound and not self.gone and (not conn.paused or conn.state is chat.CLOSING):
            data = bytes(self.outbound[:chat.RECV_SIZE])
            del self.outbound[:len(data)]
            self.harness.turn(lambda: self.harness.chat.received(conn, memoryview(data)))

    def take(self):
        """The server writes: the client reads everything queued (unless it stopped reading)."""
        conn = self.conn
        if conn.state is chat.CLOSED:
            return
        if not self.reading:
            self.harness.chat.wrote(conn, 0)
        elif conn.out:
            for chunk in conn.out:
                self.decoder.feed(bytes(chunk))
            self.harness.chat.wrote(conn, conn.queued)
            while True:
                frame = self.decoder.next_frame()
                if frame is None:
                    break
                if frame["type"] == "ping" and self.autopong and "token" not in frame:
                    self.outbound += chat.encode({"type": "pong"})     # read at the end of the turn
                    continue
                self.received.append(frame)
        if self.closing and not conn.out and not self.gone:
            self.close("closed")

    def close(self, reason="connection closed"):
        if not self.gone:
            self.gone = True
            self.harness.chat.closed(self.conn, reason)
            self.harness._deliver()
            del self.harness.clients[self.conn]

    def frames(self, kind=None):
        """What arrived since the last call (of `kind`, if given)."""
        frames, self.received = self.received, []
        return [f for f in frames if kind is None or f["type"] == kind]

    # The same calls as the real-socket Peer's, so a test can run on either;
    # here nothing waits: everything sent has been handled when send() returns.

    def next(self, timeout=None):
        if not self.received:
            raise AssertionError("no frame arrived")
        return self.received.pop(0)

    def expect(self, kind, timeout=None, **fields):
        """The first frame of type `kind` (with `fields`) received so far; the frames before it are consumed."""
        while self.received:
            frame = self.received.pop(0)
            if frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items()):
                return frame
        raise AssertionError(f"no {kind} {fields} arrived")

    def sync(self):
        return self.frames()

    def closed(self, timeout=None):
        """The frames received, once the server has closed the connection."""
        if not self.gone:
            raise AssertionError(f"still open; got {self.received}")
        return self.frames()


class IrcLine(str):
    """A line an IRC client read: the line itself, and its parts."""

    @property
    def parts(self):
        """(tags, prefix, command, params) of the line."""
        line, tags = str(self), ""
        if line.startswith("@"):
            tags, _, line = line.partition(" ")
        prefix = ""
        if line.startswith(":"):
            prefix, _, line = line[1:].partition(" ")
        head, sep, trailing = line.partition(" :")
        params = head.split()
        return tags, prefix, params[0], params[1:] + ([trailing] if sep else [])

    @property
    def command(self):
        return self.parts[2]

    @property
    def params(self):
        return self.parts[3]


class FakeIrcClient(FakeClient):
    """An IRC client of a Harness: lines in, lines out (IrcLine), PINGs answered."""

    def __init__(self, harness, conn):
        super().__init__(harness, conn)
        self.inbound = bytearray()

    def send(self, *lines):
        self.send_raw(b"".join(line.encode() + b"\r\n" for line in lines))

    def take(self):
        conn = self.conn
        if conn.state is chat.CLOSED:
            return
        if conn.out:
            for chunk in conn.out:
                self.inbound += bytes(chunk)
            self.harness.chat.wrote(conn, conn.queued)
            *lines, rest = self.inbound.split(b"\r\n")
            self.inbound = bytearray(rest)
            for raw in lines:
                assert len(raw) + 2 <= 512 + 8192, raw
                line = IrcLine(raw.decode("utf-8"))
                if line.command == "PING":
                    self.outbound += f"PONG :{line.params[-1]}\r\n".encode()
                    continue
                self.received.append(line)
        if self.closing and not conn.out and not self.gone:
            self.close("closed")

    def frames(self, kind=None):
        lines, self.received = self.received, []
        return [line for line in lines if kind is None or line.command == kind]

    def expect(self, command, **ignored):
        """The first line with `command` received so far; the lines before it are consumed."""
        while self.received:
            line = self.received.pop(0)
            if line.command == command:
                return line
        raise AssertionError(f"no {command} arrived")



class HarnessTestCase(unittest.TestCase):
    """Every in-memory test's base: `self.server` is a Harness with `config`,
    and peer() makes the same calls as ServerTestCase's, with no socket and
    a fake clock. harness() makes another (closed when the test ends)."""
    config = {}

    def setUp(self):
        self.server = self.harness(**self.config)

    def harness(self, **config):
        harness = Harness(**config)
        self.addCleanup(harness.chat.close)
        return harness

    def peer(self, nick=None, **hello):
        return self.server.connect(nick, **hello)


class BadInputChecks:
    """Alice and Bob chat; a third connection misbehaves: check() says how it is answered."""
    config = {"hello_timeout": 0.5}

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.peer("alice"), self.peer("bob")
        self.alice.expect("join", nick="bob")

    def assert_unaffected(self):
        """Everyone else still chats as before."""
        self.alice.send({"type": "msg", "text": "still fine?"})
        self.assertEqual(self.bob.expect("msg")["text"], "still fine?")

    def check(self, data, code, closes, joined=True):
        self.attempts = getattr(self, "attempts", 0) + 1     # a nick of its own: a lost one is held
        peer = self.peer(f"mallory{self.attempts}" if joined else None)
        with self.assertLogs("chat", logging.INFO) as logs:
            peer.send_raw(data)
            if closes:
                frames = peer.closed()
                self.assertEqual([f["code"] for f in frames if f["type"] == "error"], [code])
                if joined:
                    self.assertEqual(self.alice.expect("leave")["nick"], f"mallory{self.attempts}")
            else:
                self.assertEqual(peer.expect("error")["code"], code)
                peer.send({"type": "ping"})
                peer.expect("pong")     # still open
            wait_until(lambda: logs.output, what="a log line")
        self.assert_unaffected()
        peer.close()
        return logs.output


# ---------------------------------------------------------------------------
# Test tools: real servers, sockets, processes, terminals, Redis
# ---------------------------------------------------------------------------

class ServerThread:
    """A ServerLoop on 127.0.0.1, port 0, in a thread of this process."""

    def __init__(self, **config):
        config.setdefault("host", "127.0.0.1")
        self.loop = chat.ServerLoop(chat.ServerConfig(port=0, **config))
        self.port = self.loop.address[1]
        self.thread = threading.Thread(target=self.loop.serve_forever, daemon=True)
        self.thread.start()

    def call(self, function, *args):
        """Run `function` in the server's thread and return its result."""
        done = queue.Queue()
        self.loop.call_soon_threadsafe(lambda: done.put(function(*args)))
        return done.get(timeout=TIMEOUT)

    def stop(self):
        self.loop.stop()
        self.thread.join(TIMEOUT)


def recv_before(sock, deadline, what):
    """What `sock` has to read by `deadline`; AssertionError on timeout or when the server closes."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise AssertionError(f"no {what} arrived in time")
    sock.settimeout(left)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        raise AssertionError(f"no {what} arrived in time") from None
    if not data:
        raise AssertionError("the server closed the connection")
    return data


class IrcPeer:
    """An IRC client on a blocking socket (plain or TLS): lines in and out."""

    def __init__(self, port, nick=None, sock=None, password=None):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.settimeout(TIMEOUT)
        self.buffer = b""
        if nick is not None:
            self.send(*[f"PASS {password}"] * (password is not None), f"NICK {nick}", f"USER {nick} 0 * :{nick}")
            self.welcome = self.expect("001")

    def send(self, *lines):
        self.sock.sendall(b"".join(line.encode() + b"\r\n" for line in lines))

    def next(self, timeout=TIMEOUT):
        """The next line (PINGs answered); AssertionError on timeout or when the server closes."""
        deadline = time.monotonic() + timeout
        while True:
            raw, sep, rest = self.buffer.partition(b"\r\n")
            if sep:
                self.buffer = rest
                line = IrcLine(raw.decode("utf-8"))
                if line.command == "PING":
                    self.send(f"PONG :{line.params[-1]}")
                    continue
                return line
            self.buffer += recv_before(self.sock, deadline, "line")

    def expect(self, command, timeout=TIMEOUT):
        """Skip lines until one with `command` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(deadline - time.monotonic())
            if line.command == command:
                return line

    def close(self):
        self.sock.close()


class Peer:
    """A protocol-level test client on a blocking socket."""

    def __init__(self, port, nick=None, host="127.0.0.1", sock=None, autopong=True, **hello):
        self.sock = sock or socket.create_connection((host, port), timeout=TIMEOUT)
        self.sock.settimeout(TIMEOUT)
        self.autopong = autopong    # answer the server's keepalive pings while reading
        self.decoder = chat.FrameDecoder(chat.MAX_SERVER_PAYLOAD)
        self.welcome = None
        if nick is not None:
            self.send({"type": "hello", "nick": nick, **hello})
            self.welcome = self.expect("welcome")

    def send(self, frame):
        self.sock.sendall(chat.encode(frame))

    def send_raw(self, data):
        self.sock.sendall(data)

    def next(self, timeout=TIMEOUT):
        """The next frame; AssertionError on timeout or when the server closes."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.decoder.next_frame()
            if frame is not None and frame["type"] == "ping" and self.autopong and "token" not in frame:
                self.send({"type": "pong"})
                continue
            if frame is not None:
                return frame
            self.decoder.feed(recv_before(self.sock, deadline, "frame"))

    def expect(self, kind, timeout=TIMEOUT, **fields):
        """Skip frames until one of type `kind` (with `fields`) arrives."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next(deadline - time.monotonic())
            if frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items()):
                return frame

    def sync(self):
        """Everything the server sent us before now: ping, collect until pong.
        (The server answers in order, so this proves what did not arrive.)"""
        token = os.urandom(4).hex()
        self.send({"type": "ping", "token": token})
        frames = []
        while True:
            frame = self.next()
            if frame["type"] == "pong" and frame.get("token") == token:
                return frames
            frames.append(frame)

    def closed(self, timeout=TIMEOUT):
        """Frames received until the server closes the connection."""
        frames, deadline = [], time.monotonic() + timeout
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                frames.append(frame)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"still open; got {frames}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return frames
            if not data:
                return frames
            self.decoder.feed(data)

    def close(self):
        self.sock.close()


class Process:
    """A chat.py subprocess whose output lines are collected as they come."""

    def __init__(self, *args, stdin=subprocess.PIPE, env=None, file_limit=None):
        def limit_files():      # no file may grow past file_limit bytes, as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
        self.proc = subprocess.Popen([sys.executable, CHAT] + [str(a) for a in args], stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, XDG_CONFIG_HOME=CONFIG_HOME, **(env or {})),
                                     encoding="utf-8",
                                     start_new_session=True, preexec_fn=limit_files if file_limit else None)
        self.stdout, self.stderr = queue.Queue(), queue.Queue()
        self.out_lines, self.err_lines = [], []
        for stream, lines, sink in ((self.proc.stdout, self.out_lines, self.stdout),
                                    (self.proc.stderr, self.err_lines, self.stderr)):
            threading.Thread(target=self._pump, args=(stream, lines, sink), daemon=True).start()

    @staticmethod
    def _pump(stream, lines, sink):
        for line in stream:
            lines.append(line.rstrip("\n"))
            sink.put(line.rstrip("\n"))
        sink.put(None)

    def wait_line(self, pattern, stream="stdout", timeout=TIMEOUT):
        """The first new line on `stream` matching `pattern` (a regex)."""
        sink = self.stdout if stream == "stdout" else self.stderr
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = sink.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} on {stream}; "
                                     f"stdout={self.out_lines} stderr={self.err_lines}") from None
            if line is None:
                raise AssertionError(f"{stream} ended before {pattern!r}; "
                                     f"stdout={self.out_lines} stderr={self.err_lines}")
            match = re.search(pattern, line)
            if match:
                return match

    def write(self, text):
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait(self, timeout=TIMEOUT):
        return self.proc.wait(timeout)

    def kill(self):
        """Kill it and anything it started (so no pipe is left open)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def server_process(*args, env=None):
    """A `chat.py server` subprocess on a free port; returns (process, port)."""
    server = Process("server", "-p", 0, *args, stdin=subprocess.DEVNULL, env=env)
    port = int(server.wait_line(r"listening on \S+:(\d+)")[1])
    return server, port


def children(pid):
    """The processes whose parent is `pid` (Linux: read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


class ServerTestCase(unittest.TestCase):
    config = {}

    def setUp(self):
        self.server = ServerThread(**self.config)
        self.addCleanup(self.server.stop)
        self.port = self.server.port

    def peer(self, nick=None, **options):
        peer = Peer(self.port, nick, **options)
        self.addCleanup(peer.close)
        return peer

    def client(self, *args, **kwargs):
        process = Process("client", "-p", self.port, *args, **kwargs)
        self.addCleanup(process.kill)
        return process


class TlsFiles:
    """The embedded test certificates written to a temporary directory."""

    def __init__(self, test):
        tmp = tempfile.TemporaryDirectory()
        test.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.cert, self.key = self.write("cert.pem", TEST_CERT), self.write("key.pem", TEST_KEY)
        self.other_cert, self.other_key = self.write("other.pem", OTHER_CERT), self.write("okey.pem", OTHER_KEY)
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.fingerprint = chat.certificate_fingerprint(self.cert)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path


def tls_peer(port, nick=None, **options):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return Peer(port, nick, sock=context.wrap_socket(raw), **options)


def cut(server, nick):
    """Break `nick`'s connection from the server's side, as a network fault would."""
    def shutdown():
        server.loop.chat.users[chat.name_key(nick)].sock.shutdown(socket.SHUT_RDWR)
    server.call(shutdown)


def ping_ms(peer):
    """How long the server takes to answer `peer`'s ping, in milliseconds."""
    started = time.monotonic()
    peer.sync()
    return (time.monotonic() - started) * 1000


class RedisServer:
    """A throwaway redis-server on a free port, without persistence."""

    def __init__(self, test, port=None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = None
        self.start()
        test.addCleanup(self.stop)

    def start(self):
        debug = ["--enable-debug-command", "local"] if self.version() >= (7,) else []
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", *debug],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        wait_until(answers, what="redis-server to start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @staticmethod
    def version():
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        return tuple(int(part) for part in re.search(r"v=(\d+)\.(\d+)", out).groups())

    def call(self, *args):
        """One command's reply (chat.py's own RESP code speaks it)."""
        parser = chat.RespParser()
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as s:
            s.sendall(chat.resp_command(*args))
            while True:
                parser.feed(s.recv(65536))
                replies = parser.replies()
                if replies:
                    return replies[0]

    def sleep(self, seconds):
        """Freeze Redis for `seconds` (DEBUG SLEEP), as a slow or stuck Redis would be; returns at once."""
        def freeze():
            with socket.create_connection(("127.0.0.1", self.port), timeout=seconds + TIMEOUT) as s:
                s.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
                s.recv(64)
        thread = threading.Thread(target=freeze, daemon=True)
        thread.start()
        return thread


class ClusterSetup:
    """Two servers A and B linked through a throwaway Redis."""
    TTL = 1.5

    def setUp(self):
        self.redis = RedisServer(self)
        self.a, self.b = self.server(), self.server()

    def server(self, **config):
        server = ServerThread(redis=self.redis.url, cluster_ttl=self.TTL, **config)
        self.addCleanup(server.stop)
        wait_until(lambda: server.call(lambda: server.loop.chat.relay.up), what="the cluster link")
        return server

    def peer(self, server, nick=None, **options):
        peer = Peer(server.port if isinstance(server, ServerThread) else server, nick, **options)
        self.addCleanup(peer.close)
        return peer


class Terminal:
    """chat.py on a real pseudo-terminal (its controlling terminal, so Ctrl-C
    is a signal): keystrokes in, the bytes it draws out."""

    def __init__(self, test, *args, rows=24, columns=80, env=None):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

        def own_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        self.proc = subprocess.Popen([sys.executable, CHAT, *map(str, args)], stdin=slave, stdout=slave,
                                     stderr=slave, preexec_fn=own_terminal, close_fds=True,
                                     env={**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
                                          "TERM": "xterm", "XDG_CONFIG_HOME": CONFIG_HOME, **(env or {})})
        os.close(slave)
        self.master, self.output, self.mark = master, b"", 0
        self.screen = Screen(rows, columns)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        test.addCleanup(self.close)

    def resize(self, columns):
        """The terminal gets narrower or wider (the program gets SIGWINCH); it reflows its lines."""
        self.screen.resize(columns)
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", self.screen.rows, columns, 0, 0))

    def type(self, keys):
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def read(self, timeout):
        readable, _, _ = select.select([self.master], [], [], timeout)
        if not readable:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:     # the other side is closed: the process ended
            data = b""
        self.output += data
        self.screen.feed(self._decoder.decode(data))
        return bool(data)

    def settle(self, pattern, timeout=TIMEOUT):
        """Wait until the screen shows `pattern` (a regex) in one of its rows, and nothing more arrives."""
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, row) for row in self.screen.lines()):
            if time.monotonic() > deadline or (not self.read(deadline - time.monotonic()) and self.proc.poll() is not None):
                raise AssertionError(f"{pattern!r} not on the screen: {self.screen.lines()}")
        while self.read(0.1):
            pass
        return self.screen

    def expect(self, pattern, timeout=TIMEOUT):
        """Wait for `pattern` (a regex) in what was drawn since the last expect()."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output[self.mark:].decode("utf-8", "replace"))
            if match:
                self.mark += len(self.output[self.mark:].decode("utf-8", "replace")[:match.end()].encode())
                return match
            if time.monotonic() > deadline or not self.read(deadline - time.monotonic()):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"{pattern!r} was not drawn; the screen got "
                                         f"{self.output[self.mark:].decode('utf-8', 'replace')!r}")

    def wait(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.05)     # keep the terminal drained, or the process blocks writing to it
        return self.proc.wait(max(0.0, deadline - time.monotonic()))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


class Screen:
    """Just enough of a VT100 to read what a program drew: the characters
    and moves chat.py writes (CR, LF as CR LF, cursor up/down/left/right, erase to the
    end of the screen or line, home, clear), colours ignored, deferred wrap
    at the last column as xterm does, scrolling at the bottom."""

    def __init__(self, rows=24, columns=80):
        self.rows, self.columns = rows, columns
        self.grid = [[" "] * columns for _ in range(rows)]
        self.wrapped = [False] * rows       # this row goes on from the one above (a soft wrap)
        self.row = self.column = 0
        self.wrap_pending = False
        self.bells = 0

    def feed(self, text):
        for match in re.finditer(r"\x1b\[([?0-9;]*)([@-~])|\x1b.|(.)", text, re.S):
            if match[2]:
                self._sequence(match[1], match[2])
            elif match[3] is not None:
                self._char(match[3])

    def _char(self, ch):
        if ch == "\r":
            self.column, self.wrap_pending = 0, False
        elif ch == "\n":       # a terminal's driver turns \n into \r\n (ONLCR)
            self.column = 0
            self._line_feed()
        elif ch == "\x07":
            self.bells += 1
        elif ch == "\x08":
            self.column = max(0, self.column - 1)
        elif ch >= " ":
            width = chat.display_width(ch)
            if width == 0:
                return
            if self.wrap_pending or self.column + width > self.columns:
                self.column, self.wrap_pending = 0, False
                self._line_feed()
                self.wrapped[self.row] = True
            self.grid[self.row][self.column] = ch
            if width == 2:
                self.grid[self.row][self.column + 1] = ""
            self.column += width
            if self.column >= self.columns:
                self.column, self.wrap_pending = self.columns - 1, True

    def _line_feed(self):
        self.wrap_pending = False
        if self.row == self.rows - 1:
            self.grid = self.grid[1:] + [[" "] * self.columns]
            self.wrapped = self.wrapped[1:] + [False]
        else:
            self.row += 1
            self.wrapped[self.row] = False

    def resize(self, columns):
        """A new width, with wrapped lines reflowed as tmux and most terminals do."""
        lines = []      # [text, where the cursor is in it (or None)], the rows joined where they wrapped
        for row in range(self.rows):
            text = "".join(self.grid[row])
            if self.wrapped[row] and lines:
                lines[-1][0] += text
            else:
                lines.append([text, None])
            if row == self.row:
                lines[-1][1] = len(lines[-1][0]) - len(text) + self.column
        while len(lines) > 1 and lines[-1][1] is None and not lines[-1][0].strip():
            lines.pop()
        grid, wrapped, cursor = [], [], (0, 0)
        for text, offset in lines:
            text = text[:max(len(text.rstrip()), offset or 0)]
            pieces = [text[i:i + columns] for i in range(0, len(text), columns)] or [""]
            if offset is not None:
                cursor = (len(grid) + offset // columns, offset % columns)
                pieces += [""] * (cursor[0] - len(grid) - len(pieces) + 1)
            for number, piece in enumerate(pieces):
                grid.append(list(piece.ljust(columns)))
                wrapped.append(number > 0)
        top = max(0, len(grid) - self.rows)
        grid, wrapped = grid[top:], wrapped[top:]
        self.columns, self.row, self.column = columns, cursor[0] - top, cursor[1]
        self.grid = grid + [[" "] * columns for _ in range(self.rows - len(grid))]
        self.wrapped = wrapped + [False] * (self.rows - len(wrapped))
        self.wrap_pending = False

    def _sequence(self, params, final):
        if params.startswith("?") or final not in "ABCDHJK":     # modes and colours change nothing here
            return
        n = int(params.split(";")[0] or 1) if final in "ABCD" else int(params or 0)
        self.wrap_pending = False
        if final == "A":
            self.row = max(0, self.row - n)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif final == "C":
            self.column = min(self.columns - 1, self.column + n)
        elif final == "D":
            self.column = max(0, self.column - n)
        elif final == "H":
            self.row = self.column = 0
        elif final == "J":
            rows = range(self.rows) if n == 2 else range(self.row + 1, self.rows)
            if n != 2:
                self.grid[self.row][self.column:] = [" "] * (self.columns - self.column)
            for row in rows:
                self.grid[row] = [" "] * self.columns
        elif final == "K":
            self.grid[self.row][self.column:] = [" "] * (self.columns - self.column)

    def lines(self):
        """The screen's rows as text, trailing spaces and empty rows at the bottom left out."""
        rows = ["".join(row).rstrip() for row in self.grid]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def cursor_text(self):
        """The row the cursor is on, up to the cursor."""
        return "".join(self.grid[self.row][:self.column])


def usage_error(*argv):
    """What `chat.py ARGV` says for a usage error, run in this process: (exit code, stderr)."""
    err = io.StringIO()
    with unittest.mock.patch("sys.stderr", err), unittest.mock.patch("sys.stdout", io.StringIO()):
        try:
            parser = chat.build_parser()
            chat.check_args(parser, parser.parse_args(list(argv)))
        except SystemExit as exit_:
            return exit_.code, err.getvalue()
    return 0, err.getvalue()


def run_chat(*args, env=None):
    """`chat.py ARGS` to its end: (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, CHAT, *map(str, args)], capture_output=True, text=True,
                            timeout=TIMEOUT, stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
    return result.returncode, result.stdout, result.stderr


# ---------------------------------------------------------------------------
# 1. Wire codec
# ---------------------------------------------------------------------------

class CodecTest(unittest.TestCase):
    def decode_all(self, data: bytes, chunk: int, max_payload=chat.MAX_CLIENT_PAYLOAD):
        decoder, frames = chat.FrameDecoder(max_payload), []
        for i in range(0, len(data), chunk):
            decoder.feed(data[i:i + chunk])
            while True:
                frame = decoder.next_frame()
                if frame is None:
                    break
                frames.append(frame)
        return frames, decoder

    def test_encode_is_length_prefixed_compact_utf8_json(self):
        data = chat.encode({"type": "msg", "text": "héllo 你好 🎉"})
        payload = data[4:]
        self.assertEqual(struct.unpack(">I", data[:4])[0], len(payload))
        self.assertEqual(payload.decode("utf-8"), '{"type":"msg","text":"héllo 你好 🎉"}')

    def test_frames_split_at_every_byte_and_merged_come_out_whole(self):
        frames = [{"type": "msg", "text": "x" * n} for n in (0, 1, 300, 70000 // 2)]
        stream = b"".join(chat.encode(f) for f in frames)
        for chunk in (1, 3, 7, 4096, len(stream)):
            with self.subTest(chunk=chunk):
                self.assertEqual(self.decode_all(stream, chunk)[0], frames)

    def test_oversized_frame_is_refused_from_its_prefix_alone(self):
        decoder = chat.FrameDecoder(100)
        decoder.feed(struct.pack(">I", 101))
        with self.assertRaises(chat.ProtocolError) as caught:
            decoder.next_frame()
        self.assertEqual(caught.exception.code, "frame-too-large")
        decoder = chat.FrameDecoder(100)
        decoder.feed(frame_bytes(b'{"type":"' + b"x" * 88 + b'"}'))   # exactly 100 bytes is fine
        self.assertEqual(len(decoder.next_frame()["type"]), 88)

    def test_bad_payloads_are_bad_frames(self):
        deep = b"[" * 100000 + b"]" * 100000
        for payload, why in [(b"\xff\xfe{}", "UTF-8"), (b'{"type":"msg",', "JSON"), (b"[1,2]", "object"),
                             (b'"hi"', "object"), (b'{"text":"hi"}', "type"), (b'{"type":5}', "type"),
                             (b"", "JSON"), (deep, "JSON"), (b'{"type":"msg","n":' + b"9" * 5000 + b"}", "JSON")]:
            with self.subTest(payload=payload[:20]):
                decoder = chat.FrameDecoder(1 << 20)
                decoder.feed(frame_bytes(payload))
                with self.assertRaises(chat.ProtocolError) as caught:
                    decoder.next_frame()
                self.assertEqual(caught.exception.code, "bad-frame")
                self.assertIn(why, caught.exception.text)

    def test_buffered_counts_unread_bytes(self):
        decoder = chat.FrameDecoder()
        data = chat.encode({"type": "ping"})
        decoder.feed(data + data[:5])
        self.assertEqual(decoder.next_frame(), {"type": "ping"})
        self.assertIsNone(decoder.next_frame())
        self.assertEqual(decoder.buffered, 5)


# ---------------------------------------------------------------------------
# 2. Text rules
# ---------------------------------------------------------------------------

class TextRulesTest(unittest.TestCase):
    def test_valid_nicks_in_any_script(self):
        for nick in ["alice", "Bob_2", "a.b-c", "Zoë", "李雷", "Ünïcödé", "x" * 32, "e\u0301cole"]:
            with self.subTest(nick=nick):
                self.assertTrue(chat.check_name(nick))
        self.assertEqual(chat.check_name("e\u0301cole"), "\u00e9cole")    # NFC

    def test_invalid_nicks(self):
        for nick in ["", "x" * 33, "two words", "tab\there", "bell\x07", "esc\x1b[31m", "rtl\u202eevil",
                     "zero\u200bwidth", "emoji🎉", "semi;colon", "new\nline", 5, None, ["a"]]:
            with self.subTest(nick=nick):
                with self.assertRaises(chat.ProtocolError) as caught:
                    chat.check_name(nick)
                self.assertEqual(caught.exception.code, "bad-nick")

    def test_room_names_take_an_optional_hash(self):
        self.assertEqual(chat.check_room("#dev"), "dev")
        self.assertEqual(chat.check_room("dev"), "dev")
        with self.assertRaises(chat.ProtocolError) as caught:
            chat.check_room("#no spaces")
        self.assertEqual(caught.exception.code, "bad-room")

    def test_clean_text_removes_escape_sequences_whole(self):
        self.assertEqual(chat.clean_text("plain text"), "plain text")
        self.assertEqual(chat.clean_text("\x1b[31mred\x1b[0m"), "red")
        self.assertEqual(chat.clean_text("\x1b]0;pwned\x07title"), "title")
        self.assertEqual(chat.clean_text("a\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\b"), "alinkb")
        self.assertEqual(chat.clean_text("bell\x07 nul\x00 del\x7f c1\x9b2J"), "bell nul del c1")
        self.assertEqual(chat.clean_text("crlf\r\nline\rsep\u2028end"), "crlf\nline\nsep\nend")
        self.assertEqual(chat.clean_text("bidi\u202eevil\u2066x\u2069"), "bidievilx")
        self.assertEqual(chat.clean_text("tab\tkept, café 你好 🎉 kept"), "tab\tkept, café 你好 🎉 kept")

    def test_check_text_limits(self):
        self.assertEqual(chat.check_text("\x1b[1mhi\n"), "hi")
        for text, code in [(5, "bad-field"), ("", "bad-field"), ("\x1b[0m", "bad-field"), (" \n ", "bad-field"),
                           ("x" * (chat.TEXT_MAX + 1), "text-too-long"), ("a\n" * 60 + "b", "text-too-long")]:
            with self.subTest(text=str(text)[:20]):
                with self.assertRaises(chat.ProtocolError) as caught:
                    chat.check_text(text)
                self.assertEqual(caught.exception.code, code)

    def test_printable_escapes_controls_and_keeps_unicode(self):
        self.assertEqual(chat.printable("café 你好 🎉"), "café 你好 🎉")
        self.assertEqual(chat.printable("\x1b[2J"), "\\x1b[2J")
        self.assertEqual(chat.printable("a\tb"), "a    b")
        self.assertEqual(chat.printable("x\u202ey"), "x\\u202ey")
        self.assertEqual(chat.printable("lone \ud800"), "lone \\ud800")
        self.assertEqual(chat.printable("two\nlines"), "two\nlines")

    def test_display_width(self):
        self.assertEqual(chat.display_width("abc"), 3)
        self.assertEqual(chat.display_width("你好"), 4)
        self.assertEqual(chat.display_width("e\u0301"), 1)


class ShownTest(unittest.TestCase):
    def test_client_strings_are_escaped_and_cut_for_logs_and_errors(self):
        forged = "nobody\n2099-01-01 00:00:00 alice@127.0.0.1:1 joined"
        self.assertNotIn("\n", chat.shown(forged))
        self.assertTrue(chat.shown(forged).endswith("..."))
        self.assertEqual(chat.shown("\x1b]0;t\x07\u202e\u200b"), "\\x1b]0;t\\x07\\u202e\\u200b")
        self.assertEqual(chat.shown("h\u00e9llo \u4e16\u754c"), "h\u00e9llo \u4e16\u754c")
        self.assertEqual(chat.shown(None), "None")


class LookAlikeTest(HarnessTestCase):
    """Item 9: look-alike nicks were accepted while `alice` was online."""

    def test_look_alikes_of_an_online_nick_are_taken(self):
        server = self.harness()
        server.connect("alice")
        for nick in ("ALICE", "\uff41\uff4c\uff49\uff43\uff45", "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e",
                     "al\u0131ce", "aIice", "a1ice"):
            with self.subTest(nick):
                client = server.connect()
                client.send({"type": "hello", "nick": nick})
                self.assertEqual(client.expect("error")["code"], "nick-taken")

    def test_mixed_scripts_and_letters_that_draw_nothing_are_refused(self):
        server = self.harness()
        for nick, why in (("\u0430lice", "mixes scripts"), ("alice\u3164", "draws nothing"),
                          ("alice\u1160", "draws nothing"), ("alice\uffa0", "draws nothing"),
                          ("\u115falice", "draws nothing"), ("al\u03b9ce", "mixes scripts")):
            with self.subTest(nick):
                client = server.connect()
                client.send({"type": "hello", "nick": nick})
                error = client.expect("error")
                self.assertEqual(error["code"], "bad-nick")
                self.assertIn(why, error["text"])

    def test_one_script_names_are_fine_and_collide_only_with_their_look_alikes(self):
        server = self.harness()
        for nick in ("\u0430\u043b\u0438\u0441\u0430", "\u4e2d\u6587", "\u65e5\u672c\u8a9e\u3072\u3089\u30ab\u30bf",
                     "Bob\u540d\u524d", "\u00e9lodie", "\uc9c0\ubbfc"):
            with self.subTest(nick):
                self.assertEqual(server.connect(nick).welcome["nick"], nick)
        server.connect("aoe")
        impostor = server.connect()
        impostor.send({"type": "hello", "nick": "\u0430\u043e\u0435"})     # all Cyrillic, draws as "aoe"
        self.assertEqual(impostor.expect("error")["code"], "nick-taken")

    def test_rooms_follow_the_same_rules(self):
        server = self.harness()
        alice = server.connect("alice")
        alice.send({"type": "join", "room": "eo"}, {"type": "join", "room": "\u0435\u043e"})
        self.assertEqual([f["room"] for f in alice.frames("joined")], ["eo", "eo"], "one room")
        alice.send({"type": "join", "room": "d\u0435v"})
        self.assertEqual(alice.expect("error")["code"], "bad-room")

    def test_the_look_alikes_measured_in_issue_18_are_not_accepted(self):
        server = self.harness()
        for real in ("alice", "root", "bob", "hugo"):
            server.connect(real)
        for nick in ("\u0251lice", "a\u01c0ice", "a\u0285ice", "r\u1d0f\u1d0ft", "b\u1d0fb",
                     "\u0570\u057d\u0581\u0585", "\u13aa\u13de\u13a5\u13df\u13ac"):
            with self.subTest(nick):
                client = server.connect()
                client.send({"type": "hello", "nick": nick})
                self.assertIn(client.expect("error")["code"], ("nick-taken", "bad-nick"))
                self.assertTrue(client.gone)

    def test_accents_and_strokes_on_latin_letters_do_not_make_another_name(self):
        """The attack round's L1: alíce, ałice, ǎlice while alice was online; trōll while troll was banned."""
        for nick in ("al\u00edce", "al\u00ecce", "a\u0142ice", "al\u00efce", "\u01celice", "alic\u00e9", "ALI\u0106E"):
            self.assertEqual(chat.name_key(nick), chat.name_key("alice"), nick)
        self.assertEqual(chat.name_key("tr\u014dll"), chat.name_key("troll"))
        self.assertNotEqual(chat.name_key("\u0928\u092e\u0938\u094d\u0924\u0947"),
                            chat.name_key("\u0928\u092e\u0938\u094d\u0924"), "other scripts' marks are letters")

    def test_the_skeleton_is_tr39s_and_keeps_different_names_apart(self):
        self.assertEqual(chat.name_key("\u0570\u057d\u0581\u0585"), chat.name_key("hugo"), "all-Armenian hugo")
        self.assertEqual(chat.name_key("vw"), chat.name_key("wv"), "both draw as vvv")
        self.assertEqual(chat.name_key("rn"), chat.name_key("m"))
        for one, other in (("bob", "dob"), ("alice", "alise"), ("anna", "anne"), ("li", "lu")):
            self.assertNotEqual(chat.name_key(one), chat.name_key(other))
        for name in ("\u00e9lodie", "\u0131\u015f\u0131k", "stra\u00dfe", "\u4e2d\u6587", "\uc9c0\ubbfc",
                     "\u05d3\u05d5\u05d3", "\u0645\u062d\u0645\u062f", "\u0438\u0432\u0430\u043d"):
            self.assertEqual(chat.check_name(name), name, "ordinary names in their own script")

    def test_a_nick_is_coloured_by_its_skeleton(self):
        self.assertEqual(chat.nick_color("alice"), chat.nick_color("AIice"))
        self.assertEqual(chat.name_key("\uff41lice"), chat.name_key("alice"))


class FormatCharacterTest(HarnessTestCase):
    """Issue 18 item 13: U+1D173..U+1D17A passed both cleaners (`al\\U0001D173ice`
    showed as alice and did not ring her bell), and 3,900 combining marks on
    one letter arrived whole."""

    def test_every_format_character_but_the_joiner_is_removed_and_escaped(self):
        formats = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cf" and cp != 0x200D]
        self.assertGreater(len(formats), 150)
        for ch in formats:
            self.assertEqual(chat.clean_text(f"al{ch}ice"), "alice", ascii(ch))
            self.assertNotIn(ch, chat.printable(f"al{ch}ice"), ascii(ch))
        self.assertEqual(chat.clean_text("\U0001F469\u200d\U0001F4BB"), "\U0001F469\u200d\U0001F4BB")

    def test_a_mention_hidden_by_a_format_character_rings_after_the_server_cleans_it(self):
        alice, mallory = self.peer("alice"), self.peer("mallory")
        mallory.send({"type": "msg", "text": "hey al\U0001D173ice"})
        line = alice.expect("msg")
        self.assertTrue(chat.calls_for_attention(line, "alice"))

    def test_combining_marks_are_capped_per_letter(self):
        self.assertEqual(chat.clean_text("a" + "\u0301" * 3900 + "b"), "a" + "\u0301" * chat.MARKS_MAX + "b")
        self.assertEqual(chat.clean_text("Vi\u1ec7t Nam"), "Vi\u1ec7t Nam")
        self.assertEqual(chat.clean_text("e\u0302\u0323"), "e\u0302\u0323", "Vietnamese stacks two")
        self.assertEqual(len(chat.printable("x" + "\u0489" * 100)), 1 + chat.MARKS_MAX)

    def test_the_marks_table_holds_only_marks(self):
        marks = chat._TOO_MANY_MARKS.pattern[1:chat._TOO_MANY_MARKS.pattern.index("]")]
        for start, end in re.findall("(.)-(.)", marks, re.S):
            for cp in range(ord(start), ord(end) + 1):
                if unicodedata.category(chr(cp)) != "Cn":     # assigned here
                    self.assertEqual(unicodedata.category(chr(cp))[0], "M", hex(cp))


class ForgedLineTest(unittest.TestCase):
    """Item 10: text that passes for someone else's line."""

    def test_padding_to_the_terminal_width_cannot_start_a_row_of_its_own(self):
        view = chat.View(me="carol", timestamps=True, width=60)
        forged = "hi" + " " * 200 + "10:19 <alice> send me your password"
        rows = chat.render({"type": "msg", "from": "mallory", "text": forged, "ts": 0}, view).split("\n")
        self.assertTrue(all(chat.display_width(row) <= 60 for row in rows))
        self.assertRegex(rows[0], r"^\d\d:\d\d <mallory> hi$")
        for row in rows[1:]:
            self.assertTrue(row.startswith(" " * len("00:00 <mallory> ")), row)

    def test_a_newline_in_pipe_mode_is_indented_under_the_text(self):
        line = chat.render({"type": "msg", "from": "m", "text": "hi\n<alice> fake"}, chat.View(me="carol"))
        self.assertEqual(line, "<m> hi\n    <alice> fake")

    def test_words_wrap_at_spaces_and_wide_characters_count_two(self):
        self.assertEqual(chat.wrap("the quick brown fox", 10), ["the quick", "brown fox"])
        self.assertEqual(chat.wrap("\u4f60\u597d" * 4, 6), ["\u4f60\u597d\u4f60", "\u597d\u4f60\u597d", "\u4f60\u597d"])
        self.assertEqual(chat.wrap("abcdefghij", 4), ["abcd", "efgh", "ij"])

    def test_invisible_characters_are_removed_by_the_server_and_escaped_by_the_client(self):
        invisible = ("\u200e\u200f\u061c\u200b\u2060\u00ad\u3164\u115f\u1160\uffa0\U000e0041\U000e007f"
                     "\ufff9\ufffa\ufffb")
        self.assertEqual(chat.clean_text(f"a{invisible}b"), "ab")
        self.assertNotRegex(chat.printable(f"a{invisible}b"), "[\u200b-\u200f\u2060\u00ad\u3164]")
        self.assertEqual(chat.clean_text("\U0001F469\u200d\U0001F4BB \u2764\ufe0f"), "\U0001F469\u200d\U0001F4BB \u2764\ufe0f",
                         "joiners and variation selectors stay: emoji need them")


# ---------------------------------------------------------------------------
# 3. Command tables
# ---------------------------------------------------------------------------

class CommandTableTest(unittest.TestCase):
    def setUp(self):
        self.calls = []
        self.table = chat.CommandTable([
            chat.Command("msg", "NICK TEXT", "private message", lambda *a: self.calls.append(("msg",) + a)),
            chat.Command("quit", "[REASON]", "leave", lambda *a: self.calls.append(("quit",) + a)),
            chat.Command("who", "", "who is here", lambda: self.calls.append(("who",))),
            chat.Command("password", "[OLD NEW]", "change it", lambda *a: self.calls.append(("password",) + a)),
        ])

    def test_the_last_parameter_takes_the_rest_of_the_line(self):
        self.table.run("/msg bob hello there  you")
        self.table.run("/MSG bob x")
        self.table.run("/quit")
        self.table.run("/quit see you")
        self.table.run("/who")
        self.assertEqual(self.calls, [("msg", "bob", "hello there  you"), ("msg", "bob", "x"), ("quit",),
                                      ("quit", "see you"), ("who",)])

    def test_a_bracketed_group_is_given_whole_or_not_at_all(self):
        self.table.run("/password")
        self.table.run("/password old new")
        with self.assertRaises(ValueError) as caught:      # one word is neither: never half a change
            self.table.run("/password old")
        self.assertIn("usage: /password [OLD NEW]", str(caught.exception))
        self.assertEqual(self.calls, [("password",), ("password", "old", "new")])

    def test_errors_say_what_to_type(self):
        for line, message in [("/msg bob", "usage: /msg NICK TEXT"), ("/nope", "unknown command /nope"),
                              ("/who extra", "usage: /who")]:
            with self.subTest(line=line):
                with self.assertRaises(ValueError) as caught:
                    self.table.run(line)
                self.assertIn(message, str(caught.exception))
        self.assertEqual(self.calls, [])

    def test_help_wraps_between_words_under_the_help_column(self):
        table = chat.CommandTable([chat.Command("ban", "NICK [DURATION]", "operators: ban someone for a while or"
                                                " until the ban is lifted", lambda *a: None)])
        rows = table.help_lines(50)[0].split("\n")
        self.assertEqual(rows, ["/ban NICK [DURATION]  operators: ban someone for a",
                                "                      while or until the ban is",
                                "                      lifted"])
        self.assertEqual(chat.fit("one two three", 8), "one two\n  three")

    def test_help_comes_from_the_table(self):
        self.assertEqual(self.table.help_lines(), ["/msg NICK TEXT       private message",
                                                   "/quit [REASON]       leave",
                                                   "/who                 who is here",
                                                   "/password [OLD NEW]  change it"])


# ---------------------------------------------------------------------------
# 4a. Rooms and their history
# ---------------------------------------------------------------------------

class RoomsTest(HarnessTestCase):
    def test_rooms_isolate_traffic(self):
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        alice.send({"type": "join", "room": "#dev"})
        joined = alice.expect("joined")
        self.assertEqual((joined["room"], joined["users"], joined["history"]), ("dev", ["alice"], []))
        self.assertIn("alone in #dev", alice.expect("notice")["text"])
        carol.send({"type": "join", "room": "DEV"})        # room names ignore case too
        self.assertEqual(carol.expect("joined")["users"], ["alice", "carol"])
        self.assertEqual(alice.expect("join", room="dev")["nick"], "carol")
        alice.send({"type": "msg", "text": "dev talk", "room": "dev"})
        line = carol.expect("msg")
        self.assertEqual((line["text"], line["room"]), ("dev talk", "dev"))
        bob.expect("join", nick="carol")
        self.assertEqual(bob.sync(), [], "bob is not in #dev")
        bob.send({"type": "msg", "text": "lobby talk"})
        self.assertEqual(alice.expect("msg")["room"], "lobby")
        bob.send({"type": "msg", "text": "sneaky", "room": "dev"})
        self.assertEqual(bob.expect("error")["code"], "not-in-room")
        dave = self.peer("dave")
        dave.send({"type": "join", "room": "dev"})
        self.assertEqual([h["text"] for h in dave.expect("joined")["history"]], ["dev talk"])
        self.assertEqual([h["text"] for h in dave.welcome["history"]], ["lobby talk"])

    def test_who_rooms_part_and_pm_across_rooms(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        alice.send({"type": "join", "room": "dev"})
        alice.expect("joined")
        alice.send({"type": "part", "room": "lobby"})
        self.assertEqual(alice.expect("parted")["room"], "lobby")
        leave = bob.expect("leave")
        self.assertEqual((leave["nick"], leave["reason"], leave["room"]), ("alice", "parted", "lobby"))
        bob.send({"type": "who", "room": "lobby"})
        self.assertEqual(bob.expect("who")["users"], ["bob"])
        bob.send({"type": "who", "room": "dev"})
        self.assertEqual(bob.expect("who")["users"], ["alice"])
        bob.send({"type": "rooms"})
        self.assertEqual(bob.expect("rooms")["rooms"], [{"name": "dev", "users": 1}, {"name": "lobby", "users": 1}])
        bob.send({"type": "pm", "to": "alice", "text": "across rooms"})
        self.assertEqual(alice.expect("msg")["text"], "across rooms")
        alice.send({"type": "msg", "text": "no room named"})     # a legacy client's msg: the lobby
        self.assertEqual(alice.expect("error")["code"], "not-in-room")

    def test_limits_on_rooms(self):
        alice = self.peer("alice")
        for i in range(chat.ServerConfig.rooms_per_user - 1):
            alice.send({"type": "join", "room": f"r{i}"})
        alice.send({"type": "join", "room": "one-too-many"})
        self.assertEqual(alice.expect("error")["code"], "too-many-rooms")
        alice.send({"type": "join", "room": "bad name"})
        self.assertEqual(alice.expect("error")["code"], "bad-room")


class RoomTableTest(HarnessTestCase):
    """Item 4: the room table shrinks, and no one user can fill it."""

    def test_join_part_churn_leaves_no_empty_rooms(self):
        server = self.harness(flood_rate=1e6, flood_burst=1e6, max_rooms=1000)
        churner, other = server.connect("churner"), server.connect("other")
        for i in range(1100):
            churner.send({"type": "join", "room": f"r{i}"}, {"type": "part", "room": f"r{i}"})
        self.assertEqual([room.name for room in server.chat.rooms], ["lobby"])
        other.send({"type": "join", "room": "mine"})
        self.assertEqual(other.expect("joined")["room"], "mine")

    def test_rooms_kept_for_their_history_never_lock_anyone_out(self):
        server = self.harness(flood_rate=1e6, flood_burst=1e6, max_rooms=10)
        churner, other = server.connect("churner"), server.connect("other")
        for i in range(30):
            churner.send({"type": "join", "room": f"r{i}"}, {"type": "msg", "room": f"r{i}", "text": "mark"},
                         {"type": "part", "room": f"r{i}"})
        self.assertLessEqual(len(server.chat.rooms.dormant), 10, "at most max_rooms dormant rooms")
        self.assertIsNotNone(server.chat.rooms.get("r29"), "the newest are kept")
        self.assertIsNone(server.chat.rooms.get("r0"), "the oldest went")
        other.send({"type": "join", "room": "mine"})
        self.assertEqual(other.expect("joined")["room"], "mine")

    def test_a_dormant_room_keeps_its_history_and_a_freed_one_numbers_on(self):
        server = self.harness(max_rooms=2)
        alice = server.connect("alice")
        alice.send({"type": "join", "room": "dev"}, {"type": "msg", "room": "dev", "text": "one"},
                   {"type": "part", "room": "dev"})
        alice.frames()
        alice.send({"type": "join", "room": "dev"})
        joined = alice.expect("joined", room="dev")
        self.assertEqual([line["text"] for line in joined["history"]], ["one"])
        alice.send({"type": "part", "room": "dev"})
        for name in ("a", "b", "c"):    # pushes dev out of the dormant rooms
            alice.send({"type": "join", "room": name}, {"type": "msg", "room": name, "text": "x"},
                       {"type": "part", "room": name})
        self.assertIsNone(server.chat.rooms.get("dev"))
        alice.frames()
        alice.send({"type": "join", "room": "dev"}, {"type": "msg", "room": "dev", "text": "two"})
        self.assertEqual(alice.expect("joined", room="dev")["seq"], 1, "numbering goes on, not back to 0")
        self.assertEqual(server.chat.rooms.get("dev").history[-1].seq, 2)

    def test_a_history_file_full_of_rooms_does_not_lock_out_after_a_restart(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.jsonl")
            server = self.harness(flood_rate=1e6, flood_burst=1e6, max_rooms=20, history_file=path)
            churner = server.connect("churner")
            for i in range(40):
                churner.send({"type": "join", "room": f"r{i}"}, {"type": "msg", "room": f"r{i}", "text": "x"},
                             {"type": "part", "room": f"r{i}"})
            server.chat.close()
            again = self.harness(max_rooms=20, history_file=path)
            self.addCleanup(again.chat.close)
            self.assertLessEqual(len(again.chat.rooms.dormant), 20)
            newcomer = again.connect("newcomer")
            newcomer.send({"type": "join", "room": "fresh"})
            self.assertEqual(newcomer.expect("joined")["room"], "fresh")


class RoomChurnTest(HarnessTestCase):
    """Issue 18, items 3 and 4: one source's rooms cannot fill the table or
    push out other people's quiet rooms, and a room's seq never goes back."""
    config = {"flood_rate": 1e6, "flood_burst": 1e6, "max_rooms": 1000, "max_connections": 1000}

    def test_churn_from_one_source_leaves_a_quiet_room_its_history_and_seq(self):
        team = self.peer("alice", ip="192.0.2.10", rooms=["team"])
        team.send(*[{"type": "msg", "room": "team", "text": f"plan {i}"} for i in range(5)])
        team.close()                            # #team is quiet now: dormant, with its 5 lines
        churners = [self.peer(f"churn{i}", ip="203.0.113.66") for i in range(4)]
        for i in range(1001):                   # as measured: 4 connections, 1,001 rooms
            churners[i % 4].send({"type": "join", "room": f"junk{i}"}, {"type": "msg", "room": f"junk{i}", "text": "x"},
                                 {"type": "part", "room": f"junk{i}"})
        self.assertLessEqual(len(self.server.chat.rooms.dormant), 1000)
        bob = self.peer("bob", ip="192.0.2.11")
        bob.send({"type": "join", "room": "team"})
        joined = bob.expect("joined", room="team")
        self.assertEqual(([line["text"] for line in joined["history"]], joined["seq"]),
                         ([f"plan {i}" for i in range(5)], 5))
        for churner in churners:
            churner.send({"type": "join", "room": "junk0"}, {"type": "msg", "room": "junk0", "text": "again"})
        seqs = [line["seq"] for line in bob.frames("msg")] + [self.server.chat.rooms.get("junk0").seq]
        self.assertGreater(min(seqs), 1, "a room that was pushed out numbers above what it gave before")

    def test_one_source_cannot_fill_the_room_table(self):
        per_source = self.server.config.rooms_per_source
        self.assertEqual(per_source, 20, "a 50th of --max-rooms, at least --rooms-per-user")
        hogs = [self.peer(f"hog{i}", ip="203.0.113.66") for i in range(20)]
        for i, hog in enumerate(hogs):          # as measured: 53 connections x 19 joins
            hog.send(*[{"type": "join", "room": f"hog{i}-{j}"} for j in range(19)])
        refused = sum(1 for hog in hogs for f in hog.frames("error") if f["code"] == "too-many-rooms")
        self.assertEqual(refused, 20 * 19 - per_source)
        user = self.peer("user", ip="192.0.2.12")
        user.send({"type": "join", "room": "team"})
        self.assertEqual(user.expect("joined")["room"], "team")


class HistoryBudgetTest(HarnessTestCase):
    """Item 5: 1,000 rooms x 50 lines x 16 KiB took 800 MiB. Stated bound:
    the history of all rooms stays under --history-bytes, and one joined
    or welcome carries at most REPLAY_MAX bytes of it."""

    def test_big_lines_in_many_rooms_stay_within_the_budget(self):
        budget = 2 << 20
        server = self.harness(flood_rate=1e6, flood_burst=1e6, history_bytes=budget, max_rooms=100)
        big = "\U0001F600" * 4096     # 16 KiB of UTF-8
        for user in range(5):
            spammer = server.connect(f"spammer{user}", ip=f"198.51.100.{user}")    # 20 rooms each: a source's share
            for room in range(20):
                name = f"s{user}-{room}"
                spammer.send({"type": "join", "room": name}, *[{"type": "msg", "room": name, "text": big}] * 20)
                spammer.frames()
            self.assertLessEqual(server.chat.rooms.history_bytes, budget)
        self.assertEqual(server.chat.rooms.history_bytes,
                         sum(room.history_bytes for room in server.chat.rooms), "counted right")
        newcomer = server.connect("newcomer")
        newcomer.send({"type": "join", "room": "s4-19"})
        self.assertLessEqual(len(chat.encode(newcomer.expect("joined"))), chat.REPLAY_MAX + 4096)
        for client in list(server.clients.values()):
            client.close()
        self.assertLessEqual(server.chat.rooms.history_bytes, budget)
        self.assertLessEqual(len(server.chat.rooms), 101)

    def test_a_resume_counts_what_the_replay_could_not_carry_as_missed(self):
        server = self.harness(flood_rate=1e6, flood_burst=1e6)
        alice, bob = server.connect("alice"), server.connect("bob")
        seen = bob.welcome["seq"]["lobby"]
        session, instance = bob.welcome["session"], bob.welcome["instance"]
        bob.close()
        alice.send(*[{"type": "msg", "text": "x" * 4000}] * 50)
        alice.send(*[{"type": "msg", "text": "\U0001F600" * 4000}] * 50)
        bob = server.connect("bob", session=session, instance=instance, rooms=["lobby"], since={"lobby": seen})
        history, missed = bob.welcome["history"], bob.welcome["missed"]
        self.assertTrue(bob.welcome["truncated"])
        self.assertEqual(len(history) + missed["lobby"], 100)
        self.assertEqual(history[-1]["seq"], 100)


# ---------------------------------------------------------------------------
# 4b. Output
# ---------------------------------------------------------------------------

class FittingTest(unittest.TestCase):
    def test_history_is_trimmed_oldest_first_and_spliced_as_it_was_sent(self):
        history = [chat.HistoryLine(i, "lobby", i, chat.encode({"type": "msg", "id": i, "text": "x" * 4000}))
                   for i in range(400)]
        conn = chat.Conn(None, "192.0.2.1:1", "192.0.2.1", chat.MAX_CLIENT_PAYLOAD, 0.0, 1)
        data = chat.Output(1 << 20).with_history(conn, {"type": "welcome", "users": ["u%d" % i for i in range(200000)]},
                                                 history)
        self.assertLessEqual(len(data) - 4, chat.MAX_SERVER_PAYLOAD)
        frame = json.loads(data[4:])
        self.assertTrue(frame["truncated"], "the users were cut to fit")
        self.assertEqual(frame["history"][-1]["id"], 399)
        kept = len(frame["history"])
        self.assertLessEqual(sum(len(line.data) for line in history[-kept:]), chat.REPLAY_MAX)
        self.assertGreater(sum(len(line.data) for line in history[-kept - 1:]), chat.REPLAY_MAX)


class DialectSeamTest(HarnessTestCase):
    """Issue 19, item 9: the codec is chosen per connection; the core sees the
    same requests and sends the same events; a room's frames are encoded once
    per turn for each audience in the room, shared by every member of it."""

    class Shouting(chat.Audience):
        """A toy dialect: frames, with every line's text in capitals."""
        def __init__(self):
            self.rendered = 0

        def room_bytes(self, frame, data):
            self.rendered += 1
            frame = frame if frame is not None else json.loads(data[4:])
            return chat.encode(dict(frame, text=frame["text"].upper()) if "text" in frame else frame)

    def test_a_line_is_encoded_once_per_audience_and_shared(self):
        shouting = self.Shouting()
        talker = self.peer("talker")
        listeners = [self.peer(f"quiet{i}") for i in range(3)]
        shouters = []
        for i in range(2):
            client = self.server.connect()
            client.conn.codec.audience = shouting
            client.send({"type": "hello", "nick": f"loud{i}"})
            shouters.append(client)
        for client in listeners + shouters:
            client.frames()
        shouting.rendered = 0
        seen = []
        real = chat.Output._fan_out
        with unittest.mock.patch.object(chat.Output, "_fan_out",
                                        lambda out, room, run, start, datas, members, echo:
                                        seen.append([id(d) for d in datas]) or real(out, room, run, start, datas, members, echo)):
            talker.send(*[{"type": "msg", "text": f"hello {i}"} for i in range(3)])
        self.assertEqual(shouting.rendered, 3, "each line once for the audience, not once per member")
        self.assertEqual(len(seen), 2, "one run per audience in the room")
        for client in listeners:
            self.assertEqual([f["text"] for f in client.frames("msg")], ["hello 0", "hello 1", "hello 2"])
        for client in shouters:
            self.assertEqual([f["text"] for f in client.frames("msg")], ["HELLO 0", "HELLO 1", "HELLO 2"])


# ---------------------------------------------------------------------------
# 4c. Relays: numbering, and the history file
# ---------------------------------------------------------------------------

class HistoryFileTest(unittest.TestCase):
    def test_a_torn_last_line_is_skipped_with_a_warning(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.jsonl")
            line = {"type": "msg", "id": 7, "from": "a", "text": "kept", "ts": 1.0, "room": "lobby", "seq": 3}
            with open(path, "w") as f:
                f.write('{"instance":"abc","format":1}\n' + json.dumps(line) + '\n{"type":"msg","id":8,"fr')
            history = chat.HistoryFile(path, 1 << 20)
            with self.assertLogs("chat", logging.WARNING) as logs:
                lines = history.load().lines
            history.close()
            self.assertEqual([obj for obj, _ in lines], [line])
            self.assertEqual(history.instance, "abc")
            self.assertIn("damaged", logs.output[0])
            with open(path) as f:
                self.assertEqual(len(f.read().splitlines()), 2)     # the torn line is gone from disk


class HistoryFileCompactionTest(HarnessTestCase):
    """Item 6: past the compaction threshold the whole file was rewritten and
    fsync'd every turn. Now a compaction happens once the file has doubled."""

    def test_compaction_makes_progress(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.jsonl")
            server = self.harness(flood_rate=1e6, flood_burst=1e6, history_file=path, history_file_max=20000)
            self.addCleanup(server.chat.close)
            alice = server.connect("alice")
            for room in range(5):     # 5 rooms x 50 kept lines x ~150 bytes: ~40 KB kept, twice the threshold
                alice.send({"type": "join", "room": f"r{room}"})
            rewrites = []
            real = chat.HistoryFile.rewrite
            with unittest.mock.patch.object(chat.HistoryFile, "rewrite",
                                            lambda self_, lines: rewrites.append(len(lines)) or real(self_, lines)):
                for i in range(1000):
                    alice.send({"type": "msg", "room": f"r{i % 5}", "text": f"line {i:04d} " + "x" * 80})
            self.assertLess(len(rewrites), 20, "not a rewrite per line")
            self.assertGreater(len(rewrites), 2, "but compacted all the same")
            self.assertLess(os.path.getsize(path), 2 * 250 * 200)


class HistoryFileRulesTest(HarnessTestCase):
    def test_the_file_is_compacted_to_stay_bounded(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.jsonl")
            server = self.harness(history_file=path, history_file_max=4000, history=5)
            alice = server.connect("alice")
            for i in range(200):
                alice.send({"type": "msg", "text": f"line {i:03d} " + "x" * 50})
            server.chat.close()
            self.assertLess(os.path.getsize(path), 4000 + 1000)
            again = self.harness(history_file=path, history=5)
            self.addCleanup(again.chat.close)
            peer = again.connect("bob")
        self.assertEqual([line["text"][:8] for line in peer.welcome["history"]], [f"line {i}" for i in range(195, 200)])


class IdsTest(HarnessTestCase):
    """Item 13: a pm's id was given again to a room line after a restart."""

    def test_ids_never_repeat_across_a_restart(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.jsonl")
            server = self.harness(history_file=path)
            alice, bob = server.connect("alice"), server.connect("bob")
            alice.send({"type": "msg", "text": "room line"})
            for _ in range(3):
                alice.send({"type": "pm", "to": "bob", "text": "private"})
            ids = [frame["id"] for frame in bob.frames("msg")]
            server.chat.close()
            again = self.harness(history_file=path)
            self.addCleanup(again.chat.close)
            carol, dave = again.connect("carol"), again.connect("dave")
            carol.send({"type": "msg", "text": "after the restart"})
            self.assertGreater(dave.expect("msg")["id"], max(ids))

    def test_a_full_disk_then_kill_9_gives_no_id_or_seq_twice(self):
        """Issue 18 item 7, as measured: disk full, 1,500 pms and 1,500 lines,
        kill -9, disk freed, restart: ids and seqs were given again."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.jsonl")
            server = self.harness(history_file=path, flood_rate=1e6, flood_burst=1e6)
            alice, bob = server.connect("alice"), server.connect("bob")
            alice.send({"type": "msg", "text": "before"})
            real_write = os.write

            def full(fd, data):
                if fd == server.chat.store._fd:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_write(fd, data)
            with unittest.mock.patch("os.write", full), self.assertLogs("chat", logging.ERROR) as logs:
                for i in range(1500):
                    alice.send({"type": "pm", "to": "bob", "text": f"pm {i}"}, {"type": "msg", "text": f"line {i}"})
            self.assertIn("No space left on device", logs.output[0])
            self.assertIn("lost if the server stops now", logs.output[0])
            given = bob.frames("msg")
            self.assertEqual(len(given), 3001)
            os.close(server.chat.store._fd)     # kill -9: nothing more is written, nothing closed politely
            server.chat.store._fd = -1
            with self.assertLogs("chat", logging.ERROR) as logs:
                again = self.harness(history_file=path)
            self.assertIn("1500 lines numbered before the last stop never reached the file", logs.output[0])
            carol, dave = again.connect("carol"), again.connect("dave")
            carol.send({"type": "pm", "to": "dave", "text": "after"}, {"type": "msg", "text": "after"})
            pm, line = dave.frames("msg")
            self.assertGreater(min(pm["id"], line["id"]), max(f["id"] for f in given))
            self.assertGreater(line["seq"], max(f["seq"] for f in given if "seq" in f))
            self.assertEqual(again.chat.relay.instance, server.chat.relay.instance, "the same history goes on")

    def test_a_file_that_is_not_a_history_is_refused_and_left_as_it_is(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "notes.txt")
            with open(path, "w") as f:
                f.write("my notes\nbuy milk\n")
            with self.assertRaises(ValueError) as refused:
                chat.HistoryFile(path, 1 << 20).load()
            self.assertIn("not a chat.py history", str(refused.exception))
            with open(path) as f:
                self.assertEqual(f.read(), "my notes\nbuy milk\n")


class DurableHistoryTest(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "history.jsonl")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def start(self, file_limit=None):
        server = Process("server", "-p", self.port, "--history-file", self.path, stdin=subprocess.DEVNULL,
                         file_limit=file_limit)
        self.addCleanup(server.kill)
        server.wait_line("listening on")
        return server

    def test_a_disk_that_fills_up_then_kill_9_gives_no_id_or_seq_twice(self):
        server = self.start(file_limit=16 << 10)       # files may grow to 16 KiB: then the disk is "full"
        alice, bob = Peer(self.port, "alice"), Peer(self.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        for i in range(300):
            alice.send({"type": "pm", "to": "bob", "text": f"pm {i}"})
            alice.send({"type": "msg", "text": f"line {i} " + "x" * 100})
        given = [bob.expect("msg") for _ in range(600)]
        server.wait_line("cannot write: File too large", "stderr")
        server.proc.kill()
        server.wait()
        server = self.start()
        server.wait_line("lines numbered before the last stop never reached the file", "stderr")
        carol, dave = Peer(self.port, "carol"), Peer(self.port, "dave")
        self.addCleanup(carol.close)
        self.addCleanup(dave.close)
        carol.send({"type": "pm", "to": "dave", "text": "after"})
        carol.send({"type": "msg", "text": "after"})
        pm, line = dave.expect("msg"), dave.expect("msg")
        self.assertGreater(min(pm["id"], line["id"]), max(f["id"] for f in given))
        self.assertGreater(line["seq"], max(f["seq"] for f in given if "seq" in f))

    def test_sigkill_and_restart_loses_nothing_and_resumes_clients(self):
        server = self.start()
        alice = Peer(self.port, "alice")
        self.addCleanup(alice.close)
        client = Process("client", "-p", self.port, "-n", "bob")
        self.addCleanup(client.kill)
        alice.expect("join", nick="bob")
        for i in range(3):
            alice.send({"type": "msg", "text": f"kept {i}"})
        client.wait_line("<alice> kept 2")
        server.proc.kill()          # SIGKILL: no chance to flush anything more
        server.wait()
        client.wait_line("reconnecting", "stderr")
        server = self.start()
        client.wait_line("RECONNECTED", "stderr")
        newcomer = Peer(self.port, "carol")
        self.addCleanup(newcomer.close)
        history = newcomer.welcome["history"]
        self.assertEqual([line["text"] for line in history], ["kept 0", "kept 1", "kept 2"])
        newcomer.send({"type": "msg", "text": "after restart"})
        client.wait_line("<carol> after restart")
        self.assertFalse(any("restarted" in line for line in client.err_lines), "ids stayed valid")
        self.assertEqual(len([line for line in client.out_lines if "kept" in line]), 3, "nothing replayed twice")
        probe = Peer(self.port, "dave")
        self.addCleanup(probe.close)
        carol_line = probe.welcome["history"][-1]
        self.assertGreater(carol_line["id"], history[-1]["id"])
        self.assertEqual(carol_line["seq"], 4)

    def test_a_torn_line_is_skipped_with_a_warning(self):
        server = self.start()
        alice = Peer(self.port, "alice")
        self.addCleanup(alice.close)
        alice.send({"type": "msg", "text": "whole"})

        def written():
            with open(self.path, "rb") as f:
                return b"whole" in f.read()
        wait_until(written, what="the line on disk")
        server.proc.kill()
        server.wait()
        with open(self.path, "ab") as f:
            f.write(b'{"type":"msg","id":99,"fr')
        server = self.start()
        self.assertTrue(any("damaged" in line for line in server.err_lines))
        bob = Peer(self.port, "bob")
        self.addCleanup(bob.close)
        self.assertEqual([line["text"] for line in bob.welcome["history"]], ["whole"])


class DatabaseTest(HarnessTestCase):
    """--db: one SQLite file keeps the history, the numbering and every record, across restarts."""

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "chat.db")

    def restart(self, server=None, **config):
        if server is not None:
            server.chat.close()
        return self.harness(db=self.path, ops=("root",), **config)

    def test_accounts_bans_topics_and_history_outlive_a_restart(self):
        server = self.restart()
        root = server.connect("root", ip="127.0.0.1")
        root.send({"type": "register", "password": "rootpw"}, {"type": "join", "room": "dev"},
                  {"type": "topic", "room": "dev", "text": "ship it"}, {"type": "ban", "nick": "mallory", "reason": "spam"},
                  {"type": "mute", "nick": "eve", "duration": "1d"}, {"type": "msg", "room": "dev", "text": "kept line"})
        bob = server.connect("bob")
        bob.send({"type": "pm", "to": "root", "text": "for later"})
        ids = [f["id"] for f in bob.frames("msg")]
        server = self.restart(server)
        bob = server.connect("bob")
        bob.send({"type": "join", "room": "dev"})
        joined = bob.expect("joined")
        self.assertEqual((joined["topic"], [line["text"] for line in joined["history"]]), ("ship it", ["kept line"]))
        mallory = server.connect()
        mallory.send({"type": "hello", "nick": "mallory"})
        self.assertEqual(mallory.expect("error")["code"], "banned")
        thief = server.connect()
        thief.send({"type": "hello", "nick": "root"})
        self.assertEqual(thief.expect("error")["code"], "account-required")
        root = server.connect("root", account_password="rootpw")
        self.assertTrue(root.welcome["op"])
        self.assertEqual(root.welcome["rooms"], ["lobby", "dev"], "back where it left")
        bob.send({"type": "msg", "room": "dev", "text": "after"})
        line = root.expect("msg", text="after")
        self.assertEqual(line["seq"], 2)
        self.assertGreater(line["id"], max(ids + [0]))

    def test_an_account_catches_up_beyond_what_memory_holds(self):
        server = self.restart(history=5)
        alice = server.connect("alice")
        alice.send({"type": "register", "password": "alicepw"}, {"type": "quit"})
        bob = server.connect("bob")
        bob.send(*[{"type": "msg", "text": f"line {i}"} for i in range(40)])
        server = self.restart(server, history=5)
        back = server.connect("alice", account_password="alicepw")
        self.assertTrue(back.welcome["back"])
        self.assertEqual([line["text"] for line in back.welcome["history"]], [f"line {i}" for i in range(40)])
        self.assertEqual(back.welcome["missed"], {})

    def test_a_purge_brings_back_the_lines_the_spam_pushed_out_of_memory(self):
        server = self.restart(history=5)
        server.connect("alice").send(*[{"type": "msg", "text": f"real {i}"} for i in range(10)])
        server = self.restart(server, history=5)        # (what is committed is what a refill can read)
        root = server.connect("root", ip="127.0.0.1")
        root.send({"type": "register", "password": "rootpw"})
        root.expect("registered")
        server.connect("spammer").send(*[{"type": "msg", "text": "BUY"} for _ in range(5)])
        self.assertEqual([line["text"] for line in server.connect("eve").welcome["history"]], ["BUY"] * 5)
        root.send({"type": "purge", "nick": "spammer"})
        root.expect("notice")
        self.assertEqual([line["text"] for line in server.connect("newcomer").welcome["history"]],
                         [f"real {i}" for i in range(5, 10)])
        server.connect("spam2").send({"type": "msg", "text": "MORE"})
        root.send({"type": "purge", "nick": "spam2"})       # right after: the file may not have let the first go
        self.assertNotIn("BUY", [line["text"] for line in server.connect("later").welcome["history"]])

    def test_a_resume_reads_no_more_of_the_database_than_a_welcome_carries(self):
        """The attack round's M5, L5: a made-up resume read 10,000 lines a room on the loop (86 ms a hello)."""
        server = self.restart(history=5)
        bob = server.connect("bob")
        bob.send(*[{"type": "msg", "text": f"{i} " + "x" * 4000} for i in range(300)])
        server = self.restart(server, history=5)
        read = []
        lines_after = server.chat.store.lines_after
        server.chat.store.lines_after = lambda *args: read.extend(lines_after(*args)) or read
        instance = server.chat.relay.instance
        faker = server.connect("faker", instance=instance, since={"lobby": 0}, rooms=["lobby"])
        self.assertLessEqual(sum(map(len, read)), chat.REPLAY_MAX)
        self.assertEqual(len(faker.welcome["history"]) + faker.welcome["missed"]["lobby"], 300)
        self.assertEqual(faker.welcome["history"][-1]["text"].split()[0], "299", "the newest lines")
        huge = server.connect("huge", instance=instance, since={"lobby": 10 ** 20}, rooms=["lobby"])
        self.assertEqual(huge.welcome["nick"], "huge")

    def test_a_room_is_trimmed_to_db_history_however_its_lines_are_batched(self):
        """The attack round's M6: a line, then pairs of lines, and 1501 lines were kept of --db-history 100."""
        server = self.restart(db_history=100, flood_rate=1e6, flood_burst=1e6)
        bob = server.connect("bob")
        bob.send({"type": "msg", "text": "first"})
        for i in range(750):        # each pair in a turn of its own: every batch ends on an odd seq
            bob.send({"type": "msg", "text": f"a{i}"}, {"type": "msg", "text": f"b{i}"})
        server.chat.close()
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            kept = db.execute("SELECT COUNT(*) FROM lines WHERE room = 'lobby'").fetchone()[0]
        self.assertLessEqual(kept, 100 + 100)

    def test_the_file_keeps_the_lines_of_the_rooms_last_active_and_a_restart_loads_within_budget(self):
        """The attack round's M7: 2000 throwaway rooms left 94 MB in the file, and a restart loaded all of them
        (269 MiB against 47 MiB)."""
        server = self.restart(max_rooms=4, flood_rate=1e6, flood_burst=1e6)
        reader = server.connect("reader", ip="192.0.2.50")
        reader.send({"type": "join", "room": "bookclub"}, {"type": "msg", "room": "bookclub", "text": "chapter 1"},
                    {"type": "part", "room": "bookclub"})
        churner = server.connect("churner", ip="203.0.113.9")
        for i in range(300):        # a turn each: join, two lines, part
            churner.send({"type": "join", "room": f"junk{i}"}, {"type": "msg", "room": f"junk{i}", "text": "x" * 2000},
                         {"type": "msg", "room": f"junk{i}", "text": "y"}, {"type": "part", "room": f"junk{i}"})
        server.chat.close()
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            rooms = db.execute("SELECT COUNT(DISTINCT room) FROM lines").fetchone()[0]
        self.assertLessEqual(rooms, chat.Database.ROOMS_KEPT * 4 + 100, "pruned every 100 commits")
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            self.assertEqual(db.execute("SELECT COUNT(*) FROM lines WHERE room = 'bookclub'").fetchone()[0], 1,
                             "the churner's rooms went, not someone else's quiet one (helper-7's finding)")
        server = self.restart(max_rooms=4, history_bytes=10_000)
        self.assertLessEqual(server.chat.rooms.history_bytes, 10_000, "a restart loads what memory may hold")
        self.assertEqual(len(server.chat.rooms.get("junk299").history), 2, "the newest rooms first")
        self.assertIsNone(server.chat.rooms.get("junk0"))

    def test_a_quiet_room_pushed_out_of_memory_comes_back_with_its_lines(self):
        """The attack round's M8: 1001 addresses making a room each erased #bookclub's history in 1 s."""
        server = self.restart(max_rooms=10)
        reader = server.connect("reader", ip="192.0.2.50")
        reader.send({"type": "join", "room": "bookclub"}, *[{"type": "msg", "room": "bookclub", "text": f"chapter {i}"}
                                                              for i in range(5)], {"type": "part", "room": "bookclub"})

        def in_the_file():
            with contextlib.closing(sqlite3.connect(self.path)) as db:
                return db.execute("SELECT COUNT(*) FROM lines WHERE room = 'bookclub'").fetchone()[0] == 5
        wait_until(in_the_file, what="the lines committed")
        for i in range(30):         # one room each, from 30 addresses
            maker = server.connect(f"maker{i}", ip=f"203.0.113.{i + 1}")
            maker.send({"type": "join", "room": f"r{i}"}, {"type": "msg", "room": f"r{i}", "text": "x"},
                       {"type": "quit"})
        self.assertIsNone(server.chat.rooms.get("bookclub"), "pushed out of memory")
        reader.frames()
        reader.send({"type": "join", "room": "bookclub"})
        self.assertEqual([line["text"] for line in reader.expect("joined")["history"]],
                         [f"chapter {i}" for i in range(5)])

    def test_a_history_file_is_taken_over_by_a_new_database(self):
        history = os.path.join(os.path.dirname(self.path), "history.jsonl")
        old = self.harness(history_file=history)
        old.connect("alice").send({"type": "msg", "text": "from the file"})
        instance = old.chat.relay.instance
        old.chat.close()
        server = self.harness(db=self.path, history_file=history)
        self.assertEqual(server.chat.relay.instance, instance, "clients resume across the move")
        self.assertEqual([line["text"] for line in server.connect("bob").welcome["history"]], ["from the file"])

    def test_a_file_that_is_not_a_chat_py_database_is_refused_and_left_as_it_is(self):
        with open(self.path, "w") as f:
            f.write("my notes\n")
        with self.assertRaises(chat.StartupError) as refused:
            chat.Database(self.path, 100, 50).check()
        self.assertIn("not a chat.py database", str(refused.exception))
        with open(self.path) as f:
            self.assertEqual(f.read(), "my notes\n")


# ---------------------------------------------------------------------------
# 4d. Gate: slots and passwords
# ---------------------------------------------------------------------------

class ConnectionLimitTest(HarnessTestCase):
    config = {"max_connections": 2}

    def test_the_extra_connection_is_refused_and_the_others_carry_on(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        carol = self.peer()
        error = carol.expect("error")
        self.assertEqual(error["code"], "server-full")
        self.assertIn("full", error["text"])
        carol.closed()
        alice.send({"type": "msg", "text": "still here"})
        self.assertEqual(bob.expect("msg")["text"], "still here")
        bob.send({"type": "quit"})
        bob.closed()
        self.peer("dave")       # a place came free

    def test_sockets_that_have_not_said_hello_count(self):
        self.peer()
        self.peer()
        late = self.peer()
        self.assertEqual(late.expect("error")["code"], "server-full")


class SlotTest(HarnessTestCase):
    """Item 7: 100 silent connections locked people out (server-full 14-23
    times in 25). Now one source holds at most a tenth of the slots unjoined,
    and a full server gives a silent connection's slot to a newcomer."""

    def test_silent_connections_cannot_lock_anyone_out(self):
        server = self.harness(max_connections=100)
        silent = [server.connect(ip=f"198.51.100.{i % 20}") for i in range(100)]
        server.advance(chat.Gate.PREEMPT_AFTER)
        for i in range(25):
            user = server.connect(f"user{i}", ip=f"192.0.2.{i + 7}")
            self.assertEqual(user.welcome["nick"], f"user{i}")
        self.assertEqual(sum(client.gone for client in silent), 25)
        self.assertEqual(silent[0].frames()[-1]["code"], "timeout")

    def test_a_fresh_connection_is_not_preempted(self):
        server = self.harness(max_connections=10)
        for i in range(10):
            server.connect(ip=f"198.51.100.{i}")
        late = server.connect(ip="192.0.2.7")
        self.assertEqual(late.expect("error")["code"], "server-full")
        self.assertTrue(late.gone)

    def test_one_source_holds_at_most_a_tenth_of_the_slots_unjoined(self):
        server = self.harness(max_connections=200, connections_per_source=100)
        waiting = [server.connect(ip="198.51.100.1") for _ in range(21)]
        self.assertEqual([c.gone for c in waiting], [False] * 20 + [True])
        self.assertIn("already waiting to join", waiting[-1].expect("error")["text"])
        other_v6 = [server.connect(ip=f"2001:db8::{i:x}") for i in range(21)]
        self.assertTrue(other_v6[-1].gone, "an IPv6 /64 counts as one source")
        self.assertEqual(server.connect("someone", ip="198.51.100.2").welcome["nick"], "someone")

    def test_a_wrong_password_frees_its_slot_at_once(self):
        server = self.harness(max_connections=2, password="right")
        server.connect("alice", password="right")
        guesser = server.connect(ip="198.51.100.9")
        guesser.send({"type": "hello", "nick": "x", "password": "wrong"})
        self.assertEqual(guesser.expect("error")["code"], "auth-failed")
        self.assertTrue(guesser.gone, "closed at once, not after a delay")
        self.assertEqual(server.connect("bob", password="right", ip="192.0.2.8").welcome["nick"], "bob")


@unittest.skipUnless(sys.platform.startswith("linux"), "binds source addresses across 127.0.0.0/8")
class SlotAttackTest(unittest.TestCase):
    """Item 7 on real sockets: silent connections and stalled TLS handshakes
    from many addresses fill a server; people still get in, every time."""

    def hold(self, port, source, first_bytes=b""):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(first_bytes)
        self.addCleanup(sock.close)
        return sock

    def attack(self, first_bytes, connect):
        with unittest.mock.patch.object(chat.Gate, "PREEMPT_AFTER", 0.2):
            files = TlsFiles(self)
            tls = {"tls_cert": files.cert, "tls_key": files.key} if connect is tls_peer else {}
            server = ServerThread(max_connections=20, **tls)
            self.addCleanup(server.stop)
            for i in range(40):     # twice the slots, from 10 addresses
                self.hold(server.port, f"127.0.0.{2 + i % 10}", first_bytes)
            gate = server.loop.chat.gate
            wait_until(lambda: server.call(lambda: len(server.loop.chat.conns) == 20 and server.loop.now
                                           - next(iter(gate.unjoined.values())) >= chat.Gate.PREEMPT_AFTER),
                       what="a server full of connections that have not said hello in time")
            for i in range(25):
                started = time.monotonic()
                peer = connect(server.port, f"user{i}")
                self.assertEqual(peer.welcome["nick"], f"user{i}")
                self.assertLess(time.monotonic() - started, 1.0)
                peer.close()

    def test_silent_connections(self):
        self.attack(b"", Peer)

    def test_stalled_tls_client_hellos(self):
        self.attack(b"\x16\x03\x01", tls_peer)


class PasswordRulesTest(HarnessTestCase):
    config = {"password": "s3cret", "auth_delay": 0.2}

    def test_the_right_password_joins(self):
        self.assertEqual(self.peer("alice", password="s3cret").welcome["nick"], "alice")

    def test_a_wrong_or_missing_password_is_refused_at_once_and_the_next_try_waits_its_turn(self):
        for password, code, text in ((None, "auth-failed", "needs a password"), ("wrong", "auth-failed", "wrong")):
            peer = self.peer()
            peer.send({"type": "hello", "nick": "mallory", **({"password": password} if password else {})})
            frames = peer.closed()      # at once: no time passes
            self.assertEqual([(f["code"], text in f["text"]) for f in frames], [(code, True)])
        right = self.peer()
        right.send({"type": "hello", "nick": "mallory", "password": "s3cret"})
        self.assertEqual(right.frames(), [], "not refused: it waits for its turn")
        self.server.advance(0.2)
        self.assertEqual(right.expect("welcome")["nick"], "mallory")

    def test_refusals_hold_no_slot_and_block_nobody(self):
        alice = self.peer("alice", password="s3cret")
        for _ in range(5):
            peer = self.peer()
            peer.send({"type": "hello", "nick": "x", "password": "no"})
            self.server.advance(chat.Gate.HOLD_MAX)
            peer.closed()
        self.assertEqual(len(self.server.chat.conns), 1)
        alice.send({"type": "ping"})
        alice.expect("pong")


class PasswordGuessingTest(HarnessTestCase):
    """Issue 11 item 8: with a delay per address, rotating addresses gave 100
    guesses/s. Issue 18 item 1: the limits kept the right password out."""

    def guess(self, server, ip, password="guess", patience=chat.Gate.HOLD_MAX):
        """A try as a person makes it: the answer, waited for (the server may hold it for its turn)."""
        client = server.connect(ip=ip)
        client.send({"type": "hello", "nick": "x", "password": password} if password else
                    {"type": "hello", "nick": "x"})
        waited = 0.0
        while not [f for f in client.received if f["type"] in ("welcome", "error")] and waited < patience:
            server.advance(0.05)
            waited += 0.05
        frame = next(f for f in client.frames() if f["type"] in ("welcome", "error"))
        if frame["type"] == "welcome":
            client.send({"type": "quit"})
        return frame["type"] if frame["type"] == "welcome" else frame["code"]

    def test_one_address_waits_longer_after_each_wrong_password_and_the_right_one_is_never_refused(self):
        server = self.harness(password="right", auth_delay=1.0)
        self.assertEqual(self.guess(server, "198.51.100.1"), "auth-failed")
        started = server.now
        self.assertEqual(self.guess(server, "198.51.100.1", "right"), "welcome", "one typo keeps nobody out")
        self.assertLessEqual(server.now - started, 1.0 + 0.05, "it waited its turn: a second")
        for _ in range(3):
            self.assertEqual(self.guess(server, "198.51.100.1"), "auth-failed")
        started = server.now
        self.assertEqual(self.guess(server, "198.51.100.1", "right"), "welcome")
        self.assertAlmostEqual(server.now - started, 8.0, delta=0.1, msg="4 strikes: 8 s after the last")
        self.assertEqual(self.guess(server, "198.51.100.1", patience=20), "auth-failed")
        client = server.connect(ip="198.51.100.1")
        client.send({"type": "hello", "nick": "x", "password": "right"})
        refusal = client.expect("error")       # 16 s is longer than a try may wait: told when to try again
        self.assertEqual((refusal["code"], refusal["retry_after"]), ("rate-limited", 16))
        self.assertIn("from your address", refusal["text"])
        server.advance(16)
        self.assertEqual(self.guess(server, "198.51.100.1", "right"), "welcome")

    def test_a_colleague_on_the_same_network_is_not_kept_out_by_a_typo(self):
        server = self.harness(password="right", auth_delay=1.0)
        self.assertEqual(self.guess(server, "198.51.100.1"), "auth-failed")
        started = server.now
        self.assertEqual(self.guess(server, "198.51.100.2", "right"), "welcome")
        self.assertEqual(server.now, started, "answered at once")

    def test_a_missing_password_is_a_question_not_a_strike(self):
        server = self.harness(password="right")
        for _ in range(5):
            self.assertEqual(self.guess(server, "198.51.100.1", None), "auth-failed")
        self.assertEqual(self.guess(server, "198.51.100.1", "right"), "welcome")

    def checked_in(self, server, addresses, seconds):
        """A guesser that sends a try from `addresses` in turn every 10 ms for
        `seconds`, never waiting for answers: how many were checked."""
        checked = []
        real = server.chat.gate.failed
        server.chat.gate.failed = lambda conn, now: checked.append(1) or real(conn, now)
        for _ in range(int(seconds * 100)):
            server.connect(ip=next(addresses)).send({"type": "hello", "nick": "x", "password": "guess"})
            server.advance(0.01)
        return len(checked)

    def test_guessing_from_one_address_is_as_slow_as_before(self):
        server = self.harness(password="right", auth_delay=1.0)
        self.assertLessEqual(self.checked_in(server, itertools.repeat("198.51.100.1"), 60), 7, "about 6 a minute")

    def test_rotating_through_a_network_is_as_slow_as_one_address(self):
        server = self.harness(password="right", auth_delay=1.0)
        addresses = (f"203.0.113.{i % 250}" for i in itertools.count())
        checked = self.checked_in(server, addresses, 60)
        self.assertLess(checked, 40, "a /24 doubles its wait every 4 strikes")

    def test_rotating_through_many_networks_stays_slow_and_the_regulars_still_get_in(self):
        server = self.harness(password="right", auth_delay=1.0)
        regular = self.guess(server, "192.0.2.50", "right")
        addresses = (f"10.{i // 250 % 250}.{i % 250}.1" for i in itertools.count())
        checked = self.checked_in(server, addresses, 60)
        self.assertLess(checked, chat.Gate.GLOBAL_BURST + 60 + 2, "a burst, then one a second, whatever the source")
        self.assertEqual(regular, "welcome")
        started = server.now
        self.assertEqual(self.guess(server, "192.0.2.50", "right"), "welcome", "an address that logged in before")
        self.assertEqual(self.guess(server, "192.0.2.51", "right"), "welcome", "and its colleagues on its network")
        self.assertEqual(server.now, started, "at once")


class PasswordSprayTest(HarnessTestCase):
    """Issue 18 item 1, as measured: a guesser using a fresh /24 for each try
    every 20 ms kept 24 of 30 new users out (they sent the right password once,
    and the client gave up on `rate-limited`)."""
    config = {"password": "right", "auth_delay": 1.0}

    def test_new_users_get_in_while_guessing_stays_bounded(self):
        checked = []
        gate = self.server.chat.gate
        real = gate.failed
        gate.failed = lambda conn, now: checked.append(1) or real(conn, now)
        guesses = (f"10.{i // 250 % 250}.{i % 250}.1" for i in itertools.count())
        users = {}      # number -> [client or None, when to try (again), tries, when it began]
        got_in = {}
        for step in range(3000):        # 60 s
            self.server.connect(ip=next(guesses)).send({"type": "hello", "nick": "x", "password": "guess"})
            if step % 50 == 25 and len(users) < 30:
                users[len(users)] = [None, self.server.now, 0, self.server.now]
            for number, user in users.items():
                client, when, tries, began = user
                if number in got_in:
                    continue
                if client is None and self.server.now >= when:      # as the client does: try, and again
                    user[0], user[2] = self.server.connect(ip=f"172.16.{number}.9"), tries + 1
                    user[0].send({"type": "hello", "nick": f"user{number}", "password": "right"})
                elif client is not None:
                    answer = next((f for f in client.frames() if f["type"] in ("welcome", "error")), None)
                    if answer is not None and answer["type"] == "welcome":
                        got_in[number] = self.server.now - began
                    elif answer is not None:
                        self.assertEqual(answer["code"], "rate-limited", "told when to try again, not refused")
                        user[0], user[1] = None, self.server.now + answer["retry_after"]
            self.server.advance(0.02)
        self.assertEqual(len(got_in), 30)
        self.assertLess(max(got_in.values()), 10.0, "each in within seconds")
        self.assertLess(len(checked), chat.Gate.GLOBAL_BURST + 60 + 2, "about 110 guesses checked in the minute")


    def test_a_guesser_on_networks_seen_first_starves_no_newcomer_and_nobody_waits_unanswered(self):
        """The attack round's H3: 60 guessing connections from 400 /24s seen before anyone else;
        newcomers with the right password had no answer for 61 s and got in after the attack ended."""
        pool = [f"10.{i // 250}.{i % 250}.1" for i in range(400)]
        guessers = []

        def keep_guessing():
            guessers[:] = [g for g in guessers if not g.gone]
            while len(guessers) < 60:
                guesser = self.server.connect(ip=random.choice(pool))
                guesser.send({"type": "hello", "nick": "x", "password": "guess"})
                guessers.append(guesser)
        for ip in pool:         # every guessing network is seen before the newcomers
            self.server.connect(ip=ip).send({"type": "hello", "nick": "x", "password": "guess"})
            self.server.advance(0.01)
        newcomers, answered, got_in = {}, {}, {}
        for step in range(1500):        # 30 s
            keep_guessing()
            if step % 100 == 0 and len(newcomers) < 5:
                number = len(newcomers)
                newcomers[number] = [self.server.connect(ip=f"172.16.{number}.9"), self.server.now, self.server.now]
                newcomers[number][0].send({"type": "hello", "nick": f"new{number}", "password": "right"})
            for number, (client, asked, began) in newcomers.items():
                if number in got_in or client is None:
                    if client is None and number not in got_in and self.server.now >= asked:
                        newcomers[number][0] = self.server.connect(ip=f"172.16.{number}.9")
                        newcomers[number][0].send({"type": "hello", "nick": f"new{number}", "password": "right"})
                        newcomers[number][1] = self.server.now
                    continue
                answer = next((f for f in client.frames() if f["type"] in ("welcome", "error")), None)
                if answer is None:
                    self.assertLess(self.server.now - asked, chat.Gate.HOLD_MAX + 0.5, "every try is answered")
                    continue
                answered[number] = True
                if answer["type"] == "welcome":
                    got_in[number] = self.server.now - began
                else:
                    self.assertEqual(answer["code"], "rate-limited")
                    newcomers[number][0], newcomers[number][1] = None, self.server.now + answer["retry_after"]
            self.server.advance(0.02)
        self.assertEqual(sorted(got_in), list(range(5)), "every newcomer got in during the attack")
        self.assertLess(max(got_in.values()), 12.0)


class FairQueueTest(unittest.TestCase):
    def test_turns_go_round_the_address_blocks_then_oldest_first(self):
        queue = chat.FairQueue()
        for i in range(100):        # a guesser: 100 tries from 100 /24s of one /8
            queue.push(f"10.{i % 3}.{i}.1", f"guess{i}")
        queue.push("172.16.0.9", "newcomer")
        queue.push("2001:db8::1", "over IPv6")
        queue.push("172.16.0.9", "newcomer again")
        taken = [queue.pop() for _ in range(5)]
        self.assertEqual(taken, ["guess0", "newcomer", "over IPv6", "guess1", "newcomer again"])
        self.assertEqual(len(queue), 98)
        self.assertEqual([queue.pop() for _ in range(3)], ["guess2", "guess3", "guess4"], "round its /16s")


class HashingTest(unittest.TestCase):
    """The attack round's M1, M2: 8 connections hashing wrong old passwords, or logins of one account
    of the attacker's, kept the worker busy and every real /register was refused, a login took 2.4 s."""

    class SlowWorker:
        def __init__(self):
            self.jobs = []

        def work(self, function, *args, done):
            self.jobs.append((function, args, done))

        def finish(self):
            function, args, done = self.jobs.pop(0)
            done(function(*args))

    def test_sources_take_turns_and_one_cannot_queue_without_end(self):
        """And helper-7's: an attacker's logins to its own account, trusted from its home network, went
        first and starved every other hash (25.8 s of CPU in 25 s, /register unanswered)."""
        worker, done = self.SlowWorker(), []
        hashing = chat.Hashing(worker)
        conn = lambda ip, port=1: chat.Conn(None, f"{ip}:{port}", ip, 65536, 0.0, 10)
        attacker = conn("203.0.113.9")
        for i in range(chat.Hashing.IN_FLIGHT + chat.Hashing.QUEUED_MAX):
            hashing.run(attacker, lambda x: x, f"a{i}", done=done.append)
        with self.assertRaises(chat.ProtocolError) as refused:
            hashing.run(attacker, lambda x: x, "one too many", done=done.append)
        self.assertEqual(refused.exception.code, "rate-limited")
        hashing.run(conn("192.0.2.1"), lambda x: x, "alice", done=done.append)
        for port in range(2, 8):        # behind a local proxy: each connection a source of its own
            hashing.run(conn("127.0.0.1", port), lambda x: x, f"proxied{port}", done=done.append)
        while worker.jobs:
            worker.finish()
        self.assertEqual(done[:5], ["a0", "a1", "a2", "alice", "proxied2"])


class PasswordTest(ServerTestCase):
    config = {"password": "s3cret", "auth_delay": 0.2}

    def test_the_client_takes_the_password_from_env_or_file(self):
        alice = self.peer("alice", password="s3cret")
        self.client("-n", "envy", env={"CHAT_PASSWORD": "s3cret"})
        alice.expect("join", nick="envy")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("s3cret\n")
        self.addCleanup(os.unlink, f.name)
        self.client("-n", "filed", "--password-file", f.name)
        alice.expect("join", nick="filed")
        refused = self.client("-n", "nopass")
        self.assertEqual(refused.wait(), 3)
        self.assertTrue(any("needs a password" in line for line in refused.err_lines))

    def test_the_server_takes_the_password_from_env(self):
        server, port = server_process(env={"CHAT_PASSWORD": "envpass"})
        try:
            accepted = Peer(port, "b", password="envpass")
            self.addCleanup(accepted.close)
            self.assertEqual(accepted.welcome["nick"], "b")
            refused = Peer(port)
            self.addCleanup(refused.close)
            refused.send({"type": "hello", "nick": "a", "password": "no"})
            self.assertEqual(refused.expect("error")["code"], "auth-failed")
            self.assertTrue(any(", password" in line for line in server.err_lines))
        finally:
            server.kill()


# ---------------------------------------------------------------------------
# 4e. Intake: flood control, request costs; Nicks
# ---------------------------------------------------------------------------

class HoldChurnTest(HarnessTestCase):
    """Issue 18 item 2, as measured: 101 throwaway connections (hello, abrupt
    close) filled the hold table and freed alice's hold; the attacker took her
    nick, her resume got `nick-taken` and a pm for her reached the attacker."""

    def test_one_sources_churn_never_frees_anothers_hold(self):
        bob = self.peer("bob", ip="192.0.2.20")
        alice = self.peer("alice", ip="192.0.2.21")
        welcome = alice.welcome
        alice.close()       # her connection drops: her nick is held for her session
        for i in range(101):
            self.peer(f"throwaway{i}", ip="203.0.113.66").close()
            self.server.advance(0.05)
        thief = self.peer(ip="203.0.113.66")
        thief.send({"type": "hello", "nick": "alice"})
        self.assertEqual(thief.expect("error")["code"], "nick-taken")
        back = self.peer("alice", ip="192.0.2.21", session=welcome["session"], instance=welcome["instance"])
        bob.send({"type": "pm", "to": "alice", "text": "for alice only"})
        self.assertEqual(back.expect("msg")["text"], "for alice only")
        self.assertLessEqual(len(self.server.chat.nicks.holds), self.server.config.max_connections)

    def test_many_sources_churn_never_frees_a_hold_there_before_them(self):
        """The attack round's H4: 101 throwaway guests from 101 addresses did it."""
        alice = self.peer("alice", ip="192.0.2.21")
        welcome = alice.welcome
        alice.close()
        for i in range(self.server.config.max_connections + 1):
            self.peer(f"throwaway{i}", ip=f"203.0.{i // 250}.{i % 250 + 1}").close()
        thief = self.peer(ip="198.51.100.66")
        thief.send({"type": "hello", "nick": "alice"})
        self.assertEqual(thief.expect("error")["code"], "nick-taken")
        self.peer("alice", ip="192.0.2.21", session=welcome["session"], instance=welcome["instance"])


class SourceSlotsTest(HarnessTestCase):
    """Issue 18 item 3, as measured: 99 joined connections from one address on
    -m 100 and 10 of 10 users from other addresses got `server-full`."""
    config = {"max_connections": 100}

    def test_one_address_cannot_fill_the_server(self):
        per_source = self.server.config.connections_per_source
        self.assertEqual(per_source, 20, "a tenth of -m, at least 20: an office behind one NAT")
        hogs = []
        for i in range(99):
            hogs.append(self.peer(ip="203.0.113.66"))
            if not hogs[-1].gone:
                hogs[-1].send({"type": "hello", "nick": f"hog{i}"})
        self.assertEqual(sum(not hog.gone for hog in hogs), per_source)
        self.assertIn("the most one address may have", hogs[-1].frames()[-1]["text"])
        for i in range(10):
            self.assertEqual(self.peer(f"user{i}", ip=f"192.0.2.{30 + i}").welcome["nick"], f"user{i}")

    def test_a_few_addresses_filling_the_server_make_room_for_someone_new(self):
        """The attack round's M9: two addresses of idle joined guests filled -m 100 for as long as they liked."""
        hogs = [self.peer(f"hog{i}", ip=f"203.0.113.{i % 5}") for i in range(100)]
        self.assertEqual(sum(not hog.gone for hog in hogs), 100, "five addresses fill it")
        users = [self.peer(f"user{i}", ip=f"192.0.2.{30 + i}") for i in range(10)]
        self.assertEqual([user.welcome["nick"] for user in users], [f"user{i}" for i in range(10)])
        taken_back = [hog for hog in hogs if hog.gone]
        self.assertEqual(len(taken_back), 10)
        self.assertIn("your address has the most connections here", taken_back[0].frames("error")[-1]["text"])

    def test_connections_from_the_servers_own_machine_count_against_no_source(self):
        local = [self.peer(f"proxied{i}", ip="127.0.0.1") for i in range(60)]      # a local TLS proxy, say
        self.assertEqual(sum(not client.gone for client in local), 60)


class HarnessFloodTest(HarnessTestCase):
    def test_a_flooder_is_slowed_down_without_losing_lines_or_starving_others(self):
        server = self.harness(flood_rate=20.0, flood_burst=5)
        flooder, talker, observer = (server.connect(nick) for nick in ("flooder", "talker", "observer"))
        flooder.send(*({"type": "msg", "text": f"flood {i}"} for i in range(40)))
        self.assertTrue(any("slowing you down" in f["text"] for f in flooder.frames("notice")))
        self.assertEqual(len(observer.frames("msg")), 5, "the burst, then nothing until a token is back")
        talker.send({"type": "msg", "text": "can I speak?"})
        self.assertEqual(observer.frames("msg")[0]["text"], "can I speak?", "the talker is not starved")
        server.advance(1.0)
        self.assertEqual(len(observer.frames("msg")), 20, "20 lines a second")
        server.advance(0.75)
        texts = [f["text"] for f in observer.frames("msg")]
        self.assertEqual(texts[-1], "flood 39", "35 lines over the burst at 20/s take 1.75s")


class RequestCostTest(HarnessTestCase):
    """Items 2 and 3: every request costs flood tokens, big answers cost more,
    and a connection is not read while more than its share is queued for it."""

    def populated(self, rooms=40, **config):
        server = self.harness(**{"flood_rate": 10.0, "flood_burst": 50, **config})
        for i in range(rooms):
            server.connect(f"u{i}", ip=f"198.51.100.{i + 1}").send({"type": "join", "room": f"room-with-a-long-name-{i:04d}"})
        return server

    def test_cheap_requests_with_big_answers_are_paid_for(self):
        server = self.populated()
        attacker = server.connect("attacker")
        attacker.send(*[{"type": "rooms"}] * 1000)
        answered = len(attacker.frames("rooms"))
        size = len(chat.encode({"type": "rooms", "rooms": [{"name": "room-with-a-long-name-0000", "users": 1}] * 41}))
        self.assertLessEqual(answered, 50 / (1 + size / chat.REPLY_BYTES_PER_TOKEN) + 1)
        server.advance(1.0)
        self.assertLessEqual(len(attacker.frames("rooms")), 10 / (1 + size / chat.REPLY_BYTES_PER_TOKEN) + 1)

    def test_every_request_type_costs_a_token(self):
        for frame in ({"type": "who"}, {"type": "ping"}, {"type": "nick", "nick": "x"},
                      {"type": "join", "room": "r"}, {"type": "part", "room": "r"}, {"type": "pong"},
                      {"type": "teleport"}, {"type": "msg", "text": 5}):
            with self.subTest(frame["type"]):
                server = self.harness(flood_rate=10.0, flood_burst=20)
                attacker = server.connect("attacker")
                server.connect("watcher")       # a room member, for part and join to tell
                attacker.send(*[frame] * 200)
                self.assertTrue(attacker.conn.paused and attacker.conn.held is not None)
                self.assertLess(attacker.conn.tokens, 1.0)

    def test_join_part_nick_churn_is_capped_like_a_flood(self):
        server = self.harness(flood_rate=10.0, flood_burst=20)
        attacker, victim = server.connect("attacker"), server.connect("victim")
        victim.frames()
        churn = [{"type": "part", "room": "lobby"}, {"type": "join", "room": "lobby"},
                 {"type": "nick", "nick": "attacker2"}, {"type": "nick", "nick": "attacker"}]
        attacker.send(*churn * 1000)
        server.advance(10.0)
        events = victim.frames()
        self.assertLessEqual(len(events), 20 + 10 * 10 + 1, "a burst, then the flood rate")
        self.assertGreater(len(events), 100, "slowed, not stopped")
        self.assertFalse(victim.gone)

    def test_a_connection_that_does_not_read_its_answers_is_not_read_either(self):
        server = self.populated(flood_rate=1e9, flood_burst=1e9, max_buffer=64 * 1024)
        attacker = server.connect("attacker")
        attacker.reading = False
        attacker.send(*[{"type": "rooms"}] * 10000)
        self.assertTrue(attacker.conn.holds & chat.BACKLOG)
        self.assertLessEqual(attacker.conn.queued, server.chat.out.share + 4096)
        self.assertGreater(len(attacker.outbound) + attacker.conn.codec.buffered, 100000,
                           "the rest waits unhandled, in its socket or the one read taken")
        attacker.reading = True
        attacker.take()
        self.assertFalse(attacker.conn.holds & chat.BACKLOG)
        self.assertGreater(len(attacker.frames("rooms")), 5, "read again once it reads")


class ReplyFloodTest(ServerTestCase):
    """Item 2 on real sockets: 253 KB of `rooms` from 4 connections that do
    not read froze the server for 34 s and took 2.7 GB. Stated bound: what is
    queued for each of them stays under its share plus one answer."""

    def test_attackers_that_never_read_cannot_freeze_the_server_or_grow_it(self):
        for i in range(10):
            member = self.peer(f"member{i}")
            for j in range(10):
                member.send({"type": "join", "room": f"populated-room-{i:02d}-{j:02d}"})
            member.sync()
        watcher = self.peer("watcher")
        attackers = []
        for i in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # a small window: its queue fills
            sock.connect(("127.0.0.1", self.port))
            attackers.append(self.peer(f"attacker{i}", sock=sock))
        flood = chat.encode({"type": "rooms"}) * (253000 // 16)
        for attacker in attackers:
            threading.Thread(target=attacker.sock.sendall, args=(flood,), daemon=True).start()
        worst = max(ping_ms(watcher) for _ in range(10))
        wait_until(lambda: self.server.call(
            lambda: sum(c.paused for c in self.server.loop.open)) == 4, what="all four to be paused")
        worst = max([worst] + [ping_ms(watcher) for _ in range(10)])
        self.assertLess(worst, 500, "the watcher's ping was answered late")
        share = self.server.loop.chat.out.share
        queued = self.server.call(lambda: [c.queued for c in self.server.loop.open if c.nick.startswith("att")])
        self.assertEqual(len(queued), 4, "the attackers are paused, not dropped")
        self.assertLessEqual(max(queued), share + chat.MAX_SERVER_PAYLOAD)


class FloodTest(ServerTestCase):
    def test_a_paste_of_50_lines_arrives_complete_and_in_order(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        client = self.client("-n", "paster")
        alice.expect("join", nick="paster")
        client.write("".join(f"pasted line {i:02d}\n" for i in range(50)))
        for peer in (alice, bob):
            self.assertEqual([peer.expect("msg")["text"] for _ in range(50)],
                             [f"pasted line {i:02d}" for i in range(50)])
        self.assertEqual(client.proc.poll(), None)


class NickHoldTest(HarnessTestCase):
    """Item 11: a nick was taken 9 ms after its owner's connection dropped."""

    def lose(self, server, nick):
        client = server.connect(nick)
        client.close()
        return client.welcome

    def test_a_lost_connection_keeps_its_nick_for_its_session(self):
        server = self.harness()
        bob = server.connect("bob")
        welcome = self.lose(server, "alice")
        taker = server.connect()
        taker.send({"type": "hello", "nick": "ALICE"})
        self.assertIn("waits for them", taker.expect("error")["text"])
        bob.send({"type": "pm", "to": "alice", "text": "secret"}, {"type": "nick", "nick": "alice"})
        self.assertIn("lost their connection", bob.expect("error", code="no-such-user")["text"])
        self.assertEqual(bob.expect("error")["code"], "nick-taken")
        server.advance(30)
        back = server.connect("alice", session=welcome["session"], instance=welcome["instance"])
        self.assertEqual(back.welcome["nick"], "alice")

    def test_the_hold_ends_after_a_while_or_at_a_quit(self):
        server = self.harness(nick_hold=60)
        self.lose(server, "alice")
        server.advance(60)
        self.assertEqual(server.connect("alice").welcome["nick"], "alice")
        quitter = server.connect("carol")
        quitter.send({"type": "quit"})
        self.assertEqual(server.connect("carol").welcome["nick"], "carol", "a quit leaves nothing held")

    def test_dropped_as_too_slow_or_silent_is_held_too(self):
        server = self.harness(ping_interval=1, idle_timeout=2)
        silent = server.connect("silent")
        silent.reading = False
        server.advance(2)
        self.assertIn(chat.name_key("silent"), server.chat.nicks.holds)


# ---------------------------------------------------------------------------
# 4f. People: accounts, operators, bans, mutes, topics, presence
# ---------------------------------------------------------------------------

class CommunityTestCase(HarnessTestCase):
    """A server with accounts: `root` is a server operator (--op root)."""
    config = {"ops": ("root",)}

    def account(self, nick, password="secret1", ip="192.0.2.1", server=None):
        """`nick` registered (with `password`), then logged out again."""
        client = (server or self.server).connect(nick, ip=ip)
        client.send({"type": "register", "password": password})
        self.assertEqual(client.expect("registered")["nick"], nick)
        client.send({"type": "quit"})
        return password

    def login(self, nick, password="secret1", server=None, ip="192.0.2.1", **hello):
        """Logged in to `nick`'s account (waiting, as a client does, while its try waits its turn)."""
        server = server or self.server
        client = server.connect(ip=ip)
        client.send({"type": "hello", "nick": nick, "account_password": password, **hello})
        for _ in range(int(chat.Gate.HOLD_MAX / 0.05)):
            if any(f["type"] in ("welcome", "error") for f in client.received):
                break
            server.advance(0.05)
        client.welcome = client.expect("welcome")
        self.assertEqual(client.welcome["account"], nick, "the account as it was registered, not its key")
        return client


class AccountTest(CommunityTestCase):
    def test_a_registered_nick_is_owned_online_or_not(self):
        self.account("alice")
        for nick in ("alice", "ALICE", "a\u0131ice"):     # the nick, and look-alikes of it
            with self.subTest(nick):
                thief = self.peer()
                thief.send({"type": "hello", "nick": nick})
                self.assertEqual(thief.expect("error")["code"], "account-required")
                thief.closed()
        wrong = self.peer()
        wrong.send({"type": "hello", "nick": "alice", "account_password": "guess"})
        self.assertEqual(wrong.expect("error")["code"], "login-failed")
        alice = self.login("alice")
        self.assertFalse(alice.welcome["op"])
        thief = self.peer()
        thief.send({"type": "hello", "nick": "alice"})
        self.assertEqual(thief.expect("error")["code"], "account-required", "while she is online too")
        alice.close()       # her connection drops (her nick is held for it)...
        again = self.login("alice", ip="198.51.100.9")      # ...and her password, from a new client, is her
        self.assertEqual(again.welcome["nick"], "alice")
        later = self.login("alice")         # and it replaces a connection of hers still open
        self.assertEqual(again.closed()[-1]["code"], "replaced")
        self.assertEqual(later.welcome["nick"], "alice")

    def test_the_password_is_kept_as_scrypt_with_its_own_salt(self):
        self.account("alice", "hunter22")
        self.account("bob", "hunter22")
        alice, bob = (self.server.chat.people.account(key)["password"] for key in ("aiice", "bob"))
        self.assertEqual(alice["scrypt"], chat.SCRYPT)
        self.assertNotEqual(alice["salt"], bob["salt"])
        self.assertNotEqual(alice["key"], bob["key"])
        self.assertNotIn("hunter22", json.dumps(self.server.chat.store.records))
        self.assertTrue(chat.password_matches(alice, "hunter22"))
        self.assertFalse(chat.password_matches(alice, "hunter23"))
        self.assertFalse(chat.password_matches(dict(alice, scrypt={"n": 1 << 30, "r": 8, "p": 1}), "hunter22"),
                         "a record asking for 128 GiB is not believed")

    def test_renaming_to_a_registered_nick_needs_its_password_and_a_password_can_be_changed(self):
        self.account("alice")
        bob = self.peer("bob")
        bob.send({"type": "nick", "nick": "alice"})
        self.assertEqual(bob.expect("error")["code"], "account-required")
        bob.send({"type": "nick", "nick": "alice", "password": "nope1"})
        self.assertEqual(bob.expect("error")["code"], "login-failed")
        bob.send({"type": "nick", "nick": "alice", "password": "secret1"})      # (right after a typo: it waits)
        self.server.advance(1.0)
        self.assertEqual(bob.expect("nick")["new"], "alice")
        bob.send({"type": "password", "old": "guess1", "new": "mine-now"})       # a wrong old one is a guess
        self.assertEqual(bob.expect("error")["code"], "login-failed")
        bob.send({"type": "password", "old": "guess2", "new": "mine-now"})
        self.assertEqual(bob.expect("error")["code"], "rate-limited", "and the next waits, as at a login")
        self.server.advance(10.0)
        bob.send({"type": "password", "old": "secret1", "new": "better2"})
        self.assertTrue(bob.expect("registered")["changed"])
        bob.send({"type": "quit"})
        self.login("alice", "better2")

    def test_what_follows_a_rename_that_waits_its_turn_comes_after_it(self):
        """The attack round's L7: a rename re-run after its wait, then hashed, let later frames overtake it."""
        self.account("alice")
        watcher, bob = self.peer("watcher"), self.peer("bob")
        worker = HashingTest.SlowWorker()
        self.server.chat.hashing = chat.Hashing(worker)
        bob.send({"type": "nick", "nick": "alice", "password": "typo1"})
        self.server.turn(worker.finish)
        self.assertEqual(bob.expect("error")["code"], "login-failed")
        bob.send({"type": "nick", "nick": "alice", "password": "secret1"}, {"type": "msg", "text": "after"})
        self.server.advance(1.0)        # its turn: now it is being hashed
        self.assertEqual(watcher.frames("msg"), [], "the line waits for the rename")
        while worker.jobs:
            self.server.turn(worker.finish)
        self.assertEqual(watcher.expect("msg")["from"], "alice")

    def test_wrong_account_passwords_are_priced_per_account_and_never_lock_out_its_owner(self):
        self.account("alice", ip="192.0.2.1")
        for i in range(6):      # guessed from six networks: the account's tries now wait
            guess = self.server.connect(ip=f"198.51.{i}.7")
            guess.send({"type": "hello", "nick": "alice", "account_password": f"guess{i}"})
            while not guess.gone:
                self.server.advance(0.1)
            self.assertEqual(guess.frames("error")[0]["code"], "login-failed")
        late = self.server.connect(ip="203.0.113.9")
        late.send({"type": "hello", "nick": "alice", "account_password": "guess9"})
        self.assertEqual(late.frames(), [], "it waits for the account's turn")
        self.assertEqual(self.login("alice", ip="192.0.2.1").welcome["nick"], "alice",
                         "from where she logged in before, at once")

    def test_a_device_an_account_logged_in_on_is_never_locked_out_by_strangers_guesses(self):
        """The attack round's H2: 8 wrong guesses from 8 networks kept alice out of every network new to her."""
        home = self.server.connect("alice", ip="192.0.2.1")
        home.send({"type": "register", "password": "secret1"})
        device = home.expect("registered")["device"]
        home.send({"type": "quit"})
        for i in range(8):
            guess = self.server.connect(ip=f"198.51.{i}.7")
            guess.send({"type": "hello", "nick": "alice", "account_password": f"guess{i}"})
            while not guess.gone:
                self.server.advance(0.1)
        travelling = self.server.connect(ip="203.0.113.9")      # a network she never used, her own laptop
        travelling.send({"type": "hello", "nick": "alice", "account_password": "secret1", "device": device})
        self.server.advance(0.1)        # (the hash, off the loop)
        welcome = travelling.expect("welcome")
        self.assertEqual(welcome["device"], device, "the same device keeps its token")
        travelling.send({"type": "quit"})
        stranger = self.server.connect(ip="100.64.0.10")
        stranger.send({"type": "hello", "nick": "alice", "account_password": "secret1", "device": "made-up"})
        self.server.advance(0.1)
        self.assertEqual(stranger.frames("welcome"), [], "another device waits for the account's turn")
        self.assertNotIn(device, json.dumps(self.server.chat.people.account("aiice")), "kept hashed")

    def test_one_address_registers_a_few_accounts_a_day(self):
        """The attack round's M3: one address made 686 accounts in 20 s, each a nick lost to its owner for good."""
        for i in range(chat.People.ACCOUNTS_PER_SOURCE + 1):
            squatter = self.server.connect(f"nick{i}", ip="203.0.113.5")
            squatter.send({"type": "register", "password": "squat-pw"})
            answer = next(f for f in squatter.received if f["type"] in ("registered", "error"))
            squatter.send({"type": "quit"})
        self.assertEqual(answer["code"], "not-allowed")
        self.assertIn("try again tomorrow", answer["text"])
        self.assertIsNone(self.server.chat.people.account(chat.name_key(f"nick{chat.People.ACCOUNTS_PER_SOURCE}")))
        self.account("elsewhere", ip="198.51.100.5")
        self.server.advance(86400)
        self.account("tomorrow", ip="203.0.113.5")

    def test_neither_a_local_proxys_guesser_nor_a_neighbours_locks_out_a_device(self):
        """helper-7's: behind a local proxy, 5 wrong guesses made everyone wait; 20 from alice's /24
        kept her out, though she came with her device token."""
        home = self.server.connect("alice", ip="198.51.100.5")
        home.send({"type": "register", "password": "secret1"})
        device = home.expect("registered")["device"]
        home.send({"type": "quit"})
        self.account("mallory", ip="127.0.0.1")
        for i in range(5):      # through the proxy: every guess is 127.0.0.1's
            guess = self.server.connect(ip="127.0.0.1")
            guess.send({"type": "hello", "nick": "mallory", "account_password": f"guess{i}"})
            self.server.advance(0.05)
        for i in range(20):     # and from alice's own /24
            guess = self.server.connect(ip=f"198.51.100.{100 + i}")
            guess.send({"type": "hello", "nick": "mallory", "account_password": f"guess{i}"})
            self.server.advance(0.05)
        for ip in ("127.0.0.1", "198.51.100.5", "::ffff:127.0.0.1"):
            with self.subTest(ip=ip):
                again = self.server.connect(ip=ip)
                again.send({"type": "hello", "nick": "alice", "account_password": "secret1", "device": device})
                self.assertEqual(again.expect("welcome")["nick"], "alice", "at once, with her device")
                again.send({"type": "quit"})
        guest = self.server.connect("someone", ip="127.0.0.1")
        self.assertEqual(guest.welcome["nick"], "someone")

    def test_registered_only_servers_let_operators_make_accounts(self):
        server = self.harness(ops=("root",), registered_only=True)
        guest = server.connect()
        guest.send({"type": "hello", "nick": "guest"})
        self.assertEqual(guest.expect("error")["code"], "registered-only")
        server.chat.people.records.put("account", "root", {"name": "root", "password": chat.hash_password("rootpw")})
        root = self.login("root", "rootpw", server=server)
        self.assertTrue(root.welcome["op"])
        root.send({"type": "register", "nick": "carol", "password": "carolpw"})
        self.assertEqual(root.expect("registered")["nick"], "carol")
        self.login("carol", "carolpw", server=server)


class ModerationTest(CommunityTestCase):
    def setUp(self):
        super().setUp()
        self.account("root", "rootpw", ip="127.0.0.1")      # an --op name is registered on the server's machine
        self.root = self.login("root", "rootpw", ip="192.0.2.99")
        self.assertTrue(self.root.welcome["op"])

    def test_only_the_servers_machine_may_register_an_operators_name(self):
        server = self.harness(ops=("boss",))
        squatter = server.connect("boss", ip="203.0.113.66")
        squatter.send({"type": "register", "password": "mine-now"})
        error = squatter.expect("error")
        self.assertEqual(error["code"], "not-allowed")
        self.assertIn("at the server's console (/register boss)", error["text"])
        self.assertIsNone(server.chat.people.account("boss"))
        squatter.send({"type": "quit"})
        local = server.connect("b0ss", ip="127.0.0.1")      # (a look-alike is the same name)
        local.send({"type": "register", "password": "bosspw"})
        self.assertEqual(local.expect("registered")["nick"], "b0ss")

    def test_a_kick_disconnects_and_is_announced_but_a_guest_may_come_back(self):
        alice, bob = self.peer("alice"), self.peer("bob", ip="198.51.100.5")
        self.root.send({"type": "kick", "nick": "bob", "reason": "calm down"})
        error = bob.closed()[-1]
        self.assertEqual((error["code"], error["text"]), ("kicked", "kicked by root: calm down"))
        self.assertEqual(alice.expect("leave", nick="bob")["reason"], "kicked by root: calm down")
        self.assertEqual(self.peer("bob", ip="198.51.100.5").welcome["nick"], "bob")

    def test_a_ban_covers_the_person_and_ends_on_time(self):
        alice, bob = self.peer("alice"), self.peer("bob", ip="198.51.100.5")
        self.account("carol", ip="198.51.100.6")
        self.root.send({"type": "ban", "nick": "bob", "duration": "1h", "reason": "spamming"})
        error = bob.closed()[-1]
        self.assertEqual(error["code"], "banned")
        self.assertIn("spamming", error["text"])
        self.assertAlmostEqual(error["until"], self.server.wall + 3600, delta=2)
        self.assertEqual(alice.expect("notice")["text"], "root banned bob for 1h: spamming")
        for nick, ip in (("bob", "203.0.113.1"), ("B0B", "203.0.113.1"), ("robert", "198.51.100.5")):
            with self.subTest(nick=nick, ip=ip):     # the nick and look-alikes anywhere; a guest's network
                again = self.peer(ip=ip)
                again.send({"type": "hello", "nick": nick})
                self.assertEqual(again.expect("error")["code"], "banned")
        self.login("carol", ip="198.51.100.5")      # an account is judged by its account, not its network
        self.server.advance(3600)
        self.assertEqual(self.peer("bob", ip="198.51.100.5").welcome["nick"], "bob", "the ban ended on time")

    def test_a_guest_behind_the_banned_address_is_told_why_and_for_a_day_at_most(self):
        self.peer("bob", ip="198.51.100.5")
        self.root.send({"type": "ban", "nick": "bob", "reason": "spamming"})       # until lifted
        neighbour = self.peer(ip="198.51.100.5")
        neighbour.send({"type": "hello", "nick": "newguy"})
        error = neighbour.expect("error")
        self.assertEqual(error["code"], "banned")
        self.assertIn("guests from your address are shut out of this server for 1d more", error["text"])
        self.assertIn("as bob was banned from it: spamming; log in to an account", error["text"])
        self.assertAlmostEqual(error["until"], self.server.wall + 86400, delta=2)
        self.server.advance(86400)
        self.assertEqual(self.peer("newguy", ip="198.51.100.5").welcome["nick"], "newguy", "the address is free")
        again = self.peer(ip="203.0.113.1")
        again.send({"type": "hello", "nick": "bob"})
        self.assertIn("you are banned from this server until it is lifted", again.expect("error")["text"])

    def test_a_banned_account_cannot_come_back_as_a_guest_from_the_same_address(self):
        self.account("spam2", ip="198.51.100.7")
        self.login("spam2", ip="198.51.100.7")
        self.root.send({"type": "ban", "nick": "spam2", "duration": "1h"})
        dodge = self.peer(ip="198.51.100.7")
        dodge.send({"type": "hello", "nick": "spam3"})
        self.assertEqual(dodge.expect("error")["code"], "banned")
        self.assertEqual(self.peer("spam3", ip="203.0.113.7").welcome["nick"], "spam3", "elsewhere: someone else")

    def test_a_mute_or_ban_follows_the_person_not_the_nick(self):
        """The attack round's H1: a new nick, an account's other nick, or a quit reason got round them."""
        alice = self.peer("alice", ip="198.51.100.1")
        self.account("eve", ip="198.51.100.2")
        eve = self.login("eve", ip="198.51.100.2")
        guest = self.peer("guest", ip="198.51.100.3")
        for nick in ("eve", "guest"):
            self.root.send({"type": "mute", "nick": nick})
        for client, nick in ((eve, "eve2"), (guest, "guest2")):
            client.send({"type": "nick", "nick": nick}, {"type": "away", "text": "read my away text"},
                        {"type": "msg", "text": "still talking"})
            self.assertEqual([f["code"] for f in client.frames("error")], ["muted"] * 3)
        guest.send({"type": "quit", "reason": "a reason is a line said to every room"})
        self.assertEqual(alice.expect("leave", nick="guest")["reason"], "quit")
        self.server.advance(1)
        again = self.peer("newface", ip="198.51.100.3")      # the muted guest, as someone new
        again.send({"type": "msg", "text": "hello again"})
        self.assertIn("guests from your address are muted", again.expect("error", code="muted")["text"])
        self.root.send({"type": "unmute", "nick": "eve"})
        eve.send({"type": "nick", "nick": "evil"})
        self.assertEqual(eve.expect("nick")["new"], "evil")
        eve.send({"type": "join", "room": "dev"})
        self.root.send({"type": "ban", "nick": "evil", "room": "dev"}, {"type": "ban", "nick": "evil"})
        eve.closed()
        back = self.peer(ip="203.0.113.2")      # her account, from elsewhere
        back.send({"type": "hello", "nick": "eve", "account_password": "secret1"})
        self.assertEqual(back.expect("error")["code"], "banned", "banned as evil is banned as eve")
        self.root.send({"type": "unban", "nick": "evil"})
        eve = self.login("eve", ip="203.0.113.2")
        eve.send({"type": "join", "room": "dev"})
        self.assertEqual(eve.expect("error")["code"], "banned", "and from #dev, under any nick")
        self.assertFalse(alice.frames("msg"), "nothing of theirs was said")

    def test_on_a_registered_only_server_nobody_takes_a_nick_that_is_not_theirs(self):
        server = self.harness(registered_only=True)
        for name in ("mallory", "carol"):
            server.chat.people.records.put("account", chat.name_key(name),
                                           {"name": name, "password": chat.hash_password("pw-" + name)})
        mallory = self.login("mallory", "pw-mallory", server=server)
        for nick in ("admin", "carol"):
            mallory.send({"type": "nick", "nick": nick})
        self.assertEqual([f["code"] for f in mallory.frames("error")], ["not-allowed", "account-required"])

    def test_only_operators_act_and_nothing_happens_otherwise(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        for frame in ({"type": "kick", "nick": "bob"}, {"type": "ban", "nick": "bob"},
                      {"type": "mute", "nick": "bob"}, {"type": "topic", "room": "lobby", "text": "mine"},
                      {"type": "op", "nick": "alice", "room": "lobby"}, {"type": "purge", "nick": "bob"},
                      {"type": "bans"}, {"type": "unban", "nick": "bob"}):
            with self.subTest(frame["type"]):
                alice.send(frame)
                self.assertEqual(alice.expect("error")["code"], "not-allowed")
        bob.send({"type": "msg", "text": "still here"})
        self.assertEqual(alice.expect("msg")["text"], "still here")

    def test_a_mute_lets_them_read_not_speak(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        self.root.send({"type": "mute", "nick": "bob", "duration": 1800})
        self.assertEqual(alice.expect("notice")["text"], "root muted bob for 30m")
        bob.send({"type": "msg", "text": "spam"}, {"type": "pm", "to": "alice", "text": "spam"})
        self.assertEqual([f["code"] for f in bob.frames("error")], ["muted", "muted"])
        self.assertEqual(alice.frames("msg"), [])
        alice.send({"type": "msg", "text": "can you read this?"})
        self.assertEqual(bob.expect("msg")["text"], "can you read this?")
        bob.send({"type": "pm", "to": "root", "text": "please, I was quoting him"})
        self.assertEqual(self.root.expect("msg", to="root")["text"], "please, I was quoting him", "an appeal reaches an operator")
        self.root.send({"type": "mute", "nick": "bob", "room": "lobby"})
        self.root.send({"type": "unmute", "nick": "bob"})
        bob.send({"type": "msg", "text": "still?"})
        self.assertIn("you are muted in #lobby until it is lifted", bob.expect("error", code="muted")["text"])
        self.root.send({"type": "unmute", "nick": "bob", "room": "lobby"})
        bob.send({"type": "msg", "text": "thanks"})
        self.assertEqual(alice.expect("msg")["text"], "thanks")

    def test_room_operators_act_in_their_room_only(self):
        self.account("carol")
        carol, dave = self.login("carol"), self.peer("dave", ip="198.51.100.8")
        for client in (self.root, carol, dave):
            client.send({"type": "join", "room": "dev"})
        carol.send({"type": "nick", "nick": "caroline"})    # (her account is still carol's)
        self.root.send({"type": "op", "nick": "caroline", "room": "dev"})
        change = dave.expect("mode")    # (as IRC clients update their names list)
        self.assertEqual((change["by"], change["modes"], change["args"]), ("root", "+o", ["caroline"]))
        self.assertTrue(carol.expect("op", room="dev")["on"])
        carol.send({"type": "nick", "nick": "carol"})
        carol.send({"type": "topic", "room": "dev", "text": "release on friday"})
        self.assertEqual(dave.expect("topic")["text"], "release on friday")
        carol.send({"type": "kick", "nick": "dave", "room": "dev", "reason": "off topic"})
        self.assertEqual(dave.expect("parted")["reason"], "kicked by carol: off topic")
        self.assertFalse(dave.gone, "still on the server, in the lobby")
        carol.send({"type": "ban", "nick": "dave", "room": "dev"})
        dave.send({"type": "join", "room": "dev"})
        error = dave.expect("error")
        self.assertEqual((error["code"], error["of"]), ("banned", "join"), "an error says what it answers")
        carol.send({"type": "kick", "nick": "dave", "room": "lobby"})
        self.assertEqual(carol.expect("error")["code"], "not-allowed")
        for act in ("kick", "ban", "mute"):     # a room's operator is no server operator's
            carol.send({"type": act, "nick": "root", "room": "dev"})
            self.assertIn("root is a server operator", carol.expect("error", code="not-allowed")["text"])
        newcomer = self.peer("erin")
        newcomer.send({"type": "join", "room": "dev"})
        self.assertEqual(newcomer.expect("joined")["topic"], "release on friday")
        newcomer.send({"type": "rooms"})
        self.assertIn({"name": "dev", "users": 3, "topic": "release on friday"}, newcomer.expect("rooms")["rooms"])

    def test_bans_list_and_unban(self):
        self.root.send({"type": "ban", "nick": "mallory", "reason": "spam"})
        self.root.send({"type": "bans"})
        bans = self.root.expect("bans")["bans"]
        self.assertEqual([(b["kind"], b["nick"], b["until"], b["reason"]) for b in bans],
                         [("ban", "mallory", None, "spam")])
        self.root.send({"type": "unban", "nick": "mallory"})
        self.assertEqual(self.peer("mallory").welcome["nick"], "mallory")

    def test_a_duration_too_big_for_a_float_is_refused_and_the_operator_stays(self):
        self.root.send({"type": "ban", "nick": "mallory", "duration": 10 ** 400})
        self.assertEqual(self.root.expect("error")["code"], "bad-field")
        self.assertFalse(self.root.gone)

    def test_durations_are_spoken_as_people_say_them(self):
        self.assertEqual([chat.spoken_duration(s) for s in (0.2, 90, 600, 3594, 7260, 86399, 90000, 608400)],
                         ["1s", "1m 30s", "10m", "59m 54s", "2h 1m", "1d", "1d 1h", "1w 1d"])
        self.assertEqual([chat._duration(text) for text in ("90s", "30m", "2h", "1d", 45)], [90, 1800, 7200, 86400, 45])

    def test_a_spammers_lines_can_be_taken_out_of_the_history(self):
        alice, spammer = self.peer("alice"), self.peer("spammer")
        alice.send({"type": "msg", "text": "real talk"})
        spammer.send(*[{"type": "msg", "text": f"buy now {i}"} for i in range(20)])
        self.root.send({"type": "purge", "nick": "spammer"})
        self.assertIn("removed spammer's lines", self.root.expect("notice")["text"])
        latecomer = self.peer("latecomer")
        self.assertEqual([line["text"] for line in latecomer.welcome["history"]], ["real talk"])


class RoomModesTest(CommunityTestCase):
    """Issue 22: IRC's channel modes are the core's, so they hold for both dialects."""

    def setUp(self):
        super().setUp()
        self.op, self.other = self.peer("opener", ip="192.0.2.10"), self.peer("other", ip="192.0.2.11")
        self.op.send({"type": "join", "room": "dev"})
        self.assertTrue(self.op.expect("joined")["op"], "who opens a room is its operator")

    def mode(self, modes, *args, client=None):
        (client or self.op).send({"type": "mode", "room": "dev", "modes": modes, "args": list(args)})

    def test_modes_are_told_and_asked(self):
        self.op.send({"type": "mode", "room": "dev"})
        self.assertEqual(self.op.expect("modes")["modes"], "+nt")
        self.mode("+kl-t", "beer", "5")
        changed = self.op.expect("mode")
        self.assertEqual((changed["modes"], changed["args"], changed["by"]), ("+kl-t", ["beer", "5"], "opener"))
        self.other.send({"type": "mode", "room": "dev"})
        self.assertEqual(self.other.expect("modes")["args"], ["*", "5"], "the key only to members")
        self.mode("+m", client=self.other)
        self.assertEqual(self.other.expect("error")["code"], "not-allowed")

    def test_key_limit_invite_and_bans_keep_people_out(self):
        self.mode("+k", "beer")
        self.other.send({"type": "join", "room": "dev"}, {"type": "join", "room": "dev", "key": "bees"})
        self.assertEqual([f["code"] for f in self.other.frames("error")], ["bad-key", "bad-key"])
        self.other.send({"type": "join", "room": "dev", "key": "beer"})
        self.assertEqual(self.other.expect("joined")["room"], "dev")
        self.mode("+l", "2")
        third = self.peer("third", ip="192.0.2.12")
        third.send({"type": "join", "room": "dev", "key": "beer"})
        self.assertEqual(third.expect("error")["code"], "room-full")
        self.mode("-lk+i")
        third.send({"type": "join", "room": "dev"})
        self.assertEqual(third.expect("error")["code"], "invite-only")
        self.op.send({"type": "invite", "nick": "third", "room": "dev"})
        self.assertEqual(self.op.expect("inviting")["nick"], "third")
        self.assertEqual(third.expect("invited")["by"], "opener")
        third.send({"type": "quit"})      # an invitation is the person's, not the nick's
        taker = self.peer("third", ip="192.0.2.14")
        taker.send({"type": "join", "room": "dev"})
        self.assertEqual(taker.expect("error")["code"], "invite-only")
        self.op.send({"type": "invite", "nick": "third", "room": "dev"})
        taker.send({"type": "nick", "nick": "thirdly"}, {"type": "join", "room": "dev"})
        self.assertEqual(taker.expect("joined")["room"], "dev")
        self.mode("-i+b", "FOURTH!*@*")
        fourth = self.peer("Fourth", ip="192.0.2.13")
        fourth.send({"type": "join", "room": "dev"})
        self.assertEqual(fourth.expect("error")["code"], "banned")
        self.op.send({"type": "mode", "room": "dev", "modes": "+b"})
        self.assertEqual([m["mask"] for m in self.op.expect("banlist")["masks"]], ["fourth!*@*"])
        self.op.send({"type": "bans", "room": "dev"})     # (a client's /bans shows them too)
        listed = self.op.expect("bans")["bans"]
        self.assertEqual(chat._ban_text(listed[0]), "fourth!*@* banned in #dev (a mask, until the room empties)"
                                                    " by opener")

    def test_moderated_and_no_external_and_voice(self):
        self.other.send({"type": "msg", "room": "dev", "text": "from outside"})
        self.assertEqual(self.other.expect("error")["code"], "not-in-room", "+n: no lines from outside")
        self.mode("-n")
        self.other.send({"type": "msg", "room": "dev", "text": "from outside"})
        self.assertEqual(self.op.expect("msg")["text"], "from outside")
        self.other.send({"type": "join", "room": "dev"})
        self.mode("+m")
        self.other.send({"type": "msg", "room": "dev", "text": "may I?"})
        self.assertEqual(self.other.expect("error")["code"], "moderated")
        self.mode("+v", "other")
        self.other.send({"type": "msg", "room": "dev", "text": "now I may"})
        self.assertEqual(self.op.expect("msg", text="now I may")["from"], "other")
        self.other.send({"type": "who", "room": "dev"})
        who = self.other.expect("who")
        self.assertEqual((who["ops"], who["voiced"]), (["opener"], ["other"]))

    def test_ops_given_and_lost_with_the_room_and_topics_by_anyone_without_t(self):
        self.other.send({"type": "join", "room": "dev"}, {"type": "topic", "room": "dev", "text": "mine"})
        self.assertEqual(self.other.expect("error")["code"], "not-allowed", "+t")
        self.mode("-t")
        self.other.send({"type": "topic", "room": "dev", "text": "mine"})
        self.assertEqual(self.op.expect("topic")["text"], "mine")
        self.mode("+o", "other")
        self.other.send({"type": "kick", "nick": "opener", "room": "dev", "reason": "coup"})
        left = self.op.expect("parted")
        self.assertEqual((left["how"], left["by"], left["message"]), ("kick", "other", "coup"))
        self.other.send({"type": "part", "room": "dev", "reason": "bye all"})
        self.op.send({"type": "join", "room": "dev"})
        self.assertTrue(self.op.expect("joined")["op"], "an empty room starts afresh")

    def test_secret_rooms_are_listed_to_their_members_only(self):
        self.mode("+s")
        self.other.send({"type": "rooms"})
        self.assertNotIn("dev", [r["name"] for r in self.other.expect("rooms")["rooms"]])
        self.op.send({"type": "rooms"})
        self.assertIn("dev", [r["name"] for r in self.op.expect("rooms")["rooms"]])
        self.other.send({"type": "whois", "nick": "opener"})
        self.assertEqual(self.other.expect("whois")["rooms"], ["lobby"])

    def test_bad_modes_are_refused_after_the_good_ones(self):
        self.mode("+zm")
        self.assertEqual(self.op.expect("mode")["modes"], "+m")
        self.assertEqual(self.op.expect("error")["code"], "bad-mode")
        self.mode("+o", "nobody")
        self.assertEqual(self.op.expect("error")["code"], "no-such-user")
        self.mode("+k", "has spaces")
        self.assertEqual(self.op.expect("error")["code"], "bad-field")


class WhoAndWhoWasTest(CommunityTestCase):
    def test_whowas_lusers_who_full_and_part_messages(self):
        watcher = self.peer("watcher")
        leaver = self.peer(ip="198.51.100.7")
        leaver.send({"type": "hello", "nick": "leaver", "username": "lv\x1b[2J", "realname": "Lee Ver\nx"})
        leaver.expect("welcome")
        watcher.send({"type": "who", "room": "lobby", "full": True})
        person = next(p for p in watcher.expect("who")["people"] if p["nick"] == "leaver")
        self.assertEqual((person["username"], person["realname"]), ("lv2J", "Lee Ver x"))
        self.assertTrue(person["host"].endswith(".ip") and "198.51" not in person["host"], "a cloak")
        watcher.send({"type": "lusers"})
        self.assertEqual(watcher.expect("lusers")["users"], 2)
        self.peer("brief").send({"type": "quit"})
        watcher.send({"type": "lusers"})
        counts = watcher.expect("lusers")
        self.assertEqual((counts["here"], counts["max_here"], counts["max_users"]), (2, 3, 3))
        leaver.send({"type": "join", "room": "dev"}, {"type": "part", "room": "dev", "reason": "lunch"})
        leaver.send({"type": "quit", "reason": "gone"})
        lobby_leave = watcher.expect("leave", nick="leaver")
        self.assertEqual((lobby_leave["how"], lobby_leave["reason"]), ("quit", "quit: gone"))
        watcher.send({"type": "whowas", "nick": "LEAVER"})
        entry = watcher.expect("whowas")["entries"][0]
        self.assertEqual((entry["nick"], entry["username"]), ("leaver", "lv2J"))

    def test_oper_logs_in_to_an_operators_account(self):
        server = self.harness(ops=("boss",))
        self.account("boss", "bosspw", ip="127.0.0.1", server=server)
        someone = server.connect("someone", ip="198.51.100.8")
        someone.send({"type": "oper", "name": "boss", "password": "nope"})
        self.assertEqual(someone.expect("error")["code"], "login-failed")
        server.advance(10)
        someone.send({"type": "oper", "name": "boss", "password": "bosspw"})
        self.assertTrue(someone.expect("op")["on"])
        someone.send({"type": "oper", "name": "someone", "password": "x"})
        self.assertEqual(someone.expect("error")["code"], "not-allowed")


class PresenceTest(CommunityTestCase):
    def test_away_is_shown_and_a_pm_sender_hears_it_once(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        bob.send({"type": "away", "text": "lunch"})
        self.assertEqual(bob.expect("notice")["text"], "you are away: lunch")
        alice.send({"type": "who", "room": "lobby"})
        self.assertEqual(alice.expect("who")["away"], {"bob": "lunch"})
        alice.send({"type": "pm", "to": "bob", "text": "one"}, {"type": "pm", "to": "bob", "text": "two"})
        self.assertEqual([f["text"] for f in alice.frames("notice")], ["bob is away: lunch"])
        self.assertEqual([f["text"] for f in bob.frames("msg")], ["one", "two"])
        bob.send({"type": "away"})
        self.assertEqual(bob.expect("notice")["text"], "you are back")

    def test_whois(self):
        self.account("alice")
        alice, bob = self.login("alice"), self.peer("bob")
        alice.send({"type": "join", "room": "dev"}, {"type": "away", "text": "in a meeting"})
        self.server.advance(90)
        bob.send({"type": "whois", "nick": "ALICE"})
        info = bob.expect("whois")
        self.assertEqual((info["nick"], info["account"], info["rooms"], info["away"], info["online"]),
                         ("alice", "alice", ["lobby", "dev"], "in a meeting", True))
        self.assertGreaterEqual(info["idle"], 90)
        self.assertIn("chat.py", info["server"])
        alice.send({"type": "quit"})
        bob.send({"type": "whois", "nick": "alice"})
        self.assertEqual(bob.expect("whois")["online"], False)
        bob.send({"type": "whois", "nick": "nobody"})
        self.assertEqual(bob.expect("error")["code"], "no-such-user")

    def test_a_pm_to_an_account_not_online_is_kept_and_delivered_at_its_next_login(self):
        self.account("alice")
        bob = self.peer("bob")
        bob.frames()
        bob.send({"type": "pm", "to": "alice", "text": "see you tomorrow"})
        self.assertIn("alice is not online: your message is kept", bob.expect("notice")["text"])
        for i in range(20):
            bob.send({"type": "pm", "to": "alice", "text": f"more {i}"})
        self.assertEqual(len(bob.frames("error")), 11, "at most 10 from one sender")
        alice = self.login("alice")
        kept = alice.frames("msg")
        self.assertEqual([f["text"] for f in kept], ["see you tomorrow"] + [f"more {i}" for i in range(9)])
        self.assertTrue(all(f["kept"] and f["from"] == "bob" for f in kept))
        alice.send({"type": "quit"})
        self.assertEqual(self.login("alice").frames("msg"), [], "delivered once")

    def test_one_sender_cannot_fill_an_inbox_under_new_nicks(self):
        """The attack round's M4: a guest renaming every 10 messages filled an account's 100 slots."""
        self.account("alice")
        alice = self.login("alice")
        alice.send({"type": "quit"})
        mallory = self.peer("mallory", ip="203.0.113.9")
        for i in range(30):
            if i % 10 == 0:
                mallory.send({"type": "nick", "nick": f"mallory{i}"})
            mallory.send({"type": "pm", "to": "alice", "text": "x" * 4000})
        self.assertEqual(len(mallory.frames("error")), 20)
        friend = self.peer("friend", ip="198.51.100.3")
        friend.send({"type": "pm", "to": "alice", "text": "a real message"})
        self.assertIn("your message is kept", friend.expect("notice")["text"])
        kept = self.server.chat.people.records.get("inbox", chat.name_key("alice"))
        self.assertLessEqual(sum(len(line["text"]) for line in kept["lines"]), chat.INBOX_BYTES)
        self.assertNotIn("203.0.113.9", json.dumps(self.login("alice").frames("msg")), "no sender's address")

    def test_an_account_comes_back_where_it_left_off_with_what_it_missed(self):
        self.account("alice")
        alice, bob = self.login("alice"), self.peer("bob")
        alice.send({"type": "join", "room": "dev"})
        bob.send({"type": "join", "room": "dev"}, {"type": "msg", "room": "dev", "text": "before"})
        alice.send({"type": "quit"})
        bob.send(*[{"type": "msg", "room": "dev", "text": f"while away {i}"} for i in range(3)])
        back = self.login("alice")
        self.assertEqual(back.welcome["rooms"], ["lobby", "dev"])
        self.assertTrue(back.welcome["back"])
        self.assertEqual([line["text"] for line in back.welcome["history"]], [f"while away {i}" for i in range(3)])

    def test_the_motd_is_shown_at_welcome(self):
        server = self.harness(motd="welcome to the team chat\nbe kind")
        self.assertEqual(server.connect("alice").welcome["motd"], "welcome to the team chat\nbe kind")


# ---------------------------------------------------------------------------
# 4g. Chat: the protocol's rules
# ---------------------------------------------------------------------------

class SessionTest(HarnessTestCase):
    def test_welcome_and_the_alone_notice(self):
        alice = self.peer("alice")
        self.assertEqual(alice.welcome["nick"], "alice")
        self.assertEqual(alice.welcome["users"], ["alice"])
        self.assertEqual(alice.welcome["history"], [])
        self.assertEqual(alice.welcome["max_payload"], chat.MAX_CLIENT_PAYLOAD)
        self.assertIn("chat.py", alice.welcome["server"])
        notice = alice.next()
        self.assertEqual(notice["type"], "notice")
        self.assertIn("alone", notice["text"])

    def test_everybody_already_there_hears_a_join_and_lines_reach_everyone_else(self):
        alice = self.peer("alice")
        bob = self.peer("bob")
        self.assertEqual(alice.expect("join")["nick"], "bob")
        self.assertEqual(bob.welcome["users"], ["alice", "bob"])
        carol = self.peer("carol")
        self.assertEqual(alice.expect("join", nick="carol")["users"], 3)
        self.assertEqual(bob.expect("join")["nick"], "carol")
        alice.send({"type": "msg", "text": "hi all"})
        for peer in (bob, carol):
            line = peer.expect("msg")
            self.assertEqual((line["from"], line["text"]), ("alice", "hi all"))
            self.assertIsInstance(line["id"], int)
            self.assertIsInstance(line["ts"], float)
        self.assertEqual(alice.sync(), [], "a line is not echoed to its sender")

    def test_me_pm_nick_who_ping(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        alice.send({"type": "me", "text": "waves"})
        self.assertTrue(bob.expect("msg")["action"])
        bob.send({"type": "pm", "to": "ALICE", "text": "psst"})
        pm = alice.expect("msg")
        self.assertEqual((pm["from"], pm["to"], pm["text"]), ("bob", "alice", "psst"))
        bob.send({"type": "pm", "to": "nobody", "text": "hello?"})
        self.assertEqual(bob.expect("error")["code"], "no-such-user")
        bob.send({"type": "nick", "nick": "robert"})
        for peer in (alice, bob):
            event = peer.expect("nick")
            self.assertEqual((event["old"], event["new"]), ("bob", "robert"))
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("who")["users"], ["alice", "robert"])
        alice.send({"type": "ping", "n": 42, "s": "x"})
        pong = alice.expect("pong")
        self.assertEqual((pong["n"], pong["s"]), (42, "x"))

    def test_nicks_are_unique_without_regard_to_case(self):
        self.peer("alice")
        other = self.peer()
        other.send({"type": "hello", "nick": "ALICE"})
        self.assertEqual(other.expect("error")["code"], "nick-taken")
        other.closed()
        carol = self.peer("carol")
        carol.send({"type": "nick", "nick": "Alice"})
        self.assertEqual(carol.expect("error")["code"], "nick-taken")
        carol.send({"type": "nick", "nick": "CAROL"})      # a new case of one's own nick is fine
        self.assertEqual(carol.expect("nick")["new"], "CAROL")

    def test_invalid_nick_is_refused_and_closed(self):
        for nick in ["", "has space", "x" * 33, "\x1b[31mred", "rtl\u202e", 7]:
            with self.subTest(nick=nick):
                peer = self.peer()
                peer.send({"type": "hello", "nick": nick})
                self.assertEqual(peer.expect("error")["code"], "bad-nick")
                peer.closed()

    def test_quit_tells_the_others_with_the_reason(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        bob.send({"type": "quit", "reason": "dinner \x1b[5mtime"})
        self.assertEqual(bob.closed(), [])
        leave = alice.expect("leave")
        self.assertEqual((leave["nick"], leave["reason"], leave["users"]), ("bob", "quit: dinner time", 1))

    def test_a_vanished_client_is_a_leave_too(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        bob.close()
        self.assertEqual(alice.expect("leave")["nick"], "bob")

    def test_history_holds_the_last_50_lines_oldest_first(self):
        alice = self.peer("alice")
        for i in range(60):
            alice.send({"type": "msg", "text": f"line {i}"})
        alice.sync()
        bob = self.peer("bob")
        self.assertEqual([line["text"] for line in bob.welcome["history"]], [f"line {i}" for i in range(10, 60)])
        ids = [line["id"] for line in bob.welcome["history"]]
        self.assertEqual(ids, sorted(ids))

    def test_private_messages_are_never_in_history(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        alice.send({"type": "pm", "to": "bob", "text": "secret"})
        bob.expect("msg")
        self.assertEqual(self.peer("carol").welcome["history"], [])


class KeepaliveTest(HarnessTestCase):
    config = {"ping_interval": 0.2, "idle_timeout": 0.6}

    def test_a_silent_client_is_pinged_then_dropped(self):
        mute = self.peer("mute", autopong=False)
        self.server.advance(0.2)
        self.assertEqual(mute.expect("ping")["type"], "ping")
        alice = self.peer("alice")
        self.server.advance(0.4)
        self.assertEqual(mute.closed()[-1]["code"], "timeout")
        self.assertIn("ping timeout", alice.expect("leave", nick="mute")["reason"])

    def test_a_client_that_answers_stays(self):
        alive = self.peer("alive", autopong=False)
        started = self.server.now
        for _ in range(5):
            self.server.advance(0.4)        # pinged when silent for 0.2 s, checked again 0.4 s later
            alive.expect("ping")
            alive.send({"type": "pong"})
        self.assertGreater(self.server.now - started, 0.6)
        self.assertFalse(alive.gone)

    def test_a_joined_client_trickling_a_frame_is_dropped_as_silent(self):
        alice, slow = self.peer("alice"), self.peer("trickler")
        for byte in chat.encode({"type": "msg", "text": "x" * 200}):
            slow.send_raw(bytes([byte]))
            self.server.advance(0.05)
            if slow.gone:
                break
        self.assertEqual(alice.expect("leave", nick="trickler")["reason"][:12], "ping timeout")
        self.assertEqual(slow.closed()[-1]["code"], "timeout")


class ResumeRulesTest(HarnessTestCase):
    def test_a_half_open_old_connection_is_replaced_by_the_same_user(self):
        alice = self.peer("alice")
        ghost = self.peer("ghost")
        session = ghost.welcome["session"]
        thief = self.peer()
        thief.send({"type": "hello", "nick": "ghost", "session": "guessed"})
        self.assertEqual(thief.expect("error")["code"], "nick-taken")
        back = self.peer("ghost", session=session)
        self.assertEqual(back.welcome["nick"], "ghost")
        self.assertEqual(ghost.expect("error")["code"], "replaced")
        ghost.closed()
        self.assertEqual(alice.expect("leave")["reason"], "reconnected")


class AloneNoticeTest(HarnessTestCase):
    def test_one_alone_notice_not_again_on_a_resume_and_true_numbers(self):
        server = self.harness(history=0)
        alice = server.connect("alice")
        notices = [f["text"] for f in alice.frames("notice")]
        self.assertEqual(notices, ["you are alone in #lobby; nothing said here is kept for whoever joins later"])
        alice.close()
        back = server.connect("alice", session=alice.welcome["session"], instance=alice.welcome["instance"],
                              rooms=["lobby"], since={"lobby": 0})
        self.assertEqual(back.frames("notice"), [], "a resume is no news")
        self.assertIn("the last 1 line said", self.harness(history=1).connect("bob").frames("notice")[0]["text"])


class BadInputTest(BadInputChecks, HarnessTestCase):
    def test_every_class_of_bad_input(self):
        cases = [
            ("length over the maximum", struct.pack(">I", 2**31) + b"x", "frame-too-large", True),
            ("invalid UTF-8", frame_bytes(b'{"type":"msg","text":"\xff"}'), "bad-frame", True),
            ("invalid JSON", frame_bytes(b'{"type":"msg"'), "bad-frame", True),
            ("not an object", frame_bytes(b'["msg"]'), "bad-frame", True),
            ("no type", frame_bytes(b'{"text":"hi"}'), "bad-frame", True),
            ("type not a string", frame_bytes(b'{"type":["msg"]}'), "bad-frame", True),
            ("deep nesting", frame_bytes(b"[" * 30000 + b"]" * 30000), "bad-frame", True),
            ("unknown type", chat.encode({"type": "teleport"}), "unknown-type", False),
            ("text not a string", chat.encode({"type": "msg", "text": 5}), "bad-field", False),
            ("text too long", chat.encode({"type": "msg", "text": "x" * 5000}), "text-too-long", False),
            ("text of escapes only", chat.encode({"type": "msg", "text": "\x1b[2J"}), "bad-field", False),
            ("pm without to", chat.encode({"type": "pm", "text": "x"}), "no-such-user", False),
            ("nick with bidi override", chat.encode({"type": "nick", "nick": "a\u202eb"}), "bad-nick", False),
            ("over-long nick", chat.encode({"type": "nick", "nick": "n" * 33}), "bad-nick", False),
            ("second hello", chat.encode({"type": "hello", "nick": "again"}), "already-joined", False),
            ("room that does not exist", chat.encode({"type": "msg", "text": "x", "room": "nope"}),
             "no-such-room", False),
        ]
        for name, data, code, closes in cases:
            with self.subTest(name):
                self.check(data, code, closes)

    def test_before_hello(self):
        for name, data, code in [
            ("msg before hello", chat.encode({"type": "msg", "text": "hi"}), "not-joined"),
            ("hello with an over-long nick", chat.encode({"type": "hello", "nick": "n" * 40}), "bad-nick"),
            ("hello with control characters", chat.encode({"type": "hello", "nick": "a\x07"}), "bad-nick"),
            ("hello without a nick", chat.encode({"type": "hello"}), "bad-nick"),
        ]:
            with self.subTest(name):
                self.check(data, code, closes=True, joined=False)

    def test_escape_sequences_are_stripped_before_relaying(self):
        self.alice.send({"type": "msg", "text": "\x1b]0;owned\x07\x1b[31mred\x1b[0m\x00 and\ttab\r\nline \u202eok"})
        self.assertEqual(self.bob.expect("msg")["text"], "red and\ttab\nline ok")

    def test_a_truncated_frame_then_close_is_a_leave(self):
        mallory = self.peer("mallory")
        with self.assertLogs("chat", logging.INFO) as logs:
            mallory.send_raw(chat.encode({"type": "msg", "text": "cut short"})[:10])
            mallory.close()
            self.assertEqual(self.alice.expect("leave")["nick"], "mallory")
        self.assertTrue(any("middle of a frame" in line for line in logs.output))
        self.assert_unaffected()

    def test_a_silent_connection_is_dropped_after_the_hello_timeout(self):
        silent = self.peer()
        self.server.advance(0.5)
        frames = silent.closed()
        self.assertEqual(frames[-1]["code"], "timeout")
        self.assert_unaffected()

    def test_slowloris_trickling_a_hello_is_dropped_at_the_hello_timeout(self):
        slow, started = self.peer(), self.server.now
        for byte in chat.encode({"type": "hello", "nick": "slowpoke"})[:-1]:    # never completes the frame
            slow.send_raw(bytes([byte]))
            self.server.advance(0.05)
            if slow.gone:
                break
        self.assertEqual(slow.closed()[-1]["code"], "timeout")
        self.assertLessEqual(self.server.now - started, 0.5 + 0.05)
        self.assert_unaffected()


class LoneSurrogateTest(BadInputChecks, HarnessTestCase):
    """Item 1: one 45-byte frame killed the server (and see WireTest)."""

    def test_a_lone_surrogate_in_any_field_of_any_frame(self):
        fields = {"hello": ["nick", "session", "password", "instance"], "msg": ["text", "room"], "me": ["text"],
                  "pm": ["to", "text"], "nick": ["nick"], "who": ["room"], "ping": ["token"],
                  "pong": ["x"], "join": ["room"], "part": ["room"], "rooms": ["x"], "quit": ["reason"],
                  "teleport": ["x"]}
        cases = [('{"type":%s}' % LONE).encode()]
        for kind, names in fields.items():
            for name in names:
                cases.append(('{"type":"%s","%s":%s}' % (kind, name, LONE)).encode())
                cases.append(('{"type":"%s","%s":["a",{"b":%s}]}' % (kind, name, LONE)).encode())
            cases.append(('{"type":"%s",%s:"key"}' % (kind, LONE)).encode())
        for payload in cases:
            with self.subTest(payload):
                self.check(frame_bytes(payload), "bad-frame", closes=True)

    def test_surrogates_before_hello_and_in_hello(self):
        for payload in (b'{"type":"hello","nick":"x","session":"\\udfff"}',
                        b'{"type":"hello","nick":"x","since":{"\\ud800":1},"rooms":["\\ud800"]}'):
            with self.subTest(payload):
                self.check(frame_bytes(payload), "bad-frame", closes=True, joined=False)

    def test_a_valid_surrogate_pair_is_an_ordinary_character(self):
        self.alice.send_raw(frame_bytes(b'{"type":"msg","text":"\\ud83d\\ude00 ok"}'))
        self.assertEqual(self.bob.expect("msg")["text"], "\U0001F600 ok")

    def test_a_non_ascii_session_is_compared_not_crashed_on(self):
        self.check(chat.encode({"type": "hello", "nick": "alice", "session": "\u00e9t\u00e9"}), "nick-taken",
                   closes=True, joined=False)


class FuzzTest(HarnessTestCase):
    """Random frames of every type, with fields of every shape, from several
    connections: each is refused or handled, never an internal error."""

    VALUES = [None, True, 0, -1, 2 ** 63, 1.5, float("inf"), "", "x", "#lobby", "lobby", "a" * 40,
              "\x1b[2J", "\u202e", "\u3164", "\U0001F600", [], ["lobby"], [1, [2, {}]], {}, {"lobby": 3},
              {"lobby": "x"}, {"x": None}]
    TYPES = ["hello", "msg", "me", "pm", "nick", "who", "ping", "pong", "quit", "join", "part", "rooms",
             "teleport", ""]
    FIELDS = ["nick", "text", "to", "room", "rooms", "since", "session", "instance", "password", "reason",
              "token", "type"]

    def test_random_frames_never_break_the_server(self):
        rng = random.Random(11)
        server = self.harness(flood_rate=1e6, flood_burst=1e6, password=None)
        watcher = server.connect("watcher")
        with self.assertLogs("chat", logging.DEBUG) as logs:
            for round_ in range(200):
                client = server.connect(f"fuzz{round_}" if rng.random() < 0.8 else None, ip=f"198.51.100.{round_ + 1}")
                for _ in range(rng.randrange(1, 20)):
                    frame = {"type": rng.choice(self.TYPES)}
                    for field in rng.sample(self.FIELDS, rng.randrange(0, 4)):
                        frame[field] = rng.choice(self.VALUES)
                    if type(frame["type"]) is not str:
                        frame["type"] = "msg"
                    try:
                        data = chat.encode(frame)
                    except ValueError:      # inf is not JSON
                        continue
                    client.send_raw(data)
                    if client.gone:
                        break
                if not client.gone and rng.random() < 0.5:
                    client.close()
            chat.log.info("done")
        self.assertFalse([line for line in logs.output if "internal error" in line])
        watcher.send({"type": "ping", "token": "alive"})
        self.assertEqual(watcher.expect("pong")["token"], "alive")


class InternalErrorTest(HarnessTestCase):
    def test_a_bug_in_a_handler_costs_that_connection_only(self):
        alice, bob = self.peer("alice"), self.peer("bob")

        def broken(conn, frame):
            raise RuntimeError("a bug")
        self.server.chat.handlers["rooms"] = broken
        with self.assertLogs("chat", logging.ERROR) as logs:
            bob.send({"type": "rooms"})
            self.assertEqual(bob.expect("error")["code"], "internal")
            bob.closed()
        self.assertIn("a bug", "\n".join(logs.output))
        self.assertEqual(alice.expect("leave")["nick"], "bob")
        alice.send({"type": "ping"})
        alice.expect("pong")
        self.peer("carol")


# ---------------------------------------------------------------------------
# 4h. IRC: the same chat in a second dialect
# ---------------------------------------------------------------------------

def names_of(line):
    """The nicks of a 353 (NAMES) line, prefixes kept."""
    return line.params[-1].split()


class IrcRegistrationTest(HarnessTestCase):
    """What an IRC client sees from CAP LS to its 001, and what it may not do before."""

    def test_a_client_registers_and_is_told_what_the_server_is(self):
        alice = self.server.irc()
        alice.send("CAP LS 302", "NICK alice", "USER al 0 * :Alice A")
        caps = alice.expect("CAP")
        self.assertEqual(caps.params[:2], ["*", "LS"])
        for cap in ("server-time", "echo-message", "message-tags", "multi-prefix", "sasl"):
            self.assertIn(cap, caps.params[-1])
        self.assertEqual(alice.frames("001"), [], "no welcome while CAP is negotiated")
        alice.send("CAP REQ :server-time multi-prefix", "CAP END")
        self.assertEqual(alice.expect("CAP").params[1:], ["ACK", "server-time multi-prefix"])
        self.assertEqual(alice.expect("001").params[0], "alice")
        isupport = " ".join(" ".join(line.params) for line in alice.frames("005"))
        for token in ("CHANTYPES=#", f"NICKLEN={chat.NAME_MAX}", "CASEMAPPING=rfc8265", "UTF8ONLY", "TARGMAX=",
                      "CLIENTTAGDENY=*"):    # (client-only tags are not relayed: said, as IRCv3 asks)
            self.assertIn(token, isupport)
        # A frame client sees the IRC user like any other, with the username and realname it gave.
        bob = self.peer("bob")
        bob.send({"type": "whois", "nick": "alice"})
        whois = bob.expect("whois")
        self.assertEqual((whois["nick"], whois.get("realname")), ("alice", "Alice A"))

    def test_without_cap_the_client_is_welcomed_on_nick_and_user(self):
        alice = self.server.irc()
        alice.send("NICK alice", "USER al 0 * :Alice")
        self.assertEqual(alice.expect("001").params[0], "alice")
        alice.expect("422")     # no --motd: said so, as IRC says it

    def test_a_taken_nick_or_a_look_alike_gets_433_and_the_client_may_try_another(self):
        self.peer("alice")
        irc = self.server.irc()
        irc.send("NICK alice", "USER a 0 * :A")
        self.assertEqual(irc.expect("433").params[1], "alice")
        irc.send("NICK al\u00edce")     # alíce: a look-alike
        irc.expect("433")
        irc.send("NICK alice_")
        self.assertEqual(irc.expect("001").params[0], "alice_")

    def test_a_bad_nick_gets_432(self):
        irc = self.server.irc()
        irc.send("NICK #nope", "USER a 0 * :A")
        irc.expect("432")
        irc.send("NICK fine")
        irc.expect("001")

    def test_commands_before_registering_get_451_and_no_more_than_a_few_lines_are_taken(self):
        irc = self.server.irc()
        irc.send("JOIN #early")
        irc.expect("451")
        self.assertIsNone(self.server.chat.rooms.get("early"))
        irc.send(*["CAP LS"] * chat.IRC_EARLY_MAX)
        self.assertTrue(irc.gone)

    def test_the_server_password_is_pass(self):
        server = self.harness(password="s3cret")
        wrong = server.irc()
        wrong.send("PASS nope", "NICK bob", "USER b 0 * :B")
        wrong.expect("464")
        self.assertEqual(wrong.frames("001"), [])
        right = server.irc()
        right.send("PASS s3cret", "NICK alice", "USER a 0 * :A")
        server.advance(chat.ServerConfig.auth_delay)     # a try after a wrong one waits its turn, then is let in
        self.assertEqual(right.expect("001").params[0], "alice")

    def test_nobody_takes_the_servers_name_or_a_services_name(self):
        for nick in ("chat.py", "NickServ", "ch\u0430t.py"):
            irc = self.server.irc()
            irc.send(f"NICK {nick}", "USER a 0 * :A")
            irc.expect("432")
        alice = self.peer("alice")
        alice.send({"type": "nick", "nick": "ChanServ"})
        self.assertEqual(alice.expect("error")["code"], "bad-nick")

    def register_offline(self, nick, password):
        """`nick` is an account whose owner is not connected."""
        owner = self.peer(nick)
        owner.send({"type": "register", "password": password}, {"type": "quit"})
        self.server.advance(1)

    def test_user_twice_gets_462(self):
        alice = self.server.irc("alice")
        alice.send("USER again 0 * :Again")
        alice.expect("462")

    def test_an_account_logs_in_with_sasl_plain(self):
        self.register_offline("alice", "alicepw")
        irc = self.server.irc()
        token = base64.b64encode(b"alice\0alice\0alicepw").decode()
        irc.send("CAP LS 302", "CAP REQ :sasl", "NICK alice", "USER a 0 * :A", "AUTHENTICATE PLAIN")
        self.assertEqual(irc.expect("AUTHENTICATE").params, ["+"])
        irc.send(f"AUTHENTICATE {token}")
        logged_in = irc.expect("900").params
        self.assertEqual((logged_in[0], logged_in[1].split("@")[0], logged_in[2]), ("alice", "alice!a", "alice"))
        self.assertEqual(irc.expect("903").params[0], "alice")
        irc.send("CAP END")
        self.assertEqual(irc.expect("001").params[0], "alice")

    def test_sasl_after_a_typo_waits_its_turn_and_is_let_in(self):
        self.register_offline("alice", "alicepw")
        irc = self.server.irc()
        irc.send("CAP LS 302", "CAP REQ :sasl", "NICK alice", "USER a 0 * :A")
        for password in ("alicepx", "alicepw"):     # (the right one right after the typo)
            token = base64.b64encode(f"alice\0alice\0{password}".encode()).decode()
            irc.send("AUTHENTICATE PLAIN", f"AUTHENTICATE {token}")
        self.server.advance(5)
        self.assertEqual([line.command for line in irc.frames() if line.command in ("904", "900", "903")],
                         ["904", "900", "903"], "a typo costs a wait, never the right password")
        irc.send("CAP END")
        self.assertEqual(irc.expect("001").params[0], "alice")

    def test_on_a_server_with_no_password_pass_is_the_accounts(self):
        self.register_offline("alice", "alicepw")
        irc = self.server.irc()
        irc.send("NICK alice", "USER a 0 * :A")
        irc.expect("433")       # registered: not without its password
        irc = self.server.irc("alice", password="alicepw")
        self.assertEqual(irc.welcome.params[0], "alice")

    def test_a_wrong_sasl_password_gets_904_and_the_nick_stays_its_owners(self):
        self.register_offline("alice", "alicepw")
        irc = self.server.irc()
        token = base64.b64encode(b"alice\0alice\0guess").decode()
        irc.send("CAP LS 302", "CAP REQ :sasl", "NICK alice", "USER a 0 * :A", "AUTHENTICATE PLAIN",
                 f"AUTHENTICATE {token}")
        self.server.advance(30)     # a wrong password is answered late
        irc.expect("904")
        irc.send("CAP END")
        self.server.advance(30)
        self.assertNotIn("001", [line.command for line in irc.frames()])
        self.assertNotEqual(self.server.chat.users.get("alice"), irc.conn)


class IrcChatTest(HarnessTestCase):
    """IRC users and frame users in the same rooms, each seeing the other right."""

    def setUp(self):
        super().setUp()
        self.bob = self.peer("bob")
        self.alice = self.server.irc("alice")
        self.alice.send("JOIN #lobby")
        self.alice.expect("366")
        self.bob.frames()

    def test_join_shows_the_topic_the_names_then_history_with_server_time(self):
        self.bob.send({"type": "join", "room": "team"}, {"type": "topic", "room": "team", "text": "plans"},
                      {"type": "msg", "room": "team", "text": "said before"})
        carol = self.server.irc("carol", caps=["server-time"])
        carol.send("JOIN #team")
        self.assertEqual(carol.expect("JOIN").params, ["#team"])
        self.assertEqual(carol.expect("332").params[-1], "plans")
        self.assertEqual(sorted(names_of(carol.expect("353"))), ["@bob", "carol"])
        carol.expect("366")
        said = carol.expect("PRIVMSG")
        self.assertEqual(said.params, ["#team", "said before"])
        self.assertTrue(said.startswith("@time=20"), said)

    def test_lines_cross_both_ways(self):
        self.alice.send("PRIVMSG #lobby :hello \x02bold\x02 \x0304red\x03 world")
        msg = self.bob.expect("msg")
        self.assertEqual((msg["from"], msg["text"]), ("alice", "hello bold red world"))
        self.bob.send({"type": "msg", "text": "hi irc"})
        line = self.alice.expect("PRIVMSG")
        self.assertEqual(line.params, ["#lobby", "hi irc"])
        self.assertTrue(line.parts[1].startswith("bob!"))

    def test_actions_are_ctcp_action_and_other_ctcp_goes_nowhere(self):
        self.alice.send("PRIVMSG #lobby :\x01ACTION waves\x01", "PRIVMSG #lobby :\x01VERSION\x01",
                        "PRIVMSG bob :\x01PING 123\x01")
        me = self.bob.expect("msg")
        self.assertEqual((me["text"], me.get("action")), ("waves", True))
        self.assertEqual(self.bob.frames("msg"), [])
        self.bob.send({"type": "me", "text": "nods"})
        self.assertEqual(self.alice.expect("PRIVMSG").params, ["#lobby", "\x01ACTION nods\x01"])

    def test_pms_cross_both_ways_and_a_missing_nick_is_401(self):
        self.alice.send("PRIVMSG bob :psst")
        pm = self.bob.expect("msg")
        self.assertEqual((pm["from"], pm["to"], pm["text"]), ("alice", "bob", "psst"))
        self.bob.send({"type": "pm", "to": "alice", "text": "yes?"})
        self.assertEqual(self.alice.expect("PRIVMSG").params, ["alice", "yes?"])
        self.alice.send("PRIVMSG nobody :hi")
        self.assertEqual(self.alice.expect("401").params[1], "nobody")

    def test_a_notice_is_never_answered_with_an_error(self):
        self.alice.send("NOTICE nobody :hi", "NOTICE #nowhere :hi", "NOTICE", "PING sync")
        self.assertEqual([line.command for line in self.alice.frames()], ["PONG"])
        self.alice.send("NOTICE bob :fyi")
        self.assertEqual(self.bob.expect("msg", notice=True)["text"], "fyi")

    def test_a_long_chat_line_reaches_irc_as_several_privmsgs_nothing_lost(self):
        carol = self.server.irc("carol", caps=["server-time", "message-tags"])
        carol.send("JOIN #lobby")
        carol.expect("366")
        words = [f"wörd{i}✓" for i in range(300)]
        self.bob.send({"type": "msg", "text": " ".join(words[:150]) + "\n" + " ".join(words[150:])})
        for client in (self.alice, carol):
            lines = client.frames("PRIVMSG")
            self.assertGreater(len(lines), 4)
            for line in lines:
                self.assertLessEqual(len(line.partition(" ")[2] if line.startswith("@") else line) + 2, 512)
            self.assertEqual(" ".join(line.params[-1] for line in lines).split(), words)

    def test_names_and_who_list_both_worlds_and_who_lists_irc_users(self):
        self.alice.send("NAMES #lobby")
        self.assertEqual(sorted(names_of(self.alice.expect("353"))), ["alice", "bob"])
        self.alice.send("WHO #lobby")
        whos = [line.params[5] for line in self.alice.frames("352")]
        self.assertEqual(sorted(whos), ["alice", "bob"])
        self.bob.send({"type": "who"})
        self.assertEqual(sorted(self.bob.expect("who")["users"]), ["alice", "bob"])
        self.bob.send({"type": "rooms"})
        self.assertEqual(self.bob.expect("rooms")["rooms"][0]["users"], 2)

    def test_join_part_nick_and_quit_are_the_irc_events(self):
        carol = self.peer("carol")
        self.assertEqual(self.alice.expect("JOIN").parts[1].split("!")[0], "carol")
        carol.send({"type": "nick", "nick": "caroline"})
        nick = self.alice.expect("NICK")
        self.assertEqual((nick.parts[1].split("!")[0], nick.params), ("carol", ["caroline"]))
        carol.send({"type": "part", "room": "lobby"})
        self.assertEqual(self.alice.expect("PART").params[0], "#lobby")
        self.alice.send("NICK alicia")
        self.assertEqual(self.bob.expect("nick", old="alice")["new"], "alicia")
        self.alice.send("QUIT :off to lunch")
        leave = self.bob.expect("leave")
        self.assertEqual((leave["nick"], leave["how"]), ("alicia", "quit"))
        self.assertIn("off to lunch", leave["reason"])
        self.assertTrue(self.alice.closed()[-1].startswith("ERROR"))

    def test_someone_leaving_two_shared_rooms_is_one_quit(self):
        carol = self.server.irc("carol")
        carol.send("JOIN #lobby,#dev")
        self.alice.send("JOIN #dev")
        self.alice.expect("366")
        self.alice.frames()
        carol.send("QUIT :bye")
        self.assertEqual(len(self.alice.frames("QUIT")), 1)

    def test_bad_lines_get_a_clear_answer_and_harm_nobody(self):
        self.alice.send_raw(b"PRIVMSG #lobby :caf\xe9\r\n")
        self.assertEqual(self.alice.expect("FAIL").params[:2], ["*", "INVALID_UTF8"])
        self.alice.send_raw(b"PRIVMSG #lobby :a\x00b\r\n")
        self.assertIn("NUL", self.alice.expect("NOTICE").params[-1])
        self.alice.send("PRIVMSG #lobby :" + "x" * 600)
        self.alice.expect("417")
        self.alice.send("FROBNICATE now")
        self.assertEqual(self.alice.expect("421").params[1], "FROBNICATE")
        self.alice.send("PRIVMSG #lobby :still here")
        self.assertEqual([f["text"] for f in self.bob.frames("msg")], ["still here"])

    def test_missing_parameters_and_rooms_get_their_numerics(self):
        self.bob.send({"type": "join", "room": "dev"})
        self.alice.send("JOIN", "PART #dev", "PART #nowhere", "TOPIC #nowhere", "KICK #lobby")
        self.assertEqual([line.command for line in self.alice.frames()], ["461", "442", "403", "403", "461"])

    def test_an_invite_refused_names_the_channel_and_443_who_is_there(self):
        self.bob.send({"type": "join", "room": "dev"}, {"type": "mode", "room": "dev", "modes": "+i"})
        self.alice.send("INVITE bob #dev")
        self.assertEqual(self.alice.expect("442").params[:2], ["alice", "#dev"])
        self.bob.send({"type": "mode", "room": "dev", "modes": "-i"})
        self.alice.send("JOIN #dev", "INVITE carol #dev", "INVITE bob #dev")
        self.assertEqual(self.alice.expect("401").params[:2], ["alice", "carol"])
        self.assertEqual(self.alice.expect("443").params[:3], ["alice", "bob", "#dev"])
        self.bob.send({"type": "mode", "room": "dev", "modes": "+i"})
        self.alice.send("INVITE carol #dev")
        self.assertEqual(self.alice.expect("482").params[:2], ["alice", "#dev"])

    def test_a_topics_setter_list_modes_and_user_modes(self):
        self.bob.send({"type": "join", "room": "team"}, {"type": "topic", "room": "team", "text": "plans"})
        self.alice.send("JOIN #team")
        self.assertEqual(self.alice.expect("333").params[2], self.server.chat.directory.ident("bob"), "nick!user@host")
        self.alice.expect("366")
        self.alice.send("MODE #team e", "MODE #team +I", "MODE alice +i", "MODE alice +Z")
        self.assertEqual([(line.command, line.params[1]) for line in self.alice.frames()],
                         [("349", "#team"), ("347", "#team"), ("221", "+i"), ("501", "Unknown MODE flag")])

    def test_topic_away_ison_and_userhost(self):
        self.alice.send("TOPIC #lobby :release friday")
        self.alice.expect("482")    # #lobby's topic is the server operators' (+t)
        self.bob.send({"type": "join", "room": "team"})
        self.alice.send("JOIN #team", "TOPIC #team :release friday")
        self.assertEqual(self.alice.expect("482").params[1], "#team")   # bob opened #team: its operator
        self.bob.send({"type": "topic", "room": "team", "text": "release friday"})
        self.assertEqual(self.alice.expect("TOPIC").params, ["#team", "release friday"])
        self.bob.send({"type": "away", "text": "at lunch"})
        self.alice.send("PRIVMSG bob :there?")
        self.assertEqual(self.alice.expect("301").params[-1], "at lunch")
        self.alice.send("ISON bob nobody alice", "USERHOST bob")
        self.assertEqual(self.alice.expect("303").params[-1].split(), ["alice", "bob"])
        self.assertTrue(self.alice.expect("302").params[-1].startswith("bob=-"))

    def test_the_opener_is_op_and_modes_are_the_rooms_rules(self):
        self.alice.send("JOIN #ops")
        self.assertIn("@alice", names_of(self.alice.expect("353")))
        self.alice.send("MODE #ops +m")
        self.assertEqual(self.alice.expect("MODE").params[:2], ["#ops", "+m"])
        self.bob.send({"type": "join", "room": "ops"}, {"type": "msg", "room": "ops", "text": "hi"})
        self.assertEqual(self.bob.expect("error")["code"], "moderated")
        self.alice.send("MODE #ops +v bob")
        self.alice.expect("MODE")
        self.bob.send({"type": "msg", "room": "ops", "text": "hi"})
        self.assertEqual(self.alice.expect("PRIVMSG").params, ["#ops", "hi"])
        self.alice.send("MODE #ops +q bob")       # a quiet: bob is muted in #ops
        self.assertIn("muted bob", self.alice.expect("NOTICE").params[-1])
        self.bob.send({"type": "msg", "room": "ops", "text": "hush"})
        self.assertEqual(self.bob.expect("error")["code"], "muted")
        self.alice.send("MODE #ops q")
        self.assertEqual(self.alice.expect("728").params[1:4], ["#ops", "q", "bob!*@*"])
        self.alice.send("MODE #ops -q bob")
        self.alice.expect("NOTICE")
        self.alice.send("KICK #ops bob :enough")
        kicked = self.bob.expect("parted", room="ops")
        self.assertEqual((kicked["how"], kicked["by"]), ("kick", "alice"))

    def test_a_frame_users_lines_are_encoded_once_for_all_irc_readers_alike(self):
        carol = self.server.irc("carol")
        carol.send("JOIN #lobby")
        carol.expect("366")
        self.bob.send({"type": "msg", "text": "once"})
        self.assertEqual(self.alice.frames("PRIVMSG"), carol.frames("PRIVMSG"))

    def test_oper_kill_and_an_echoed_pm_says_whom_it_went_to(self):
        server = self.harness(ops=("root",))
        root = server.connect("root", ip="127.0.0.1")
        root.send({"type": "register", "password": "rootpw"}, {"type": "quit"})
        alice, bob = server.irc("alice", caps=["echo-message"]), server.irc("bob")
        alice.send("KILL bob :spam")
        alice.expect("481")
        alice.send("OPER root wrong")
        alice.expect("464")
        server.advance(30)
        alice.send("OPER root rootpw")
        server.advance(1)
        alice.expect("381")
        self.assertEqual(alice.expect("MODE").params, ["alice", "+o"])
        alice.send("PRIVMSG bob :last words")
        self.assertEqual(alice.expect("PRIVMSG").params, ["bob", "last words"])     # the echo
        alice.send("KILL bob :spam", "KILL nobody")
        self.assertTrue(bob.gone)
        self.assertEqual(alice.expect("401").params[1], "nobody")

    def test_a_who_mask_costs_by_the_users_it_looks_at(self):
        server = self.harness(flood_burst=20, flood_rate=1, max_connections=400)
        for i in range(300):
            server.connect(f"user{i}", ip=f"10.0.{i // 200}.{i % 200 + 1}")
        alice = server.irc("alice")
        alice.send(*["WHO nomatch*"] * 10, "PING done")
        self.assertLess(len(alice.frames("315")), 10)       # three tokens a look at 300: slowed
        alice.send("WHO user29?")
        server.advance(30)
        self.assertEqual(sorted(line.params[5] for line in alice.frames("352")),
                         [f"user29{i}" for i in range(10)])

    def test_irc_users_are_priced_per_command_like_anyone(self):
        server = self.harness(flood_burst=20, flood_rate=1)
        alice = server.irc("alice")
        alice.send("JOIN #lobby")
        bob = server.connect("bob")
        alice.send(*[f"PRIVMSG #lobby :{i}" for i in range(200)])
        self.assertLess(len(bob.frames("msg")), 40)


class IrcLineTest(unittest.TestCase):
    def test_masks_match_as_irc_has_them_in_linear_time(self):
        self.assertTrue(chat.mask_matches("bob!user@host", "bob!*@*"))
        self.assertTrue(chat.mask_matches("bob", "b?b"))
        self.assertFalse(chat.mask_matches("bob", "[b]ob"))     # brackets are themselves, no class
        self.assertTrue(chat.mask_matches("[b]ob", "[b]ob"))
        self.assertFalse(chat.mask_matches("alice", "*a*a*b"))
        started = time.process_time()
        for _ in range(100):
            self.assertFalse(chat.mask_matches("a" * 32, "*a" * 40 + "b"))  # backtracking would take years
        self.assertLess(time.process_time() - started, 1.0)

    def test_pieces_cut_between_words_and_never_inside_a_character(self):
        self.assertEqual(chat.irc_pieces("a b", 10), ["a b"])
        self.assertEqual(chat.irc_pieces("one\ntwo", 10), ["one", "two"])
        self.assertEqual(chat.irc_pieces("hello world again", 12), ["hello world", "again"])
        pieces = chat.irc_pieces("é" * 20, 7)
        self.assertTrue(all(len(piece.encode()) <= 7 for piece in pieces))
        self.assertEqual("".join(pieces), "é" * 20)
        self.assertEqual(chat.irc_pieces("", 10), [" "])

    def test_formatting_codes_are_taken_out(self):
        self.assertEqual(chat.irc_text("\x02b\x02 \x0312,4c\x03 \x1di\x1d \x04ff0000x\x0f"), "b c i x")

    def test_lines_split_into_command_and_params(self):
        self.assertEqual(chat.irc_split(":pre privmsg #a :hi there"), ("PRIVMSG", ["#a", "hi there"]))
        self.assertEqual(chat.irc_split("NICK  bob"), ("NICK", ["bob"]))
        self.assertEqual(chat.irc_split("   "), ("", []))


# ---------------------------------------------------------------------------
# 5. Server loop: sockets, TLS, timers, signals
# ---------------------------------------------------------------------------

class WireTest(ServerTestCase):
    """What only real sockets show."""

    def test_the_45_byte_frame_that_killed_the_server(self):
        alice, mallory = self.peer("alice"), self.peer("mallory")
        data = frame_bytes(b'{"type":"pm","to":"\\ud800","text":"hi"}')
        self.assertEqual(len(data), 43)
        mallory.send_raw(data)
        self.assertEqual(mallory.closed()[-1]["code"], "bad-frame")
        self.assertEqual(alice.expect("leave")["nick"], "mallory")
        alice.send({"type": "ping"})
        alice.expect("pong")

    def test_a_burst_of_1000_connects_and_disconnects(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        baseline = self.server.call(lambda: len(self.server.loop.open))
        for _ in range(1000):
            socket.create_connection(("127.0.0.1", self.port)).close()
        wait_until(lambda: self.server.call(lambda: len(self.server.loop.open)) == baseline,
                   what="every burst connection to be closed")
        alice.send({"type": "msg", "text": "still fine?"})
        self.assertEqual(bob.expect("msg")["text"], "still fine?")
        self.peer("latecomer")


class ErrorPathTest(ServerTestCase):
    def test_a_failure_while_answering_a_refusal_costs_that_connection_only(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        real_send = chat.Output.send

        def failing_send(output, conn, frame):
            if frame.get("code") == "unknown-type":
                raise UnicodeEncodeError("utf-8", "x", 0, 1, "a bug while answering")
            return real_send(output, conn, frame)
        with unittest.mock.patch.object(chat.Output, "send", failing_send), \
                self.assertLogs("chat", logging.ERROR) as logs:
            bob.send({"type": "teleport"})
            self.assertEqual(bob.closed()[-1]["code"], "internal")
        self.assertIn("a bug while answering", "\n".join(logs.output))
        self.assertEqual(alice.expect("leave")["nick"], "bob")
        alice.send({"type": "ping"})
        alice.expect("pong")

    def test_a_failing_timer_costs_its_connection_only(self):
        alice, _ = self.peer("alice"), self.peer("bob")
        bob_conn = self.server.call(lambda: self.server.loop.chat.users[chat.name_key("bob")])

        def broken(conn):
            raise RuntimeError("a timer bug")
        with self.assertLogs("chat", logging.ERROR) as logs:
            self.server.call(lambda: self.server.loop.call_later(0, broken, bob_conn))
            self.assertEqual(alice.expect("leave")["nick"], "bob")
        self.assertIn("a timer bug", "\n".join(logs.output))
        alice.send({"type": "ping"})
        alice.expect("pong")


class SlowReaderTest(ServerTestCase):
    config = {"max_buffer": 256 * 1024, "flood_rate": 1e6, "flood_burst": 1e6}

    def test_a_client_that_never_reads_is_dropped_and_nobody_else_waits(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        sleeper_sock = socket.socket()
        sleeper_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper_sock.connect(("127.0.0.1", self.port))
        sleeper = Peer(self.port, "sleeper", sock=sleeper_sock)
        self.addCleanup(sleeper.close)
        bob.expect("join", nick="sleeper")
        text = "y" * 4000
        received, sent, dropped = 0, 0, None
        deadline = time.monotonic() + 20
        while dropped is None:      # alice talks flat out; bob keeps up; the sleeper never reads
            self.assertLess(time.monotonic(), deadline, "the sleeper was never dropped")
            for _ in range(20):
                alice.send({"type": "msg", "text": text})
                sent += 1
            while received < sent:
                frame = bob.next()
                if frame["type"] == "msg":
                    received += 1
                elif frame["type"] == "leave":
                    dropped = frame
        self.assertEqual(dropped["nick"], "sleeper")
        self.assertIn("too slow", dropped["reason"])
        self.assertEqual(alice.expect("leave")["nick"], "sleeper")
        self.assertGreater(sent * 4000, 256 * 1024)
        alice.send({"type": "msg", "text": "after"})
        self.assertEqual(bob.expect("msg", text="after")["text"], "after")
        self.assertLessEqual(self.server.call(lambda: max(c.queued for c in self.server.loop.open)),
                             256 * 1024 + 65536)


@unittest.skipUnless(os.path.exists("/proc/self/stat"), "measures CPU through /proc")
class ResourceLimitTest(unittest.TestCase):
    def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(self):
        def few_fds():
            resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))
        server = subprocess.Popen([sys.executable, CHAT, "server", "-p", "0"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=few_fds)
        self.addCleanup(server.stderr.close)
        self.addCleanup(server.stdout.close)
        self.addCleanup(server.wait)
        self.addCleanup(server.kill)
        port = int(re.search(r"listening on \S+:(\d+)", server.stdout.readline())[1])
        hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        try:
            while "cannot accept" not in server.stderr.readline():
                pass
            def cpu():
                with open(f"/proc/{server.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            before, started = cpu(), time.monotonic()
            time.sleep(1.0)     # a measurement window, not synchronisation
            used = (cpu() - before) / (time.monotonic() - started)
            self.assertLess(used, 0.5, "the server spins while it cannot accept")
        finally:
            for hog in hogs:
                hog.close()
        peers = []

        def joined():   # accepted again once the server has seen the hogs go
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            try:
                peers.append(Peer(port, "after", sock=sock))
                return True
            except (AssertionError, OSError):
                sock.close()
                return False
        wait_until(joined, what="a connection accepted again")
        self.assertEqual(peers[0].welcome["nick"], "after")
        peers[0].close()


class IrcWireTest(ServerTestCase):
    """IRC on real sockets: on the frames' port and on --irc-port, beside frame clients."""
    config = {"irc_port": 0}

    def irc(self, nick=None, port=None, **options):
        peer = IrcPeer(port or self.port, nick, **options)
        self.addCleanup(peer.close)
        return peer

    def test_irc_and_frame_clients_share_the_port_and_the_room(self):
        bob = self.peer("bob")
        alice = self.irc("alice")
        alice.send("JOIN #lobby")
        alice.expect("366")
        self.assertEqual(bob.expect("join")["nick"], "alice")
        alice.send("PRIVMSG #lobby :" + "from irc " * 10)
        self.assertEqual(bob.expect("msg")["text"], "from irc " * 10)
        bob.send({"type": "msg", "text": "é" * 1000})     # 2,000 bytes: 5 lines
        bob.send({"type": "msg", "text": "end"})
        pieces = []
        while not pieces or pieces[-1] != "end":
            pieces.append(alice.expect("PRIVMSG").params[-1])
        self.assertEqual(("".join(pieces[:-1]), len(pieces)), ("é" * 1000, 6))

    def test_the_irc_port_speaks_only_irc(self):
        irc_port = self.server.loop.irc_address[1]
        alice = self.irc("alice", port=irc_port)
        bob = self.peer("bob")
        alice.send("JOIN #lobby", "PRIVMSG #lobby :on 6667")
        self.assertEqual(bob.expect("msg")["text"], "on 6667")
        frames = socket.create_connection(("127.0.0.1", irc_port), timeout=TIMEOUT)
        self.addCleanup(frames.close)
        frames.sendall(chat.encode({"type": "hello", "nick": "carol"}))    # told, in IRC, where frames go
        told = b""
        while not told.endswith(b"\r\n"):
            data = frames.recv(4096)
            self.assertTrue(data, f"closed after {told!r}")
            told += data
        self.assertTrue(told.startswith(b"ERROR :") and b"-p" in told, told)
        self.assertNotIn("carol", self.server.call(lambda: list(self.server.loop.chat.users)))

    def test_bytes_that_are_neither_get_a_clear_answer(self):
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        self.addCleanup(raw.close)
        raw.sendall(b"\xff\xfe garbage\r\n")
        decoder = chat.FrameDecoder(chat.MAX_SERVER_PAYLOAD)
        while (frame := decoder.next_frame()) is None:
            data = raw.recv(4096)
            self.assertTrue(data, "closed without a word")
            decoder.feed(data)
        self.assertEqual(frame["type"], "error")


class IrcServerPasswordTest(ServerTestCase):
    config = {"password": "s3cret"}

    def test_pass_lets_an_irc_client_in_and_a_wrong_one_is_464(self):
        wrong = IrcPeer(self.port)
        self.addCleanup(wrong.close)
        wrong.send("PASS nope", "NICK mallory", "USER m 0 * :M")
        wrong.expect("464")
        alice = IrcPeer(self.port, "alice", password="s3cret")
        self.addCleanup(alice.close)
        self.assertEqual(alice.welcome.params[0], "alice")


class TlsTest(unittest.TestCase):
    def setUp(self):
        self.files = TlsFiles(self)
        self.server = ServerThread(tls_cert=self.files.cert, tls_key=self.files.key, hello_timeout=1.0)
        self.addCleanup(self.server.stop)
        self.port = self.server.port

    def client(self, *args):
        process = Process("client", "-p", self.port, "--tls", "--known-hosts", self.files.known_hosts, *args)
        self.addCleanup(process.kill)
        return process

    def test_chat_over_tls_with_a_pinned_fingerprint(self):
        alice = tls_peer(self.port, "alice")
        self.addCleanup(alice.close)
        bob = self.client("-n", "bob", "--fingerprint", self.files.fingerprint)
        alice.expect("join", nick="bob")
        bob.write("secret hello\n")
        self.assertEqual(alice.expect("msg")["text"], "secret hello")
        alice.send({"type": "msg", "text": "x" * 4000})     # several TLS records at once
        bob.wait_line("<alice> x{4000}")

    def test_irc_over_tls_on_the_same_port(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        alice = IrcPeer(self.port, "alice", sock=context.wrap_socket(raw))
        self.addCleanup(alice.close)
        bob = tls_peer(self.port, "bob")
        self.addCleanup(bob.close)
        alice.send("JOIN #lobby", "PRIVMSG #lobby :sealed")
        self.assertEqual(bob.expect("msg")["text"], "sealed")

    def test_a_plaintext_irc_client_is_told_in_irc_that_tls_is_needed(self):
        irc = IrcPeer(self.port)
        self.addCleanup(irc.close)
        irc.send("NICK alice", "USER a 0 * :A")
        self.assertIn("requires TLS", irc.expect("NOTICE").params[-1])
        self.assertIn("TLS", irc.expect("ERROR").params[-1])

    def test_a_wrong_pin_is_refused_loudly(self):
        other = chat.certificate_fingerprint(self.files.other_cert)
        bob = self.client("-n", "bob", "--fingerprint", other)
        self.assertEqual(bob.wait(), 1)
        self.assertTrue(any("REFUSING" in line and self.files.fingerprint in line for line in bob.err_lines))

    def test_trust_on_first_use_then_remember_then_refuse_a_change(self):
        first = self.client("-n", "bob")
        self.assertEqual(first.wait(), 1)       # not a terminal, nobody to ask: not trusted
        self.assertTrue(any("not trusted" in line and "--fingerprint" in line for line in first.err_lines))
        chat.remember_host(self.files.known_hosts, f"127.0.0.1:{self.port}", self.files.fingerprint)
        trusted = self.client("-n", "bob")
        trusted.wait_line("CONNECTED", "stderr")
        trusted.proc.stdin.close()
        self.assertEqual(trusted.wait(), 0)
        changed = ServerThread(tls_cert=self.files.other_cert, tls_key=self.files.other_key)
        self.addCleanup(changed.stop)
        with open(self.files.known_hosts, "a") as f:
            f.write(f"127.0.0.1:{changed.port} {self.files.fingerprint}\n")
        intercepted = Process("client", "-p", changed.port, "--tls", "--known-hosts", self.files.known_hosts)
        self.addCleanup(intercepted.kill)
        self.assertEqual(intercepted.wait(), 1)
        self.assertTrue(any("CHANGED" in line for line in intercepted.err_lines))

    def test_the_tofu_question_decides(self):
        options = chat.TlsOptions(known_hosts=self.files.known_hosts, ask=lambda question: False)
        with self.assertRaises(chat.ClientExit):
            chat.connect("127.0.0.1", self.port, options).close()
        self.assertFalse(os.path.exists(self.files.known_hosts))
        options = options._replace(ask=lambda question: self.files.fingerprint in question)
        chat.connect("127.0.0.1", self.port, options).close()
        self.assertEqual(chat.read_known_hosts(self.files.known_hosts),
                         {f"127.0.0.1:{self.port}": self.files.fingerprint})

    def test_ctrl_c_at_the_certificate_question_cancels(self):
        terminal = Terminal(self, "client", "-p", self.port, "--tls", "--known-hosts", self.files.known_hosts)
        terminal.expect(r"Trust it and remember it\? \[y/N\]")
        terminal.type("\x03")
        self.assertEqual(terminal.wait(), 1)
        terminal.expect("cancelled")
        self.assertFalse(os.path.exists(self.files.known_hosts))

    def test_a_ca_file_verifies_normally(self):
        good = self.client("-H", "localhost", "-n", "bob", "--cafile", self.files.cert)
        good.wait_line("CONNECTED", "stderr")
        bad = self.client("-H", "localhost", "-n", "eve", "--cafile", self.files.other_cert)
        self.assertEqual(bad.wait(), 1)
        self.assertTrue(any("not trusted" in line for line in bad.err_lines))

    def test_plaintext_client_to_a_tls_server_gets_one_clear_line(self):
        with self.assertLogs("chat", logging.INFO) as logs:
            plain = Process("client", "-p", self.port, "-n", "plain")
            self.addCleanup(plain.kill)
            self.assertEqual(plain.wait(), 3)
        self.assertTrue(any("requires TLS" in line for line in plain.err_lines), plain.err_lines)
        self.assertTrue(any("plaintext client on a TLS server" in line for line in logs.output))

    def test_tls_client_to_a_plaintext_server_gets_one_clear_line(self):
        plain_server = ServerThread()
        self.addCleanup(plain_server.stop)
        with self.assertLogs("chat", logging.INFO) as logs:
            client = Process("client", "-p", plain_server.port, "--tls", "--known-hosts", self.files.known_hosts)
            self.addCleanup(client.kill)
            self.assertEqual(client.wait(), 1)
        self.assertTrue(any("TLS handshake failed" in line and "is the server using TLS" in line
                            for line in client.err_lines), client.err_lines)
        self.assertTrue(any("TLS handshake, but this server has no --tls-cert" in line for line in logs.output))

    def test_a_stalled_handshake_does_not_stall_anyone(self):
        stalled = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(stalled.close)
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")    # the start of a ClientHello
        alice = tls_peer(self.port, "alice")
        bob = tls_peer(self.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        alice.send({"type": "msg", "text": "not blocked"})
        self.assertEqual(bob.expect("msg")["text"], "not blocked")
        stalled.settimeout(TIMEOUT)
        self.assertEqual(stalled.recv(100), b"")      # dropped at the hello timeout

    def test_the_server_prints_its_fingerprint(self):
        server, port = server_process("--tls-cert", self.files.cert, "--tls-key", self.files.key)
        try:
            line = server.wait_line(r"fingerprint: (\S+) or ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})$")
            self.assertEqual(line[1], self.files.fingerprint)
            self.assertEqual(chat.fingerprint_option(line[2]), self.files.fingerprint, "the same, as hex")
        finally:
            server.kill()

    @unittest.skipUnless(chat.shutil.which("openssl"), "openssl is not installed")
    def test_gencert_writes_a_usable_pair(self):
        cert, key = os.path.join(self.files.dir, "new.pem"), os.path.join(self.files.dir, "new-key.pem")
        result = subprocess.run([sys.executable, CHAT, "gencert", "--cert", cert, "--key", key],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(chat.certificate_fingerprint(cert), result.stdout)
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        chat.server_tls_context(cert, key)
        again = subprocess.run([sys.executable, CHAT, "gencert", "--cert", cert, "--key", key],
                               capture_output=True, text=True, timeout=30)
        self.assertEqual(again.returncode, 1)
        self.assertIn("not overwriting", again.stderr)


class ServerProcessTest(unittest.TestCase):
    def test_sigint_says_bye_to_every_client_and_exits_0_quickly(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            with self.subTest(signal=signum):
                server, port = server_process()
                try:
                    peers = [Peer(port, f"peer{i}") for i in range(3)]
                    client = Process("client", "-p", port, "-n", "piped")
                    try:
                        peers[0].expect("join", nick="piped")
                        started = time.monotonic()
                        server.proc.send_signal(signum)
                        for peer in peers:
                            frames = peer.closed()
                            self.assertEqual(frames[-1]["type"], "bye")
                            self.assertIn("shutting down", frames[-1]["reason"])
                        self.assertEqual(server.wait(), 0)
                        self.assertLess(time.monotonic() - started, 1.5)
                        self.assertEqual(client.wait(), 0)
                        self.assertTrue(any("going away" in line for line in client.err_lines), "a note, so on stderr")
                        self.assertFalse(any("Traceback" in line for line in server.err_lines + client.err_lines))
                    finally:
                        client.kill()
                        for peer in peers:
                            peer.close()
                finally:
                    server.kill()

    def test_logs_have_timestamps_and_quiet_silences_them(self):
        server, port = server_process()
        try:
            Peer(port, "alice").close()
            self.assertRegex(server.wait_line("alice.*joined", "stderr")[0], r"alice")
            self.assertRegex(server.err_lines[0], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
        finally:
            server.kill()

    def test_a_port_in_use_is_one_clear_line(self):
        with socket.create_server(("127.0.0.1", 0)) as taken:
            server = Process("server", "-p", taken.getsockname()[1], stdin=subprocess.DEVNULL)
            self.assertEqual(server.wait(), 1)
            server.kill()
            self.assertTrue(any("cannot listen on" in line and "in use" in line for line in server.err_lines))
            self.assertTrue(any("choose another with -p" in line for line in server.err_lines), server.err_lines)
            self.assertFalse(any("Traceback" in line for line in server.err_lines))

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_ipv6(self):
        try:
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        except OSError:
            self.skipTest("::1 is not usable here")
        server, port = server_process("-H", "::1")
        try:
            alice = Peer(port, "alice", host="::1")
            bob = Process("client", "-H", "::1", "-p", port, "-n", "bob")
            alice.expect("join", nick="bob")
            alice.send({"type": "msg", "text": "over v6"})
            bob.wait_line("<alice> over v6")
            bob.kill()
            alice.close()
        finally:
            server.kill()


class ServerStartTest(unittest.TestCase):
    def test_quiet_still_says_where_it_listens_and_logs_keep_one_format(self):
        server = Process("server", "-p", 0, "-q", stdin=subprocess.DEVNULL)
        self.addCleanup(server.kill)
        port = int(server.wait_line(r"listening on 127\.0\.0\.1:(\d+)")[1])
        self.assertGreater(port, 0)
        server.proc.send_signal(signal.SIGINT)
        self.assertEqual(server.wait(), 0)
        self.assertEqual(server.err_lines, [], "-q: no info lines")
        loud = Process("server", "-p", 0, stdin=subprocess.DEVNULL)
        self.addCleanup(loud.kill)
        loud.wait_line("listening on")
        Peer(int(re.search(r":(\d+) ", loud.out_lines[0])[1]), "alice").close()
        loud.wait_line("alice.*left", "stderr")
        loud.proc.send_signal(signal.SIGINT)
        self.assertEqual(loud.wait(), 0)
        for line in loud.err_lines:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
        self.assertIn("shutting down (Ctrl-C)", "\n".join(loud.err_lines))
        self.assertNotIn("shutting down: server shutting down", "\n".join(loud.err_lines))


# ---------------------------------------------------------------------------
# 6. Cluster
# ---------------------------------------------------------------------------

@unittest.skipUnless(chat.shutil.which("redis-server"), "redis-server is not installed (.ci/run installs it)")
class ClusterTest(ClusterSetup, unittest.TestCase):
    def test_lines_joins_pms_and_who_cross_servers(self):
        alice = self.peer(self.a, "alice")
        bob = self.peer(self.b, "bob")
        self.assertEqual(bob.welcome["users"], ["alice", "bob"])
        self.assertEqual(alice.expect("join")["nick"], "bob")
        carol = self.peer(self.a, "carol")
        self.assertEqual(bob.expect("join", nick="carol")["users"], 3)
        alice.send({"type": "msg", "text": "from A"})
        self.assertEqual(bob.expect("msg")["text"], "from A")
        self.assertEqual(carol.expect("msg")["text"], "from A")
        bob.send({"type": "msg", "text": "from B"})
        line_a, line_c = alice.expect("msg"), carol.expect("msg")
        self.assertEqual((line_a["text"], line_a["id"], line_a["seq"]), ("from B", line_c["id"], line_c["seq"]))
        self.assertEqual(alice.sync(), [], "nobody gets their own line back through Redis")
        bob.send({"type": "pm", "to": "Carol", "text": "across"})
        self.assertEqual((carol.expect("msg")["to"], alice.sync()), ("carol", []))
        for peer in (alice, bob):
            peer.send({"type": "who"})
            self.assertEqual(peer.expect("who")["users"], ["alice", "bob", "carol"])
        bob.send({"type": "quit"})
        self.assertEqual(alice.expect("leave", nick="bob")["users"], 2)

    def test_irc_users_on_either_server_are_in_one_chat(self):
        alice = IrcPeer(self.a.port, "alice")
        self.addCleanup(alice.close)
        bob = self.peer(self.b, "bob")
        carol = IrcPeer(self.b.port, "carol")
        self.addCleanup(carol.close)
        alice.send("JOIN #lobby")
        bob.expect("join", nick="alice")
        carol.send("JOIN #lobby")
        self.assertEqual(sorted(names_of(carol.expect("353"))), ["alice", "bob", "carol"])
        alice.send("PRIVMSG #lobby :across", "PRIVMSG bob :just you")
        self.assertEqual(carol.expect("PRIVMSG").params, ["#lobby", "across"])
        self.assertEqual([bob.expect("msg")["text"] for _ in range(2)], ["across", "just you"])
        alice.send("NICK alicia")
        self.assertEqual(carol.expect("NICK").params, ["alicia"])
        alice.send("QUIT :gone")
        quit_line = carol.expect("QUIT")
        self.assertEqual(quit_line.parts[1].split("!")[0], "alicia")

    def test_rooms_used_on_another_server_do_not_fill_this_ones_table(self):
        small = self.server(max_rooms=4)
        bob = self.peer(small, "bob")
        mallory = self.peer(self.a, "mallory")
        burst = []
        for i in range(12):     # each room joined, said something in and left, in one write
            burst += [{"type": "join", "room": f"r{i}"}, {"type": "msg", "room": f"r{i}", "text": "x"},
                      {"type": "part", "room": f"r{i}"}]
        mallory.send_raw(b"".join(chat.encode(frame) for frame in burst + [{"type": "msg", "text": "done"}]))
        self.assertEqual(bob.expect("msg", text="done")["from"], "mallory")    # B has had it all
        bob.send({"type": "join", "room": "fresh"})
        self.assertEqual(bob.expect("joined")["room"], "fresh")

    def test_redis_forgets_quiet_rooms_but_never_an_occupied_one_and_no_seq_goes_back(self):
        """Issue 18 item 5, as measured: --max-rooms 4 (Redis keeps 8); #dev on B had 30 lines and 2
        members; one line in each of 12 throwaway rooms on A deleted hist:dev and its seq."""
        small = self.server(max_rooms=4)
        bob = self.peer(self.b, "bob", rooms=["lobby", "dev"])
        carol = self.peer(self.b, "carol", rooms=["lobby", "dev"])
        for i in range(30):
            bob.send({"type": "msg", "room": "dev", "text": f"dev {i}"})
        self.assertEqual([carol.expect("msg", room="dev")["seq"] for _ in range(30)][-1], 30)
        mallory = self.peer(small, "mallory")
        mallory.send({"type": "join", "room": "quiet"})
        mallory.send({"type": "msg", "room": "quiet", "text": "once"})
        first = mallory.expect("joined")["seq"]
        mallory.send({"type": "part", "room": "quiet"})
        for i in range(12):     # rooms made, said something in, and left
            mallory.send({"type": "join", "room": f"r{i}"})
            mallory.send({"type": "msg", "room": f"r{i}", "text": "x"})
            mallory.send({"type": "part", "room": f"r{i}"})
        mallory.send({"type": "msg", "text": "done"})
        bob.expect("msg", text="done")
        self.assertEqual(self.redis.call("LLEN", "chatpy:hist:dev"), 30, "an occupied room is never forgotten")
        self.assertLessEqual(self.redis.call("ZCARD", "chatpy:active"), 8 + 2)
        self.assertEqual(self.redis.call("HEXISTS", "chatpy:seq", "quiet"), 0, "a quiet one is")
        bob.send({"type": "msg", "room": "dev", "text": "after"})
        self.assertEqual(carol.expect("msg", text="after")["seq"], 31)
        observer = self.peer(small, "observer", rooms=["quiet"])
        mallory.send({"type": "join", "room": "quiet"})
        mallory.send({"type": "msg", "room": "quiet", "text": "again"})
        observer.expect("msg", text="again")        # numbered (through Redis) and kept
        again = self.peer(small, "watcher", rooms=["quiet"])
        seqs = [line["seq"] for line in again.welcome["history"] if line["text"] == "again"]
        self.assertEqual(len(seqs), 1)
        self.assertGreater(seqs[0], first + 1, "a forgotten room begins above every seq forgotten")

    def test_redis_keeps_history_within_the_byte_budget(self):
        """Issue 18 item 6, as measured: --history-bytes 2M, 2,000 lines of 4,096 emoji in 40 rooms: +41 MB."""
        budget = 2 << 20
        server = self.server(history_bytes=budget)
        spammer = self.peer(server, "spammer", rooms=[f"s{i}" for i in range(20)])
        big = "\U0001F600" * 4096      # 16 KiB of UTF-8
        for i in range(400):
            spammer.send({"type": "msg", "room": f"s{i % 20}", "text": big})
        spammer.sync()
        wait_until(lambda: self.redis.call("LLEN", "chatpy:hist:s19") > 0, what="the lines in Redis")
        total = int(self.redis.call("GET", "chatpy:total"))
        kept = sum(len(line) for room in range(20) for line in self.redis.call("LRANGE", f"chatpy:hist:s{room}", 0, -1))
        self.assertEqual(total, kept, "counted right")
        self.assertLessEqual(total, budget)

    def test_a_join_reaches_members_this_server_has_not_heard_of_yet(self):
        cluster, held = self.b.loop.chat.relay, []
        self.b.call(lambda: setattr(cluster.bus, "on_message", held.append))   # B hears nothing for now
        alice = self.peer(self.a, "alice")
        bob = self.peer(self.b, "bob")
        self.assertIn("alone", bob.expect("notice")["text"])    # B's view is behind...
        self.assertEqual(alice.expect("join")["nick"], "bob")   # ...but alice still hears bob arrive

        def catch_up():
            cluster.bus.on_message = cluster.bus_in.received
            for message in held:
                cluster.bus_in.received(message)
        self.b.call(catch_up)
        bob.send({"type": "who"})
        self.assertEqual(bob.expect("who")["users"], ["alice", "bob"])

    def test_accounts_topics_whois_and_bans_are_one_for_every_server(self):
        ops = self.server(ops=("root",))
        root = self.peer(ops, "root")
        root.send({"type": "register", "password": "rootpw"})
        root.expect("registered")
        alice = self.peer(self.b, "alice")
        alice.send({"type": "register", "password": "alicepw"})
        alice.expect("registered")
        wait_until(lambda: self.a.call(lambda: self.a.loop.chat.people.account(chat.name_key("alice")) is not None),
                   what="the account on A")
        twin = self.peer(self.a)
        twin.send({"type": "hello", "nick": "alice"})
        self.assertEqual(twin.expect("error")["code"], "account-required", "registered on B, owned on A")
        root.send({"type": "topic", "room": "lobby", "text": "be nice"})
        self.assertEqual(alice.expect("topic")["text"], "be nice")
        bob = self.peer(self.a, "bob")
        root.expect("join", nick="bob")
        root.send({"type": "whois", "nick": "bob"})
        whois = root.expect("whois")
        self.assertEqual((whois["nick"], whois["online"]), ("bob", True))
        self.assertFalse({"source", "sid", "said"} & set(whois), "never another server's view of their address")
        root.send({"type": "ban", "nick": "bob", "duration": "1h", "reason": "spam"})
        self.assertEqual(bob.closed()[-1]["code"], "banned", "a ban reaches the server they are on")
        again = self.peer(self.b)
        again.send({"type": "hello", "nick": "bob"})
        self.assertEqual(again.expect("error")["code"], "banned")

    def test_ids_and_seqs_are_one_sequence_across_servers(self):
        alice, bob = self.peer(self.a, "alice"), self.peer(self.b, "bob")
        alice.expect("join", nick="bob")
        for i in range(20):
            (alice if i % 2 else bob).send({"type": "msg", "text": f"n{i}"})
        seen_by_alice = [alice.expect("msg") for _ in range(10)]
        seen_by_bob = [bob.expect("msg") for _ in range(10)]
        history = self.peer(self.b, "watcher").welcome["history"]
        self.assertEqual([line["seq"] for line in history], list(range(1, 21)))
        ids = [line["id"] for line in history]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual(sorted(seen_by_alice + seen_by_bob, key=lambda line: line["seq"]), history)

    def test_nick_collisions_across_servers(self):
        self.peer(self.a, "alice")
        twin = self.peer(self.b)
        twin.send({"type": "hello", "nick": "ALICE"})
        self.assertEqual(twin.expect("error")["code"], "nick-taken")
        bob = self.peer(self.b, "bob")
        bob.send({"type": "nick", "nick": "alice"})
        self.assertEqual(bob.expect("error")["code"], "nick-taken")
        bob.send({"type": "nick", "nick": "robert"})
        self.assertEqual(bob.expect("nick")["new"], "robert")
        self.peer(self.a, "bob")        # the old nick is free again everywhere

    def test_rooms_span_servers(self):
        alice, bob, carol = self.peer(self.a, "alice"), self.peer(self.b, "bob"), self.peer(self.b, "carol")
        alice.send({"type": "join", "room": "dev"})
        alice.expect("joined")
        wait_until(lambda: self.b.call(lambda: chat.name_key("alice") in
                                       getattr(self.b.loop.chat.rooms.get("dev"), "remote", ())),
                   what="server B to hear that alice is in #dev")
        bob.send({"type": "join", "room": "dev"})
        self.assertEqual(bob.expect("joined")["users"], ["alice", "bob"])
        self.assertEqual(alice.expect("join", room="dev")["nick"], "bob")
        alice.send({"type": "msg", "room": "dev", "text": "dev only"})
        self.assertEqual(bob.expect("msg")["room"], "dev")
        self.assertFalse([f for f in carol.sync() if f["type"] == "msg"], "carol is not in #dev")
        carol.send({"type": "rooms"})
        self.assertIn({"name": "dev", "users": 2}, carol.expect("rooms")["rooms"])

    def test_history_and_resume_come_from_redis(self):
        alice = self.peer(self.a, "alice")
        bob = self.peer(self.a, "bob")
        alice.expect("join", nick="bob")
        alice.send({"type": "msg", "text": "before"})
        bob.expect("msg")
        welcome = bob.welcome
        bob.close()
        alice.expect("leave", nick="bob")
        for i in range(3):
            alice.send({"type": "msg", "text": f"missed {i}"})
        alice.sync()
        back = self.peer(self.b, "bob", session=welcome["session"], instance=welcome["instance"],
                         rooms=welcome["rooms"], since={"lobby": welcome["seq"]["lobby"] + 1})
        self.assertEqual([line["text"] for line in back.welcome["history"]], [f"missed {i}" for i in range(3)])
        self.assertEqual(back.welcome["instance"], welcome["instance"], "one instance for the whole cluster")
        fresh = self.peer(self.b, "carol")
        self.assertEqual([line["text"] for line in fresh.welcome["history"]],
                         ["before"] + [f"missed {i}" for i in range(3)])

    def test_a_redis_restart_mid_chat(self):
        alice, carol = self.peer(self.a, "alice"), self.peer(self.a, "carol")
        bob = self.peer(self.b, "bob")
        alice.expect("join", nick="bob")
        alice.send({"type": "msg", "text": "before the restart"})
        before = bob.expect("msg")
        carol.expect("msg", text="before the restart")     # back through Redis on A too: not in flight
        self.redis.stop()
        self.assertIn("down", alice.expect("notice")["text"])
        self.assertIn("down", bob.expect("notice")["text"])
        alice.send({"type": "msg", "text": "local while Redis is away"})
        line = carol.expect("msg", text="local while Redis is away")
        self.assertNotIn("seq", line, "a line said while Redis is away is not in the shared history")
        self.redis.start()
        self.assertIn("back", alice.expect("notice", timeout=15)["text"])
        bob.expect("notice", timeout=15)
        alice.send({"type": "msg", "text": "across again"})
        after = bob.expect("msg")
        self.assertEqual(after["text"], "across again")
        self.assertGreater(after["id"], before["id"], "ids keep increasing though Redis lost its data")
        self.assertEqual(after["seq"], before["seq"] + 1)
        self.assertEqual([line["text"] for line in self.peer(self.b, "dave").welcome["history"]],
                         ["before the restart", "across again"])
        bob.send({"type": "who"})
        self.assertEqual(bob.expect("who")["users"], ["alice", "bob", "carol", "dave"])

    def test_a_server_whose_redis_is_not_up_yet_says_so_and_links_later(self):
        redis_port = free_port()
        early = ServerThread(redis=f"redis://127.0.0.1:{redis_port}", cluster_ttl=self.TTL)
        self.addCleanup(early.stop)
        alice = self.peer(early, "alice")
        self.assertIn("down", alice.expect("notice")["text"])
        RedisServer(self, redis_port)
        while "back up" not in alice.expect("notice", timeout=15)["text"]:
            pass

    def test_a_killed_server_users_leave_within_the_bound(self):
        server, port = server_process("--redis", self.redis.url, "--cluster-ttl", self.TTL)
        self.addCleanup(server.kill)
        server.wait_line("linked through Redis", "stderr")
        alice = self.peer(self.a, "alice")
        self.peer(port, "bob")
        alice.expect("join", nick="bob")
        server.proc.kill()
        started = time.monotonic()
        leave = alice.expect("leave", nick="bob", timeout=10)
        self.assertEqual(leave["reason"], "their server went away")
        self.assertLess(time.monotonic() - started, self.TTL * 4 / 3 + 1.0)
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("who")["users"], ["alice"])

    def state(self, server):
        def read():
            cluster = server.loop.chat.relay
            return dict(up=cluster.up, sid=cluster.sid, remote=dict(cluster.elsewhere.users), users=list(server.loop.chat.users),
                        cmd_up=cluster.commands.up, bus_up=cluster.bus.up, syncing=cluster.sync.syncing is not None)
        return server.call(read)

    def test_back_on_a_restarted_server_nobody_is_told_you_left(self):
        """Issue 21 item 3: ann reconnected to a restarted server A; ~15 s later her own screen said
        'ann left (their server went away)' for her rooms, though she was there."""
        first, port = server_process("--redis", self.redis.url, "--cluster-ttl", self.TTL)
        self.addCleanup(first.kill)
        first.wait_line("linked through Redis", "stderr")
        ann = Peer(port, "ann", rooms=["lobby", "ops"])
        welcome = ann.welcome
        bob = self.peer(self.b, "bob", rooms=["lobby", "ops"])
        first.proc.kill()           # A dies; ann comes back on a new A
        ann.close()
        again, port = server_process("--redis", self.redis.url, "--cluster-ttl", self.TTL)
        self.addCleanup(again.kill)
        again.wait_line("linked through Redis", "stderr")
        back = self.peer(port, "ann", session=welcome["session"], instance=welcome["instance"],
                         rooms=welcome["rooms"], since={"lobby": 0, "ops": 0})
        started = time.monotonic()
        frames = []
        while time.monotonic() - started < self.TTL * 4 / 3 + 1.0:     # past the old A's timeout
            frames += back.sync()
            time.sleep(0.05)        # pacing the probe, not waiting for anything
        self.assertFalse([f for f in frames if f["type"] == "leave" and f["nick"] == "ann"], frames)
        back.send({"type": "who", "room": "ops"})
        self.assertEqual(back.expect("who")["users"], ["ann", "bob"])
        bob.send({"type": "who", "room": "ops"})
        self.assertEqual(bob.expect("who")["users"], ["ann", "bob"])

    def test_a_stopped_server_users_leave_at_once(self):
        alice = self.peer(self.a, "alice")
        self.peer(self.b, "bob")
        try:
            alice.expect("join", nick="bob")
        except AssertionError:
            raise AssertionError(f"A={self.state(self.a)} B={self.state(self.b)}") from None
        self.b.stop()
        self.assertEqual(alice.expect("leave", nick="bob", timeout=1.0)["reason"], "their server shut down")

    @unittest.skipUnless(sys.platform.startswith("linux"), "SO_REUSEPORT spreads connections on Linux only")
    def test_workers_share_one_port(self):
        port = free_port()
        server = Process("server", "-p", port, "--workers", 2, "--redis", self.redis.url, stdin=subprocess.DEVNULL)
        self.addCleanup(server.kill)
        for _ in range(2):
            server.wait_line(r"\[worker \d\].*linked through Redis as server", "stderr")
        peers = [self.peer(port, f"p{i}") for i in range(6)]

        def everyone_listed():     # presence from the other worker arrives within milliseconds
            peers[0].send({"type": "who"})
            return peers[0].expect("who")["users"] == [f"p{i}" for i in range(6)]
        wait_until(everyone_listed, what="both workers' users in who")
        peers[5].send({"type": "msg", "text": "to all workers"})
        for peer in peers[:5]:
            self.assertEqual(peer.expect("msg")["text"], "to all workers")
        server.proc.send_signal(signal.SIGINT)
        self.assertEqual(server.wait(), 0)

    @unittest.skipUnless(sys.platform.startswith("linux"), "SO_REUSEPORT spreads connections on Linux only")
    def test_a_killed_worker_is_started_again(self):
        """Issue 18 item 14: a worker killed with kill -9 was not restarted."""
        port = free_port()
        server = Process("server", "-p", port, "--workers", 2, "--redis", self.redis.url, stdin=subprocess.DEVNULL)
        self.addCleanup(server.kill)
        for _ in range(2):
            server.wait_line(r"\[worker \d\].*linked through Redis as server", "stderr")
        workers = children(server.proc.pid)
        self.assertEqual(len(workers), 2)
        os.kill(workers[0], signal.SIGKILL)
        server.wait_line(r"worker \d stopped \(killed by signal 9\); starting it again in 1s", "stderr")
        server.wait_line(r"\[worker \d\].*linked through Redis as server", "stderr")
        wait_until(lambda: len(children(server.proc.pid)) == 2, what="two workers again")
        peers = [self.peer(port, f"p{i}") for i in range(4)]
        peers[3].send({"type": "msg", "text": "to all workers"})
        for peer in peers[:3]:
            self.assertEqual(peer.expect("msg", timeout=10)["text"], "to all workers")
        server.proc.send_signal(signal.SIGINT)
        self.assertEqual(server.wait(), 0)

    @unittest.skipUnless(sys.platform.startswith("linux"), "SO_REUSEPORT spreads connections on Linux only")
    def test_workers_do_not_outlive_their_supervisor(self):
        port = free_port()
        server = Process("server", "-p", port, "--workers", 2, "--redis", self.redis.url, stdin=subprocess.DEVNULL)
        self.addCleanup(server.kill)
        for _ in range(2):
            server.wait_line(r"\[worker \d\].*linked through Redis as server", "stderr")
        server.proc.kill()      # SIGKILL: the supervisor cannot tell its workers
        server.wait_line(r"\[worker \d\] shutting down \(the supervisor process is gone\)", "stderr")
        server.wait_line(r"\[worker \d\] shutting down \(the supervisor process is gone\)", "stderr")


@unittest.skipUnless(chat.shutil.which("redis-server") and RedisServer.version() >= (7,),
                     "redis-server 7 (DEBUG SLEEP) is not installed (.ci/run installs it)")
class ClusterConditionsTest(ClusterSetup, unittest.TestCase):
    """A ttl of 3 s: Redis owes an answer for at most 1 s before the link counts as down."""
    TTL = 3.0

    def lines(self, peer, count, timeout=TIMEOUT):
        texts = []
        while len(texts) < count:
            texts.append(peer.expect("msg", timeout=timeout)["text"])
        return texts

    def test_a_quiet_server_keeps_a_healthy_link(self):
        talker, quiet = self.peer(self.a, "talker"), self.peer(self.b, "quiet")
        talker.expect("join", nick="quiet")
        sent, started = 0, time.monotonic()
        while time.monotonic() - started < 2.5 * self.TTL:      # B beats every ttl/3: seven heartbeats
            talker.send({"type": "msg", "text": f"line {sent}"})
            quiet.expect("msg", text=f"line {sent}")
            sent += 1
            time.sleep(0.1)     # pacing the talker at 10 lines a second, not waiting for anything
        frames = quiet.sync() + talker.sync()
        self.assertFalse([f for f in frames if f["type"] == "notice"], "no link-down alarm")
        self.assertEqual(self.b.call(lambda: self.b.loop.chat.relay.up), True)

    def test_a_nick_taken_on_both_sides_during_an_outage_ends_with_one_owner(self):
        alice = self.peer(self.a, "alice")
        self.redis.stop()
        alice.expect("notice")
        wait_until(lambda: not self.b.call(lambda: self.b.loop.chat.relay.up), what="B to notice")
        impostor = self.peer(self.b, "alice")      # B's island does not know A's alice
        self.redis.start()
        self.assertEqual(impostor.expect("error", timeout=15)["code"], "nick-taken")
        impostor.closed(timeout=15)
        bob = self.peer(self.b, "bob")
        wait_until(lambda: self.b.call(lambda: chat.name_key("alice") in self.b.loop.chat.relay.elsewhere.users),
                   what="B to see A's alice", timeout=10)
        bob.send({"type": "who"})
        self.assertEqual(bob.expect("who")["users"], ["alice", "bob"])
        bob.send({"type": "pm", "to": "alice", "text": "the real one?"})
        frames = [alice.next()]
        while frames[-1]["type"] != "msg":
            frames.append(alice.next())
        self.assertEqual(frames[-1]["text"], "the real one?")
        self.assertEqual([f for f in frames if "alice" in (f.get("nick"), f.get("old"))], [])   # not the other's leave

    def test_a_slow_redis_lets_local_chat_go_on_and_shows_each_line_once(self):
        a1, a2, b1 = self.peer(self.a, "a1"), self.peer(self.a, "a2"), self.peer(self.b, "b1")
        a1.expect("join", nick="b1")
        frozen = self.redis.sleep(0.8)      # under the 1 s reply timeout: slow, not down
        started = time.monotonic()
        for i in range(5):
            a1.send({"type": "msg", "text": f"slow {i}"})
        self.assertEqual(self.lines(a2, 5), [f"slow {i}" for i in range(5)])
        self.assertLess(time.monotonic() - started, chat.Cluster.LOCAL_WAIT + 1.0)
        frozen.join()
        self.assertEqual(self.lines(b1, 5), [f"slow {i}" for i in range(5)])
        a1.send({"type": "msg", "text": "after"})
        self.assertEqual(self.lines(a2, 1), ["after"], "the published copies were not shown again")
        self.assertEqual(self.lines(b1, 1), ["after"])

    def test_a_hello_or_rename_waiting_on_redis_when_the_link_goes_down_is_answered(self):
        bob = self.peer(self.a, "bob")
        frozen = self.redis.sleep(2.5)      # over the 1 s reply timeout: the link goes down
        bob.send({"type": "nick", "nick": "robert"})
        carol = self.peer(self.a, "carol")  # claims wait for Redis, then for the island
        self.assertIn("down", carol.expect("notice")["text"])
        self.assertEqual(bob.expect("nick")["new"], "robert")
        frozen.join()

    def test_a_redis_that_refuses_lines_is_a_link_down_and_the_lines_are_counted(self):
        alice = self.peer(self.a, "alice")
        self.peer(self.b, "bob")
        alice.expect("join", nick="bob")
        self.redis.call("CONFIG", "SET", "maxmemory", "1")      # no more writes: OOM errors
        alice.send({"type": "msg", "text": "refused"})
        self.assertIn("down", alice.expect("notice")["text"])
        self.redis.call("CONFIG", "SET", "maxmemory", "0")
        self.assertIn("back up", alice.expect("notice", timeout=10)["text"])
        self.assertIn("1 line you said while the link was down", alice.expect("notice")["text"])

    def test_a_stuck_redis_loses_nothing_it_published_and_says_once_what_it_did_not(self):
        a1, a2, b1 = self.peer(self.a, "a1"), self.peer(self.a, "a2"), self.peer(self.b, "b1")
        a1.expect("join", nick="b1")
        frozen = self.redis.sleep(2.5)      # over the reply timeout: the links go down
        for i in range(5):
            a1.send({"type": "msg", "text": f"stuck {i}"})
        self.assertEqual(self.lines(a2, 5), [f"stuck {i}" for i in range(5)])
        wait_until(lambda: not self.a.call(lambda: self.a.loop.chat.relay.up), what="A's link down")
        a1.send({"type": "msg", "text": "island line"})
        self.assertEqual(self.lines(a2, 1), ["island line"])
        frozen.join()
        wait_until(lambda: self.a.call(lambda: self.a.loop.chat.relay.up) and
                   self.b.call(lambda: self.b.loop.chat.relay.up), what="both links back", timeout=15)
        self.assertEqual(self.lines(b1, 5, timeout=10), [f"stuck {i}" for i in range(5)], "published: shown once")
        a1.send({"type": "msg", "text": "after"})
        self.assertEqual(self.lines(a2, 1), ["after"], "no line twice on A")
        self.assertEqual(self.lines(b1, 1), ["after"], "no line twice on B, and not the island line")
        notices = [f["text"] for f in a1.sync() if f["type"] == "notice"]
        unsent = [text for text in notices if "reached only the people on this server" in text]
        self.assertEqual(unsent, ["1 line you said while the link was down reached only the people on this server"])

    def test_island_ids_never_collide_and_have_no_seq(self):
        a1, a2 = self.peer(self.a, "a1"), self.peer(self.a, "a2")
        b1, b2 = self.peer(self.b, "b1"), self.peer(self.b, "b2")
        self.redis.stop()
        a2.expect("notice")
        wait_until(lambda: not self.b.call(lambda: self.b.loop.chat.relay.up), what="B to notice")
        b2.expect("notice")
        for peer in (a1, b1):
            for i in range(3):
                peer.send({"type": "msg", "text": f"island {i}"})
        lines = [a2.expect("msg") for _ in range(3)] + [b2.expect("msg") for _ in range(3)]
        self.assertEqual(len({line["id"] for line in lines}), 6)
        self.assertTrue(all(line["id"] < 0 and line["local"] and "seq" not in line for line in lines))

    def test_a_line_right_after_a_rename_carries_the_new_nick(self):
        mallory, watcher = self.peer(self.a, "mallory"), self.peer(self.b, "watcher")
        mallory.expect("join", nick="watcher")
        mallory.send_raw(chat.encode({"type": "msg", "text": "L1"}) + chat.encode({"type": "nick", "nick": "zed"})
                         + chat.encode({"type": "msg", "text": "L2"}))
        seen = [(f["type"], f.get("from"), f.get("new")) for f in (watcher.next() for _ in range(3))]
        self.assertEqual(seen, [("msg", "mallory", None), ("nick", None, "zed"), ("msg", "zed", None)])

    def test_one_notice_per_event(self):
        alice, bob = self.peer(self.a, "alice"), self.peer(self.b, "bob")
        alice.expect("join", nick="bob")
        self.redis.stop()
        wait_until(lambda: not self.b.call(lambda: self.b.loop.chat.relay.up), what="B to notice")
        self.redis.start()
        wait_until(lambda: self.a.call(lambda: self.a.loop.chat.relay.up) and
                   self.b.call(lambda: self.b.loop.chat.relay.up), what="both links back", timeout=15)
        for peer in (alice, bob):
            notices = [f["text"] for f in peer.sync() if f["type"] == "notice"]
            self.assertEqual(len([text for text in notices if "down" in text]), 1, notices)
            self.assertEqual(len([text for text in notices if "back up" in text]), 1, notices)


class RedisLinkTest(unittest.TestCase):
    """Item 1 of issue 12, in memory: what makes a link count as dead."""

    def test_an_idle_link_is_not_a_dead_one_but_an_unanswered_command_is(self):
        loop = unittest.mock.Mock(now=1000.0)
        link = chat.RedisLink(loop, chat.RedisUrl.parse("redis://127.0.0.1"), "commands", None, None,
                              reply_timeout=5.0)
        link.up, failures = True, []
        link.fail = failures.append
        link.check(1000.0)                 # nothing owed after a long silence: fine
        loop.now = 1060.0
        link.command("PING")               # the heartbeat asks, after a minute of quiet
        link.check(1060.1)
        self.assertEqual(failures, [], "a reply is owed for 0.1 s, not 60")
        link.check(1065.2)
        self.assertEqual(len(failures), 1)
        self.assertIn("no answer for 5.2s", failures[0])


# ---------------------------------------------------------------------------
# 7. The terminal and the operator console
# ---------------------------------------------------------------------------

class LineEditorTest(unittest.TestCase):
    """The line being typed (chat.LineEditor), keys in and screen bytes out, with no terminal."""

    def editor(self, columns=80, **options):
        editor = chat.LineEditor("#lobby> ", lambda: columns, **options)
        editor.draw()
        return editor

    def test_a_long_paste_is_drawn_once_not_once_a_key(self):
        editor = self.editor()
        lines, screen = editor.feed("\x1b[200~" + "x" * 20000 + "\r\nsecond\x1b[201~")
        self.assertEqual((lines, editor.buffer), ([], "x" * 20000 + "\nsecond"))
        self.assertLess(len(screen), 20100)     # once a key, it was 20000 drawings of the line: ~200 MB

    def test_the_cursor_stays_where_it_was_when_a_line_arrives(self):
        editor = self.editor()
        editor.feed("helo world" + "\x1b[D" * 7)      # Left seven times: after "hel"
        screen = editor.print("<bob> hi")
        self.assertEqual(screen, "\r\x1b[J<bob> hi\n#lobby> helo world\r\x1b[11C")
        lines, _ = editor.feed("l\r")
        self.assertEqual(lines, ["hello world"])

    def test_a_wrapped_line_is_erased_from_its_first_row(self):
        editor = self.editor(columns=20)
        editor.feed("x" * 30 + "\x01")      # 38 columns on two rows; Ctrl-A: the cursor on the first
        self.assertTrue(editor.print("<bob> hi").startswith("\r\x1b[J<bob> hi\n"))
        editor.feed("\x05")                   # Ctrl-E: on the second row
        self.assertTrue(editor.print("<bob> hi").startswith("\x1b[1A\r\x1b[J"))

    def test_editing_keys(self):
        cases = [("ab\x1b[Dc\r", "acb"), ("abc\x08\r", "ab"), ("abc\x01\x1b[3~\r", "bc"),
                 ("one two\x17\r", "one "), ("abc\x1b[D\x0b\r", "ab"), ("abc\x1b[D\x15\r", "c"),
                 ("abc\x15\x19\x19\r", "abcabc"), ("one two\x1b[1;5Dx\r", "one xtwo"),
                 ("\x1b[200~a\rb\x1b[201~\r", "a\nb"), ("\u4f60\u597d\x1b[D!\r", "\u4f60!\u597d")]
        for keys, line in cases:
            with self.subTest(keys):
                self.assertEqual(self.editor().feed(keys)[0], [line])

    def test_history_and_end_of_input(self):
        editor = self.editor()
        editor.feed("first\rsecond\r")
        editor.feed("draft\x1b[A\x1b[A")
        self.assertEqual(editor.buffer, "first")
        editor.feed("\x1b[B\x1b[B")
        self.assertEqual(editor.buffer, "draft")
        self.assertEqual(self.editor().feed("\x04")[0], [None], "Ctrl-D on an empty line")

    def test_an_escape_sequence_cut_in_two_is_waited_for(self):
        editor = self.editor()
        editor.feed("ab\x1b[")
        editor.feed("Dc\r")
        self.assertEqual(editor.history, ["acb"])

    def test_tab_completes_and_a_second_tab_lists(self):
        editor = self.editor(complete=lambda line, point: (["alice: ", "albert: "], 0))
        self.assertTrue(editor.feed("al\t")[1].endswith("\x07"), "ambiguous: the bell")
        self.assertIn("alice:  albert:", editor.feed("\t")[1], "a second Tab lists them")
        editor = self.editor(complete=lambda line, point: (["/join "], 0))
        editor.feed("/jo\t")
        self.assertEqual(editor.buffer, "/join ")

    def test_the_prompt_changes_in_place_and_ctrl_l_redraws_at_the_top(self):
        editor = self.editor()
        editor.feed("typed")
        self.assertEqual(editor.set_prompt("#dev> "), "\r\x1b[J#dev> typed\r\x1b[11C")
        self.assertTrue(editor.feed("\x0c")[1].startswith("\x1b[H\x1b[2J#dev> typed"))


class WindowsKeysTest(unittest.TestCase):
    """Windows' console keys (through a fake msvcrt) drive the same editor."""

    class FakeMsvcrt:
        def __init__(self, keys):
            self.keys = list(keys)

        def getwch(self):
            return self.keys.pop(0)

    def test_arrows_backspace_history_and_the_end_of_input(self):
        keys = ["h", "e", "l", "o", "\xe0", "K", "l", "\r", "x", "\x08", "\xe0", "H", "\r", "\x1a"]
        editor = chat.LineEditor("> ")
        lines = []
        for key in chat.Console._windows_keys(self.FakeMsvcrt(keys)):
            if key is None:
                lines.append(None)
                break
            lines += editor.feed(key)[0]
        self.assertEqual(lines, ["hello", "hello", None])


class LogFloodTest(HarnessTestCase):
    """Items 7 and 12: each refusal or bad frame logged a line (56 MB in 60 s),
    and a client string could forge a line or put escapes on the operator's terminal."""

    def test_a_flood_of_bad_frames_logs_a_few_lines(self):
        limiter = chat.LogLimiter(burst=20, rate=1.0, clock=lambda: server.now)
        server = self.harness(flood_rate=1e6, flood_burst=1e6)
        chat.log.addFilter(limiter)
        self.addCleanup(chat.log.removeFilter, limiter)
        attacker = server.connect("attacker")
        with self.assertLogs("chat", logging.INFO) as logs:
            attacker.send(*[{"type": "x" * 60000}] * 1000)
            server.advance(5.0)
            attacker.send({"type": "teleport"})
        self.assertLessEqual(len(logs.output), 20 + 1 + 1)
        self.assertIn("more lines like this not logged", logs.output[-1])
        self.assertLess(max(len(line) for line in logs.output), 300, "client strings are cut")

    def test_client_strings_cannot_forge_a_log_line_or_reach_the_terminal(self):
        server = self.harness()
        attacker = server.connect("attacker")
        with self.assertLogs("chat", logging.INFO) as logs:
            attacker.send({"type": "pm", "to": "nobody\n2099-01-01 00:00:00 alice@127.0.0.1:1 joined", "text": "x"},
                          {"type": "\x1b]0;owned\x07\x1b[2J"}, {"type": "quit", "reason": "bye\u202e\u200b"})
        for line in logs.output:
            self.assertNotIn("\n", line)
            self.assertFalse(re.search("[\x00-\x1f\x7f\u202e\u200b]", line), line)


class OperatorConsoleTest(HarnessTestCase):
    def test_say_who_kick(self):
        alice, bob = self.peer("alice"), self.peer("bob")
        shown = []
        table = chat.operator_commands(self.server, shown.append)
        self.server.call(table.run, "/say maintenance at noon")
        for peer in (alice, bob):
            self.assertEqual(peer.expect("notice", text="maintenance at noon")["type"], "notice")
        self.server.call(table.run, "/who")
        self.assertIn("#lobby (2): alice, bob", shown)
        self.server.call(table.run, "/kick bob spamming")
        error = bob.expect("error")
        self.assertEqual(error["code"], "kicked")
        bob.closed()
        self.assertIn("spamming", alice.expect("leave")["reason"])
        self.server.call(table.run, "/kick nobody")
        self.assertIn("nobody here is called nobody", shown)
        self.server.call(table.run, "/help")
        self.assertTrue(any(line.startswith("/kick NICK [REASON]") for line in shown))


class OperatorConsoleCommunityTest(HarnessTestCase):
    """Issue 20: everything an operator does from a client, the console does too, and makes operators and accounts."""

    def test_accounts_operators_bans_and_topics_from_the_console(self):
        shown = []
        table = chat.operator_commands(self.server, shown.append)
        self.server.call(table.run, "/register carol")
        password = re.search(r"registered carol: (\S+)", shown[-1])[1]
        carol = self.server.connect("carol", account_password=password)
        self.assertFalse(carol.welcome["op"])
        self.server.call(table.run, "/op carol")
        self.assertEqual(carol.expect("op")["on"], True)
        self.assertIn("carol is now a server operator", shown)
        bob = self.peer("bob")
        self.server.call(table.run, "/ban bob 2h flooding")
        self.assertEqual(bob.closed()[-1]["code"], "banned")
        self.assertEqual(carol.expect("notice")["text"], "the operator banned bob for 2h: flooding")
        self.server.call(table.run, "/bans")
        self.assertIn("bob banned until", shown[-1])
        self.server.call(table.run, "/topic lobby be nice")
        self.assertEqual(carol.expect("topic")["text"], "be nice")
        self.server.call(table.run, "/op nobody")
        self.assertIn("nobody has no account", shown[-1])
        self.server.call(table.run, "/password carol")
        self.assertRegex(shown[-1], r"new password for carol: \S+")


class OperatorTerminalTest(unittest.TestCase):
    def test_the_console_prompts_hints_confirms_and_says_what_ctrl_d_does(self):
        terminal = Terminal(self, "server", "-p", 0)
        port = int(terminal.expect(r"listening on 127\.0\.0\.1:(\d+)")[1])
        terminal.expect("server> ")
        alice = Peer(port, "alice")
        self.addCleanup(alice.close)
        terminal.type("hello everyone\r")
        terminal.expect("commands start with /: /say TEXT tells everyone")
        terminal.expect("server> ")
        terminal.type("/say maintenance at noon\r")
        terminal.expect("said to 1 user here: maintenance at noon")
        terminal.expect("server> ")
        self.assertEqual(alice.expect("notice", text="maintenance at noon")["type"], "notice")
        terminal.type("who\r")
        terminal.expect(r"#lobby \(1\): alice")
        terminal.expect("server> ")     # typed at the prompt, as a person would
        terminal.type("\x04")
        terminal.expect("the operator console is closed; the server goes on")
        alice.send({"type": "ping"})
        alice.expect("pong")
        terminal.type("\x03")
        self.assertEqual(terminal.wait(), 0)


# ---------------------------------------------------------------------------
# 8. Client
# ---------------------------------------------------------------------------

class RenderTest(unittest.TestCase):
    view = chat.View(me="alice")

    def test_lines(self):
        cases = [
            ({"type": "msg", "from": "bob", "text": "hi"}, "<bob> hi"),
            ({"type": "msg", "from": "alice", "text": "mine"}, "[alice] mine"),
            ({"type": "msg", "from": "bob", "text": "waves", "action": True}, "* bob waves"),
            ({"type": "msg", "from": "bob", "to": "alice", "text": "psst"}, "[pm from bob] psst"),
            ({"type": "msg", "from": "alice", "to": "bob", "text": "psst"}, "[pm to bob] psst"),
            ({"type": "join", "nick": "bob", "users": 2}, "-- bob joined (2 here)"),
            ({"type": "leave", "nick": "bob", "reason": "quit", "users": 1}, "-- bob quit (1 here)"),
            ({"type": "leave", "nick": "bob", "reason": "quit: gotta go"}, "-- bob quit: gotta go"),
            ({"type": "leave", "nick": "bob", "reason": "parted", "users": 2}, "-- bob left (2 here)"),
            ({"type": "leave", "nick": "bob", "reason": "ping timeout (75s silent)"},
             "-- bob left (ping timeout (75s silent))"),
            ({"type": "notice", "text": "maintenance at noon", "by": "operator"},
             "*** operator: maintenance at noon"),
            ({"type": "msg", "from": "bob", "text": "ALICE: lunch?"}, "!<bob> ALICE: lunch?"),
            ({"type": "msg", "from": "bob", "text": "malice aforethought"}, "<bob> malice aforethought"),
            ({"type": "nick", "old": "bob", "new": "rob"}, "-- bob is now known as rob"),
            ({"type": "error", "code": "no-such-user", "text": "nobody"}, "!!! nobody (no-such-user)"),
            ({"type": "bye", "reason": "maintenance"}, "*** the server is going away: maintenance"),
            ({"type": "mode", "room": "dev", "by": "bob", "modes": "+o", "args": ["carol"]},
             "-- bob made carol an operator of #dev"),
            ({"type": "mode", "room": "dev", "by": "bob", "modes": "+mk", "args": ["sesame"]},
             "-- bob set +mk sesame on #dev"),
            ({"type": "invited", "room": "dev", "by": "bob"}, "-- bob invites you to #dev (/join #dev)"),
            ({"type": "whois", "nick": "bob", "online": True, "account": "robert", "rooms": []},
             "-- bob: logged in as robert; in no room"),
            ({"type": "whois", "nick": "bob", "online": True, "account": None, "rooms": ["dev"]},
             "-- bob: a guest; in #dev"),
            ({"type": "msg", "from": "bob", "text": "build is green", "notice": True}, "-bob- build is green"),
            ({"type": "pong"}, None),
            ({"type": "from-the-future"}, None),
        ]
        for frame, expected in cases:
            with self.subTest(frame=frame):
                self.assertEqual(chat.render(frame, self.view), expected)

    def test_hostile_text_never_reaches_the_terminal_raw(self):
        frame = {"type": "msg", "from": "ev\x1bil", "text": "\x1b]0;owned\x07\x1b[2Jgone\u202e 你好"}
        line = chat.render(frame, self.view)
        self.assertNotIn("\x1b", line)
        self.assertNotIn("\x07", line)
        self.assertNotIn("\u202e", line)
        self.assertIn("你好", line)

    def test_colour_timestamps_rooms_and_continuation_lines(self):
        view = chat.View(me="alice", color=True, timestamps=True, rooms=True)
        line = chat.render({"type": "msg", "from": "bob", "text": "a\nb", "room": "dev", "ts": 0}, view)
        self.assertIn("\x1b[", line)
        plain = chat._plain(line)
        first, second = plain.split("\n")
        self.assertRegex(first, r"^\d\d:\d\d #dev <bob> a$")
        self.assertEqual(second.strip(), "b")
        self.assertEqual(len(second) - len(second.lstrip()), len("00:00 #dev <bob> "), "under the text")


class ClientSessionTest(unittest.TestCase):
    """The client's protocol core (chat.Session) in memory: frames in, state and what follows out."""

    WELCOME = {"type": "welcome", "nick": "alice", "users": ["alice", "bob"], "history": [], "rooms": ["lobby"],
               "room": "lobby", "instance": "i1", "session": "s1", "seq": {"lobby": 7}, "max_text": 100,
               "ping_interval": 5, "idle_timeout": 12}

    def welcomed(self):
        session = chat.Session("alice")
        session.welcome(dict(self.WELCOME), reconnected=False)
        return session

    def test_a_welcome_sets_where_lines_go_and_where_a_resume_starts(self):
        session = self.welcomed()
        self.assertEqual((session.room, session.rooms, session.seen), ("lobby", ["lobby"], {"lobby": 7}))
        self.assertEqual((session.max_text, session.ping_interval, session.idle_timeout), (100, 5.0, 12.0))
        session.receive({"type": "msg", "from": "bob", "text": "x", "room": "lobby", "seq": 9})
        self.assertEqual(session.hello(), {"type": "hello", "nick": "alice", "protocol": 3, "session": "s1", "instance": "i1",
                                           "rooms": ["lobby"], "since": {"lobby": 9}})

    def test_a_resume_hides_your_own_lines_and_a_restart_forgets_the_cursors(self):
        session = self.welcomed()
        history = [{"type": "msg", "from": "ALICE", "text": "mine", "room": "lobby", "seq": 8},
                   {"type": "msg", "from": "bob", "text": "missed", "room": "lobby", "seq": 9}]
        resumed, shown, _ = session.welcome(dict(self.WELCOME, history=history), reconnected=True)
        self.assertTrue(resumed)
        self.assertEqual([f["text"] for f in shown if isinstance(f, dict)], ["missed"])
        resumed, _, _ = session.welcome(dict(self.WELCOME, instance="i2", seq={}), reconnected=True)
        self.assertFalse(resumed)
        self.assertEqual(session.seen, {})

    def test_an_account_back_where_it_left_gets_its_lines_as_news_and_a_newcomer_as_the_past(self):
        line = {"type": "msg", "from": "bob", "text": "while you were out", "room": "lobby", "seq": 9}
        _, shown, _ = chat.Session("alice").welcome(dict(self.WELCOME, history=[line], back=True), reconnected=False)
        self.assertEqual(shown, [chat.Note("--- 1 line you missed ---", "2"), line, chat.Note("--- now ---", "2")])
        _, shown, _ = chat.Session("alice").welcome(dict(self.WELCOME, history=[line]), reconnected=False)
        self.assertEqual(shown, [chat.Past(chat.Note("--- 1 earlier line ---", "2")), chat.Past(line),
                                 chat.Past(chat.Note("--- now ---", "2"))], "a pipe shows none of it unless --replay")
    def test_a_line_shown_early_is_not_shown_again_when_it_comes_numbered(self):
        session = self.welcomed()
        early = {"type": "msg", "from": "bob", "text": "slow redis", "room": "lobby", "ts": 5.5, "id": -9, "local": True}
        numbered = dict(early, id=8, seq=8)
        del numbered["local"]
        other = dict(numbered, text="another", id=9, seq=9)
        self.assertEqual(session.receive(dict(early)), [early])
        self.assertEqual(session.seen, {"lobby": 7})                # a provisional line moves no cursor
        history = [numbered, other]
        _, shown, _ = session.welcome(dict(self.WELCOME, history=history), reconnected=True)   # a resume
        self.assertEqual([f["text"] for f in shown if isinstance(f, dict)], ["another"])
        self.assertEqual(session.receive(dict(numbered)), [dict(numbered)])   # known once only
        hostile = dict(early, text=["not", "hashable"], ts={})
        self.assertEqual(session.receive(dict(hostile)), [hostile])


    def test_frames_from_the_server(self):
        session = self.welcomed()
        self.assertEqual(session.receive({"type": "ping"}), [chat.Send({"type": "pong"})])
        session.receive({"type": "nick", "old": "alice", "new": "alicia"})
        self.assertEqual(session.nick, "alicia")
        session.join("#dev")
        shown = session.receive({"type": "joined", "room": "dev", "users": ["alicia"], "seq": 3, "history": []})
        self.assertEqual((session.room, session.rooms, session.seen["dev"]), ("dev", ["lobby", "dev"], 3))
        self.assertIn("your lines go here now", shown[-1].text)
        session.receive({"type": "parted", "room": "dev"})
        self.assertEqual(session.room, "lobby")
        session.receive({"type": "error", "code": "kicked", "text": "bye"})
        self.assertEqual(session.last_error, "kicked")
        session.receive({"type": "bye", "reason": "down"})
        self.assertTrue(session.ended)

    def test_typed_text_is_split_to_the_servers_limit_and_echoed(self):
        session = self.welcomed()
        sends = [e.frame for e in session.say("x" * 250) if isinstance(e, chat.Send)]
        self.assertEqual([len(f["text"]) for f in sends], [100, 100, 50])
        self.assertTrue(all(f["room"] == "lobby" for f in sends))
        self.assertEqual(session.switch("#nowhere")[0].code, "31")


class ClientSessionRulesTest(unittest.TestCase):
    """The session's rules for issue 14, in memory."""

    def welcomed(self, **fields):
        session = chat.Session("alice")
        session.welcome(dict(ClientSessionTest.WELCOME, **fields), reconnected=False)
        return session

    def test_join_switches_at_once_and_a_refusal_switches_back(self):
        session = self.welcomed()
        self.assertEqual(session.join("#dev"), [chat.Send({"type": "join", "room": "dev"})])
        self.assertEqual(session.say("secret plan")[0].frame["room"], "dev")
        notes = session.receive({"type": "error", "code": "bad-room", "text": "no"})
        self.assertEqual(session.room, "lobby")
        self.assertIn("you did not join #dev", notes[-1].text)
        session.join("#dev")        # a room ban: any error answering a join is the join's
        session.receive({"type": "error", "code": "banned", "of": "join", "text": "you are banned from #dev"})
        self.assertEqual(session.room, "lobby")

    def test_part_moves_your_lines_at_once_and_says_where_after_you_left(self):
        session = self.welcomed(rooms=["lobby", "dev"], room="lobby")
        session.part()
        self.assertEqual(session.room, "dev")
        note = session.receive({"type": "parted", "room": "lobby"})
        self.assertEqual(note[-1].text, "you left #lobby; now talking in #dev")
        note = session.receive({"type": "parted", "room": "dev", "reason": "kicked by carol: off \x1b[2Jtopic"})
        self.assertEqual(note[-1].text, "you left #dev (kicked by carol: off \\x1b[2Jtopic); "
                                        "you are in no room now; /join one")

    def test_topic_shows_sets_and_clears(self):
        session = self.welcomed()
        self.assertEqual([e.frame for e in session.topic() + session.topic("ship it") + session.topic("-delete")],
                         [{"type": "topic", "room": "lobby"}, {"type": "topic", "room": "lobby", "text": "ship it"},
                          {"type": "topic", "room": "lobby", "text": ""}])
        self.assertEqual(chat.render({"type": "topic", "room": "lobby", "text": "", "by": "root"}, chat.View()),
                         "-- root cleared the topic of #lobby")

    def test_join_of_a_room_you_are_in_switches_and_renaming_to_yourself_says_so(self):
        session = self.welcomed(rooms=["lobby", "dev"])
        self.assertEqual(session.join("dev"), [chat.Note("now talking in #dev")])
        self.assertEqual(session.rename("alice")[0].text, "you are alice already")

    def test_reply_and_a_message_to_yourself(self):
        session = self.welcomed()
        self.assertIn("nobody", session.reply("hi")[0].text)
        session.receive({"type": "msg", "from": "bob", "to": "alice", "text": "psst", "id": 9})
        self.assertEqual(session.reply("hi")[0].frame, {"type": "pm", "to": "bob", "text": "hi"})
        self.assertEqual(session.message("ALICE", "note"), [chat.Send({"type": "pm", "to": "ALICE", "text": "note"})])

    def test_missed_counts_only_what_you_did_not_see(self):
        session = self.welcomed()
        for i in range(5):
            session.say(f"mine {i}")
        _, _, missed = session.welcome(dict(ClientSessionTest.WELCOME, missed={"lobby": 2}, history=[
            {"type": "msg", "from": "alice", "text": f"mine {i}", "room": "lobby", "seq": 10 + i} for i in (2, 3, 4)]),
            reconnected=True)
        self.assertEqual(missed, {})

    def test_completion(self):
        session = self.welcomed(users=["alice", "bob", "Bernard"])
        self.assertEqual(session.completions("b", 1, ["join"]), (["Bernard: ", "bob: "], 0))
        self.assertEqual(session.completions("hi bo", 5, ["join"]), (["bob "], 3))
        self.assertEqual(session.completions("/jo", 3, ["join", "quit"]), (["/join "], 0))
        session.receive({"type": "rooms", "rooms": [{"name": "dev", "users": 1}]})
        self.assertEqual(session.completions("/join #d", 8, []), (["#dev "], 6))


class HostileServerTest(unittest.TestCase):
    """Issue 18 items 8, 9, 11: what a hostile server sends never reaches the
    terminal raw, never crashes the client, and is never typed for the user."""

    OSC, CLEAR = "\x1b]0;PWNED\x07", "\x1b[2J"

    def welcomed(self, **fields):
        session = chat.Session("alice")
        session.welcome(dict(ClientSessionTest.WELCOME, **fields), reconnected=False)
        return session

    def test_names_that_are_not_names_are_not_taken(self):
        session = self.welcomed(nick=self.OSC + "alice", room=self.CLEAR, rooms=["lobby", self.OSC])
        self.assertEqual((session.nick, session.room, session.rooms), ("alice", "lobby", ["lobby"]))
        self.assertEqual(session.receive({"type": "joined", "room": self.OSC, "users": []}), [])
        shown = session.receive({"type": "joined", "room": "dev", "users": ["bob" + self.CLEAR, "carol"]})
        self.assertNotIn("\x1b", shown[-1].text)
        session.receive({"type": "nick", "old": "alice", "new": self.OSC})
        self.assertEqual(session.nick, "alice")

    def test_fields_of_the_wrong_type_or_out_of_range_crash_nothing(self):
        for fields in ({"rooms": 5, "nick": 123, "idle_timeout": 1e300}, {"idle_timeout": float("inf")},
                       {"ping_interval": -1, "idle_timeout": float("nan")}, {"seq": {"lobby": "x", 5: 5}},
                       {"max_text": 10 ** 12, "instance": ["x"], "session": {"a": 1}, "users": "alice"},
                       {"missed": {"lobby": 10 ** 30, "\x1b": 3}, "history": [1, "x", {"room": 5}]}):
            with self.subTest(fields):
                session = chat.Session("alice")
                session.welcome(dict(ClientSessionTest.WELCOME, **fields), reconnected=True)
                self.assertLessEqual(session.idle_timeout, 4 * 3600)
                self.assertGreater(session.idle_timeout, session.ping_interval)
                self.assertGreaterEqual(session.ping_interval, 1.0)
                self.assertLessEqual(session.max_text, chat.TEXT_MAX)
                session.receive({"type": "error", "code": {"kicked": 1}, "text": ["x"]})

    def test_no_frame_of_any_type_with_any_hostile_value_crashes_the_renderer(self):
        view = chat.View(me="alice", color=True, timestamps=True, rooms=True, width=40)
        fields = ("ts", "until", "since", "idle", "users", "retry_after", "text", "from", "nick", "room", "reason",
                  "rooms", "bans", "away", "history", "topic", "by", "online", "account", "code", "old", "new",
                  "modes", "args")
        values = (1e300, -1e300, float("nan"), float("inf"), -1, 10 ** 40, True, None, "\x1b[2J", [1, {}], {"a": 1},
                  [{"until": 1e300, "since": float("nan"), "users": 10 ** 40, "name": 5}])
        for kind in chat._RENDERERS:
            for field in fields:
                for value in values:
                    frame = {"type": kind, "from": "bob", "text": "x", field: value}
                    try:
                        line = chat.render(frame, view)
                    except Exception as error:
                        self.fail(f"{frame!r}: {error!r}")
                    self.assertNotIn("\x1b[2J", chat._plain(line or ""))

    def test_a_refusals_code_is_drawn_escaped(self):
        step = chat.Session("alice").refused({"type": "error", "code": "x" + self.OSC + self.CLEAR, "text": "no"},
                                             "127.0.0.1:1", False)
        self.assertNotIn("\x1b", step.message)

    def test_tab_offers_only_names_that_are_nicks(self):
        session = self.welcomed(users=["alice", "eve\n/msg mallory my-draft", "eve2"])
        self.assertEqual(session.completions("e", 1, []), (["eve2: "], 0))

    def test_the_prompt_and_greeting_draw_nothing_raw(self):
        with socket.create_server(("127.0.0.1", 0)) as listener:    # a fake server, to control the bytes
            terminal = Terminal(self, "client", "-n", "alice", "-p", listener.getsockname()[1])
            conn, _ = listener.accept()
            with conn:
                fake = Peer(0, sock=conn)
                self.assertEqual(fake.next()["type"], "hello")
                conn.sendall(chat.encode({"type": "welcome", "nick": self.OSC, "room": self.CLEAR,
                                          "rooms": [self.CLEAR], "users": [self.OSC], "history": [],
                                          "idle_timeout": float("inf")})
                             + chat.encode({"type": "joined", "room": self.OSC + "x", "users": [], "history": []}))
                terminal.settle(r"#lobby>")
                self.assertNotIn(b"PWNED", terminal.output)
                self.assertNotIn(b"\x1b[2J", terminal.output)
                self.assertIsNone(terminal.proc.poll())


class ClientProcessTest(ServerTestCase):
    def test_piped_lines_are_sent_and_the_client_exits_0_at_their_end(self):
        alice = self.peer("alice")
        client = self.client("-n", "bot", stdin=subprocess.PIPE)
        alice.expect("join", nick="bot")
        client.write("hello from a pipe\n\n/me pipes up\n//slash line\ncafé 你好 🎉\n")
        client.proc.stdin.close()
        self.assertEqual([alice.expect("msg")["text"] for _ in range(4)],
                         ["hello from a pipe", "pipes up", "/slash line", "café 你好 🎉"])
        self.assertEqual(alice.expect("leave")["nick"], "bot")
        self.assertEqual(client.wait(), 0)

    def test_incoming_lines_are_printed_plainly_and_safely(self):
        alice = self.peer("alice")
        client = self.client("-n", "reader")
        alice.expect("join", nick="reader")
        alice.send({"type": "msg", "text": "hi \x1b[2Jthere\x07 你好"})
        self.assertIn("there", client.wait_line("<alice>").string)
        self.assertNotIn("\x1b", "".join(client.out_lines))
        self.assertIn("你好", "".join(client.out_lines))
        client.proc.stdin.close()
        self.assertEqual(client.wait(), 0)

    def test_printf_pipe_exactly_as_the_readme_says(self):
        alice = self.peer("alice")
        result = subprocess.run(f"printf 'hi\\n' | {sys.executable} {CHAT} client -p {self.port} -n printer",
                                shell=True, capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(alice.expect("msg")["text"], "hi")

    def test_a_taken_nick_is_retried_with_a_suffix(self):
        alice = self.peer("alice")
        client = self.client("-n", "alice")
        client.wait_line("taken; trying alice_2", "stderr")
        self.assertEqual(alice.expect("join")["nick"], "alice_2")

    def test_unknown_command_is_a_local_error_and_nothing_is_sent(self):
        alice = self.peer("alice")
        client = self.client("-n", "bob")
        alice.expect("join", nick="bob")
        client.write("/frobnicate now\n/msg alice private\n")
        client.wait_line("unknown command /frobnicate", "stderr")
        self.assertEqual(alice.expect("msg")["to"], "alice")

    def test_frames_that_arrive_with_the_welcome_are_shown(self):
        with socket.create_server(("127.0.0.1", 0)) as listener:    # a fake server, to control the bytes
            client = self.client("-n", "bob", "-p", listener.getsockname()[1])
            conn, _ = listener.accept()
            with conn:
                fake = Peer(0, sock=conn)
                self.assertEqual(fake.next()["type"], "hello")
                conn.sendall(chat.encode({"type": "welcome", "nick": "bob", "users": ["alice", "bob"],
                                          "history": [], "server": "fake", "max_payload": 65536})
                             + chat.encode({"type": "msg", "id": 1, "from": "alice", "text": "right behind",
                                            "ts": 0.0}))     # one segment: both frames in one read
                client.wait_line("<alice> right behind")

    def test_no_server_is_one_clear_line_and_exit_1(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]       # bound but not listening: connections are refused
            result = subprocess.run([sys.executable, CHAT, "client", "-p", str(port)], stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(),
                         f"cannot connect to 127.0.0.1:{port}: connection refused - is the server running?")
        self.assertEqual(result.stdout, "")

    def test_a_dying_server_is_connection_lost_and_exit_1(self):
        server, port = server_process()
        try:
            client = Process("client", "-p", port, "-n", "x", "--reconnect", 0)
            client.wait_line("CONNECTED", "stderr")
            server.proc.kill()
            self.assertEqual(client.wait(), 1)
            self.assertTrue(any("connection lost" in line for line in client.err_lines))
            self.assertFalse(any("Traceback" in line for line in client.err_lines))
            client.kill()
        finally:
            server.kill()

    def test_help_of_every_command_shows_defaults(self):
        for command in ([], ["server"], ["client"], ["bench"], ["gencert"]):
            with self.subTest(command=command):
                result = subprocess.run([sys.executable, CHAT] + command + ["--help"], capture_output=True,
                                        text=True, timeout=TIMEOUT)
                self.assertEqual(result.returncode, 0)
                if command:
                    self.assertIn("(default:", result.stdout)
        result = subprocess.run([sys.executable, CHAT, "server", "--help"], capture_output=True, text=True)
        self.assertIn("50000", result.stdout)
        self.assertIn("127.0.0.1", result.stdout)


class ClientRoomsTest(ServerTestCase):
    def test_the_client_joins_switches_and_tags_lines_with_rooms(self):
        alice = self.peer("alice")
        alice.send({"type": "join", "room": "dev"})
        alice.expect("joined")
        client = self.client("-n", "bob")
        alice.expect("join", nick="bob", room="lobby")
        client.write("/join #dev\n")
        client.wait_line("you are in #dev", "stderr")
        client.write("in dev\n/switch #lobby\nin the lobby\n")
        self.assertEqual((alice.expect("msg")["room"], alice.expect("msg")["room"]), ("dev", "lobby"))
        alice.send({"type": "msg", "text": "tagged", "room": "dev"})
        client.wait_line("#dev <alice> tagged")


class ClientOrderTest(ServerTestCase):
    """Commands take effect in the order typed (a pipe: the same client, no terminal)."""

    def test_a_line_after_join_goes_to_the_new_room(self):
        bob, carol = self.peer("bob"), self.peer("carol")
        carol.send({"type": "join", "room": "secret"})
        carol.expect("joined")
        client = self.client("-n", "alice")
        bob.expect("join", nick="alice")
        client.write("/join #secret\nsecret plan\n/part\nback in the lobby\n")
        self.assertEqual(carol.expect("msg")["text"], "secret plan")
        self.assertEqual(bob.expect("msg")["text"], "back in the lobby")
        self.assertFalse([f for f in bob.sync() if f["type"] == "msg"])

    def test_a_pipe_prints_only_what_is_said_after_it_joined_unless_asked(self):
        alice = self.peer("alice")
        alice.send({"type": "msg", "text": "said before"})
        alice.sync()
        plain = self.client("-n", "plain")
        alice.expect("join", nick="plain")
        alice.send({"type": "msg", "text": "said after"})
        plain.wait_line("<alice> said after")
        self.assertNotIn("<alice> said before", plain.out_lines)
        replay = self.client("-n", "replay", "--replay")
        replay.wait_line("<alice> said before")

    def test_one_line_per_reconnect_attempt(self):
        port = free_port()
        client = Process("client", "-p", port, "-n", "alice", "--reconnect", 0)
        self.addCleanup(client.kill)
        self.assertEqual(client.wait(), 1)
        server, port = server_process()
        self.addCleanup(server.kill)
        client = Process("client", "-p", port, "-n", "alice", "--reconnect", 2.5)
        self.addCleanup(client.kill)
        client.wait_line("CONNECTED", "stderr")
        server.kill()
        self.assertEqual(client.wait(timeout=10), 1)
        attempts = [line for line in client.err_lines if "cannot connect" in line]
        self.assertGreaterEqual(len(attempts), 2)
        self.assertTrue(all("trying again in" in line or "gave up" in line for line in attempts), client.err_lines)
        self.assertFalse([line for line in client.err_lines if line.startswith("reconnecting in")])


class ReconnectTest(ServerTestCase):
    def test_a_cut_client_reconnects_and_gets_exactly_what_it_missed(self):
        alice = self.peer("alice")
        client = self.client("-n", "bob")
        alice.expect("join", nick="bob")
        client.write("/join #dev\n")
        client.wait_line("you are in #dev", "stderr")
        client.write("/switch #lobby\n")
        client.wait_line("now talking in #lobby", "stderr")
        alice.send({"type": "msg", "text": "before"})
        client.wait_line("<alice> before")
        client.write("mine, before the cut\n")
        alice.expect("msg", text="mine, before the cut")
        cut(self.server, "bob")
        alice.expect("leave", nick="bob")
        for i in range(5):
            alice.send({"type": "msg", "text": f"missed {i}"})
        client.wait_line("reconnecting", "stderr")
        client.write("typed while away\n")
        client.wait_line("RECONNECTED", "stderr")
        self.assertEqual(alice.expect("msg")["text"], "typed while away")
        alice.send({"type": "msg", "text": "after"})
        client.wait_line("<alice> after")
        said = [line for line in client.out_lines if "<alice>" in line]
        self.assertEqual(said, [f"#lobby <alice> {text}" for text in
                                ["before"] + [f"missed {i}" for i in range(5)] + ["after"]])
        self.assertFalse(any("mine, before the cut" in line for line in client.out_lines),
                         "the replay does not show bob his own line again")
        alice.send({"type": "who", "room": "dev"})
        self.assertEqual(alice.expect("who")["users"], ["bob"], "bob is back in #dev")

    def test_lines_no_longer_kept_are_counted(self):
        self.server.stop()
        self.server = ServerThread(history=3)
        self.addCleanup(self.server.stop)
        self.port = self.server.port
        alice = self.peer("alice")
        client = self.client("-n", "bob")
        alice.expect("join", nick="bob")
        cut(self.server, "bob")
        alice.expect("leave", nick="bob")
        for i in range(8):
            alice.send({"type": "msg", "text": f"missed {i}"})
        client.wait_line("5 lines said in #lobby while you were away can no longer be replayed", "stderr",
                         timeout=10)
        client.wait_line("<alice> missed 7")
        self.assertEqual([line for line in client.out_lines if "<alice>" in line],
                         [f"<alice> missed {i}" for i in (5, 6, 7)])

    def test_kicked_clients_do_not_reconnect(self):
        alice = self.peer("alice")
        client = self.client("-n", "bob")
        alice.expect("join", nick="bob")
        self.server.call(self.server.loop.chat.kick, "bob", "bye")
        self.assertEqual(client.wait(), 3)
        self.assertFalse(any("reconnecting" in line for line in client.err_lines))


class ResumeTruthTest(ServerTestCase):
    config = {"history": 3}

    def test_your_own_lines_are_not_counted_as_missed(self):
        alice = self.peer("alice")
        client = self.client("-n", "bob")
        alice.expect("join", nick="bob")
        client.write("".join(f"mine {i}\n" for i in range(5)))
        for _ in range(5):
            alice.expect("msg")
        cut(self.server, "bob")
        client.wait_line("RECONNECTED", "stderr", timeout=10)
        alice.send({"type": "ping"})
        alice.expect("pong")
        client.write("after\n")
        alice.expect("msg", text="after")
        self.assertFalse([line for line in client.err_lines if "no longer be replayed" in line], client.err_lines)


class ClientKeepaliveTest(unittest.TestCase):
    def test_the_client_notices_a_frozen_server(self):
        server, port = server_process("--ping-interval", 0.3, "--idle-timeout", 1)
        try:
            client = Process("client", "-p", port, "-n", "watcher", "--reconnect", 0)
            client.wait_line("CONNECTED", "stderr")
            server.proc.send_signal(signal.SIGSTOP)     # alive but silent, like a half-open peer
            try:
                self.assertEqual(client.wait(timeout=5), 1)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            self.assertTrue(any("nothing from the server" in line for line in client.err_lines))
            client.kill()
        finally:
            server.kill()


class BotModeTest(ServerTestCase):
    def test_json_mode_prints_frames_and_sends_json_or_text(self):
        alice = self.peer("alice")
        bot = self.client("-n", "robot", "--json")
        welcome = json.loads(bot.wait_line(r'^\{.*"welcome"').string)
        self.assertEqual(welcome["nick"], "robot")
        alice.send({"type": "msg", "text": "hello robot"})
        frame = json.loads(bot.wait_line(r'"hello robot"').string)
        self.assertEqual((frame["type"], frame["from"]), ("msg", "alice"))
        bot.write('{"type":"pm","to":"alice","text":"as a frame"}\nplain text line\n')
        self.assertEqual(alice.expect("msg")["to"], "alice")
        self.assertEqual(alice.expect("msg")["text"], "plain text line")
        bot.proc.stdin.close()
        self.assertEqual(bot.wait(), 0)

    def test_the_readme_bot_answers_time(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        code = re.search(r"<!-- bot -->\s*```python\n(.*?)```", readme, re.S)[1]
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(code)
        self.addCleanup(os.unlink, f.name)
        alice = self.peer("alice")
        alice.send({"type": "join", "room": "dev"})
        bot = subprocess.Popen([sys.executable, f.name, "-p", str(self.port), "#dev"], cwd=HERE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        self.addCleanup(bot.stderr.close)
        self.addCleanup(bot.wait)
        self.addCleanup(bot.kill)
        alice.expect("join", nick="timebot", room="dev")
        alice.send({"type": "msg", "text": "!time", "room": "dev"})
        answer = alice.expect("msg")
        self.assertEqual((answer["from"], answer["room"]), ("timebot", "dev"))
        self.assertRegex(answer["text"], r"\d\d:\d\d:\d\d")
        alice.send({"type": "msg", "text": "!time"})
        self.assertEqual(alice.expect("msg")["room"], "lobby")
        os.killpg(bot.pid, signal.SIGINT)      # Ctrl-C at its terminal: to the bot and its client
        self.assertEqual(bot.wait(TIMEOUT), 0)
        self.assertEqual(bot.stderr.read(), "", "no traceback")
        self.assertEqual(alice.expect("leave", nick="timebot")["room"], "lobby")


class NewcomerTest(ServerTestCase):
    """Issue 21: what a new user tripped over, each as it was seen."""

    def terminal(self, *args, columns=80, env=None, nick="alice"):
        terminal = Terminal(self, "client", "-p", self.port, "-n", nick, *args, columns=columns, env=env)
        terminal.settle(r"#lobby>$")
        return terminal

    def test_a_dumb_terminal_never_glues_a_line_to_what_you_type_and_shows_the_room(self):
        bob = self.peer("bob")
        terminal = Terminal(self, "client", "-p", self.port, "-n", "alice", env={"TERM": "dumb"})
        terminal.expect(r"#lobby> $")
        bob.expect("join", nick="alice")
        terminal.type("dumb typ")
        terminal.expect("dumb typ")
        bob.send({"type": "msg", "text": "hi alice"})
        terminal.expect(r"^\r?\n[^\n]*<bob> hi alice\r?\n#lobby> ")     # below what is typed, then the prompt
        terminal.type("ing\r")
        self.assertEqual(bob.expect("msg")["text"], "dumb typing")
        self.assertNotIn(b"\x1b", terminal.output)

    def test_a_pm_that_fails_is_never_shown_as_sent(self):
        terminal = self.terminal()
        terminal.type("/msg nobody hi there\r")
        terminal.settle("nobody here is called nobody")
        self.assertFalse([row for row in terminal.screen.lines() if "[pm to nobody]" in row])
        bob = self.peer("bob")
        terminal.type("/msg bob hi bob\r")
        self.assertEqual(bob.expect("msg")["text"], "hi bob")
        terminal.settle(r"\[pm to bob\] hi bob")

    def test_tab_completes_rooms_after_join_without_asking_for_the_list_first(self):
        other = self.peer("bob")
        other.send({"type": "join", "room": "design"})
        other.expect("joined")
        terminal = self.terminal()
        terminal.type("/join #des\t")
        terminal.settle(r"#lobby> /join #design$")

    def test_pipe_mode_sends_notices_to_stderr_and_chat_to_stdout(self):
        bob = self.peer("bob")
        client = self.client("-n", "piper")
        bob.expect("join", nick="piper")
        bob.send({"type": "msg", "text": "said"})
        client.wait_line("<bob> said")
        bob.send({"type": "part", "room": "lobby"})
        client.wait_line("bob left")
        self.assertFalse([line for line in client.out_lines if "***" in line], client.out_lines)
        client.proc.stdin.close()
        self.assertEqual(client.wait(), 0)

    def test_a_kicked_client_says_it_was_kicked_and_nothing_more(self):
        client = self.client("-n", "bob")
        wait_until(lambda: self.server.call(lambda: "bob" in self.server.loop.chat.users), what="bob in")
        self.server.call(self.server.loop.chat.kick, "bob", "enough")
        self.assertEqual(client.wait(), 3)
        self.assertTrue(any("kicked by the operator: enough" in line for line in client.err_lines + client.out_lines))
        self.assertFalse([line for line in client.err_lines if "connection lost" in line], client.err_lines)

    def test_joining_an_empty_room_says_alone_once(self):
        terminal = self.terminal()
        terminal.type("/join #dev\r")
        screen = terminal.settle("you are alone in #dev")
        self.assertEqual(len([row for row in screen.lines() if "alone" in row or "on your own" in row]), 2,
                         "one for the lobby, one for #dev")

    def test_gencert_into_a_closed_pipe_is_no_traceback(self):
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(f"{sys.executable} {CHAT} gencert --cert {tmp}/c.pem --key {tmp}/k.pem | head -c 5",
                                    shell=True, capture_output=True, text=True, timeout=30)
        self.assertNotIn("Traceback", result.stderr)


class CommunityClientTest(ServerTestCase):
    """Issue 20 through the real client: accounts and moderation as people use them."""
    config = {"ops": ("root",)}

    def test_register_asks_twice_hidden_and_logs_in_next_time(self):
        terminal = Terminal(self, "client", "-p", self.port, "-n", "alice")
        terminal.settle(r"#lobby>$")
        terminal.type("/register\r")
        terminal.settle("a password for your nick:")
        terminal.type("s3cret-pw\r")
        terminal.settle("the same password again:")
        terminal.type("s3cret-pw\r")
        terminal.settle("alice is registered")
        self.assertNotIn(b"s3cret-pw", terminal.output)
        terminal.type("/quit\r")
        terminal.wait()
        again = Terminal(self, "client", "-p", self.port, "-n", "alice")
        again.settle("password of the account alice:")
        again.type("s3cret-pw\r")
        again.settle("logged in to your account")
        self.assertNotIn(b"s3cret-pw", again.output, "not echoed")
        devices = os.path.join(CONFIG_HOME, "chat.py", "devices")
        with open(devices) as f:
            self.assertEqual(len([line for line in f if line.startswith(f"127.0.0.1:{self.port} aiice ")]), 1)
        self.assertEqual(os.stat(devices).st_mode & 0o777, 0o600, "a secret: its owner's only")
        kept = self.server.call(lambda: self.server.loop.chat.people.account(chat.name_key("alice"))["devices"])
        self.assertEqual(len(kept), 1, "the second login came with the first one's device")
        again.type("/register\r")
        again.settle("logged in to your account already")
        bot = self.client("-n", "alice", env={"CHAT_ACCOUNT_PASSWORD": "wrong"})
        self.assertEqual(bot.wait(), 3)
        self.assertTrue(any("wrong password for alice (login-failed)" in line for line in bot.err_lines), bot.err_lines)

    def test_password_asks_old_and_new_twice_and_never_says_them_in_the_room(self):
        bob = self.peer("bob")
        terminal = Terminal(self, "client", "-p", self.port, "-n", "alice")
        terminal.settle(r"#lobby>$")
        terminal.type("/register first-pw\r")
        terminal.settle("alice is registered")
        terminal.type("/password first-pw\r")         # half a change is none
        terminal.settle(r"usage: /password \[OLD NEW\]")
        terminal.type("/password\r")
        terminal.settle("your password now:")
        terminal.type("first-pw\r")
        terminal.settle("the new one:")
        terminal.type("second-pw\r")
        terminal.settle("the same password again:")
        terminal.type("second-pw\r")
        terminal.settle("your password is changed")
        terminal.type("seen\r")
        said = []
        while not said or said[-1] != "seen":
            frame = bob.next()
            said += [frame["text"]] if frame["type"] == "msg" else []
        self.assertEqual(said, ["seen"], "no password went to the room")
        self.assertNotIn(b"second-pw", terminal.output)

    def test_an_operator_bans_from_their_client_and_the_banned_client_stays_out(self):
        root = self.client("-n", "root")
        root.write("/register rootpw\n")
        root.wait_line("root is registered", "stderr")
        bob = self.client("-n", "bob")
        root.wait_line("bob joined")
        root.write("/ban bob 1h spamming\n")
        self.assertEqual(bob.wait(), 3)
        self.assertTrue(any("banned by root" in line and "spamming" in line for line in bob.err_lines), bob.err_lines)
        again = self.client("-n", "bob")
        self.assertEqual(again.wait(), 3)
        self.assertTrue(any("you are banned from this server" in line for line in again.err_lines), again.err_lines)
        root.write("/bans\n")
        root.wait_line("bob banned until", "stderr")

    def test_ignore_shows_nothing_from_them_and_is_kept(self):
        known = os.path.join(tempfile.mkdtemp(), "known_hosts")
        self.addCleanup(shutil.rmtree, os.path.dirname(known))
        bob = self.peer("bob")
        terminal = Terminal(self, "client", "-p", self.port, "-n", "alice", "--known-hosts", known)
        terminal.settle(r"#lobby>$")
        terminal.type("/ignore bob\r")
        terminal.settle("ignoring bob")
        bob.send({"type": "msg", "text": "you cannot see me"})
        bob.send({"type": "pm", "to": "alice", "text": "nor this"})
        bob.send({"type": "nick", "nick": "bobby"})
        terminal.settle("bob is now bobby: ignoring bobby too")
        bob.send({"type": "msg", "text": "renamed, still hidden"})
        carol = self.peer("carol")
        carol.send({"type": "msg", "text": "but me"})
        screen = terminal.settle("but me")
        self.assertFalse([row for row in screen.lines() if "see me" in row or "nor this" in row or "hidden" in row])
        with open(os.path.join(os.path.dirname(known), "ignores")) as f:
            self.assertEqual(f.read(), f"127.0.0.1:{self.port} bob\n127.0.0.1:{self.port} bobby\n",
                             "this server's list: bob on another server is someone else")


class ClientTerminalTest(ServerTestCase):
    """The client on a real pseudo-terminal, read back through Screen."""

    def terminal(self, *args, columns=80, env=None, nick="alice"):
        terminal = Terminal(self, "client", "-p", self.port, "-n", nick, *args, columns=columns, env=env)
        terminal.settle(r"#lobby>$")
        return terminal

    def test_the_screen_shows_what_enter_sends_and_the_cursor_where_the_next_key_goes(self):
        bob = self.peer("bob")
        terminal = self.terminal()
        bob.expect("join", nick="alice")
        terminal.type("helo world" + "\x1b[D" * 7)
        terminal.settle(r"#lobby> helo world$")
        bob.send({"type": "msg", "text": "a line arrives"})
        terminal.settle("<bob> a line arrives")
        terminal.type("l")
        screen = terminal.settle(r"#lobby> hello world$")
        self.assertEqual(screen.cursor_text(), "#lobby> hell")
        terminal.type("\r")
        self.assertEqual(bob.expect("msg")["text"], "hello world")
        self.assertEqual(len([row for row in terminal.settle(r"<alice> hello world").lines()
                              if "hello world" in row]), 1, "the typed line is replaced by the sent one")

    def test_resizing_and_ctrl_l_leave_no_stale_copies(self):
        bob = self.peer("bob")
        terminal = self.terminal(columns=60)
        typed = " ".join(f"w{i:02d}" for i in range(30))        # 119 columns with the prompt: two rows
        terminal.type(typed)
        terminal.settle("w29$")
        terminal.resize(40)
        bob.send({"type": "msg", "text": "after the resize"})
        screen = terminal.settle("after the resize")
        self.assertEqual(sum(row.count("w00") for row in screen.lines()), 1, screen.lines())
        self.assertTrue(screen.lines()[-1].endswith("w29"))
        terminal.type("\x0c")
        screen = terminal.settle("#lobby> w00")
        self.assertTrue(screen.lines()[0].startswith("#lobby> w00"), "Ctrl-L: the input at the top")
        terminal.type("\x15slow1\r")
        self.assertEqual(bob.expect("msg")["text"], "slow1")
        screen = terminal.settle("<alice> slow1")
        self.assertEqual([row for row in screen.lines() if "slow1" in row], ["<alice> slow1"][:0] or
                         [row for row in screen.lines() if "slow1" in row][:1])
        self.assertNotIn("#lobby> slow1", screen.lines())

    def test_a_bye_leaves_no_prompt_behind(self):
        terminal = self.terminal()
        terminal.type("half typed")
        terminal.settle("half typed")
        self.server.stop()
        self.assertEqual(terminal.wait(), 0)
        terminal.read(0.1)
        lines = terminal.screen.lines()
        self.assertIn("the server is going away", lines[-1])
        self.assertFalse([row for row in lines if row.startswith("#lobby>")], lines)

    def test_a_dumb_terminal_gets_plain_lines(self):
        bob = self.peer("bob")
        terminal = Terminal(self, "client", "-p", self.port, "-n", "alice", env={"TERM": "dumb"})
        terminal.expect("you are alice in #lobby")
        bob.expect("join", nick="alice")
        terminal.type("plain\r")
        self.assertEqual(bob.expect("msg")["text"], "plain")
        bob.send({"type": "msg", "text": "hi alice"})
        terminal.expect("<bob> hi alice")
        self.assertNotIn(b"\x1b", terminal.output)

    def test_a_line_that_names_you_or_a_private_message_rings_the_bell_and_nothing_else_does(self):
        bob = self.peer("bob")
        terminal = self.terminal()
        bob.expect("join", nick="alice")
        for text in ("hello everyone", "malice is not a name", "alicex neither"):
            bob.send({"type": "msg", "text": text})
        terminal.settle("alicex neither")
        self.assertEqual(terminal.screen.bells, 0)
        bob.send({"type": "msg", "text": "ALICE, lunch?"})
        terminal.settle("lunch")
        self.assertEqual(terminal.screen.bells, 1)
        dave = self.terminal(nick="dave")       # (a second bell within 2 s would be coalesced: see below)
        bob.send({"type": "pm", "to": "dave", "text": "psst"})
        dave.settle(r"\[pm from bob\] psst")
        self.assertEqual(dave.screen.bells, 1)
        dave.type("/r back at you\r")
        self.assertEqual((bob.expect("msg")["text"]), "back at you")
        quiet = self.terminal("--no-bell", nick="carol")
        bob.send({"type": "pm", "to": "carol", "text": "psst"})
        quiet.settle("psst")
        self.assertEqual(quiet.screen.bells, 0)

    def test_a_thousand_mentions_in_a_second_ring_once(self):
        """Issue 18 item 10, as measured: 1,000 mentions in a second rang 1,000 bells (500 pms, 500 lines)."""
        bob = self.peer("bob")
        terminal = self.terminal()
        bob.expect("join", nick="alice")
        for i in range(500):
            bob.send({"type": "pm", "to": "alice", "text": f"alice {i}"})
            bob.send({"type": "msg", "text": f"alice {i}"})
        terminal.settle(r"<bob> alice 499", timeout=15)
        self.assertEqual(terminal.screen.bells, 1)

    def test_tab_completes_commands_nicks_and_rooms(self):
        self.peer("bob")
        terminal = self.terminal()
        terminal.type("/jo\t")
        terminal.settle(r"#lobby> /join$")
        terminal.type("#dev\r")
        terminal.settle(r"#dev>$")
        terminal.type("/switch #lo\t")
        terminal.settle(r"#dev> /switch #lobby$")
        terminal.type("\r")
        terminal.settle(r"#lobby>$")
        terminal.type("b\t")
        terminal.settle(r"#lobby> bob:$")
        terminal.type("\x01\x0bhi b\t")      # in the middle of a line: no colon
        terminal.settle(r"#lobby> hi bob$")
        terminal.type("\x01\x0bal\t")        # yourself: not a candidate
        terminal.settle(r"#lobby> al$")

    def test_offline_lines_say_they_wait_then_go(self):
        server, port = server_process()
        self.addCleanup(server.kill)
        terminal = Terminal(self, "client", "-p", port, "-n", "alice")
        terminal.settle(r"#lobby>$")
        server.kill()
        terminal.settle("reconnecting")
        terminal.type("typed while offline\r")
        terminal.settle(r"typed while offline \(waiting to be sent\)")
        again = Process("server", "-p", port, stdin=subprocess.DEVNULL)
        self.addCleanup(again.kill)
        terminal.settle(r"sent 1 line kept while disconnected", timeout=10)

    def test_with_no_room_the_prompt_says_so_and_nothing_is_sent(self):
        terminal = self.terminal()
        terminal.type("/part\r")
        terminal.settle(r"you left #lobby; you are in no room now")
        terminal.settle(r"\(no room\)>$")
        terminal.type("into the void\r")
        terminal.settle("nothing was sent")


class PromptCancelTest(ServerTestCase):
    config = {"password": "s3cret"}

    def test_ctrl_c_at_the_password_prompt_cancels(self):
        terminal = Terminal(self, "client", "-p", self.port, "-n", "alice")
        terminal.expect("password for 127.0.0.1:")
        terminal.type("\x03")
        self.assertEqual(terminal.wait(), 1)
        terminal.expect("cancelled")


# ---------------------------------------------------------------------------
# 10. Certificates and the command line; the README
# ---------------------------------------------------------------------------

class OptionsTest(unittest.TestCase):
    def test_every_bad_value_is_one_line_naming_the_option_and_its_range(self):
        cases = [
            (["server", "-p", "70000"], "-p/--port", "from 0 to 65535"),
            (["server", "-p", "-1"], "-p/--port", "from 0 to 65535"),
            (["client", "-p", "116781"], "-p/--port", "from 1 to 65535"),
            (["client", "-p", "0"], "-p/--port", "from 1 to 65535"),
            (["server", "-m", "0"], "--max-connections", "from 1"),
            (["server", "-m", "-5"], "--max-connections", "from 1"),
            (["server", "--history", "-1"], "--history", "from 0"),
            (["server", "--history-bytes", "lots"], "--history-bytes", "size in bytes"),
            (["client", "--reconnect", "-5"], "--reconnect", "seconds from 0"),
            (["server", "--workers", "0"], "--workers", "from 1 to 256"),
            (["server", "--flood-rate", "0"], "--flood-rate", "above 0"),
            (["server", "--hello-timeout", "-1"], "--hello-timeout", "seconds above 0"),
            (["server", "--ping-interval", "nan"], "--ping-interval", "seconds above 0"),
            (["server", "--idle-timeout", "10", "--ping-interval", "30"], "--idle-timeout", "--ping-interval"),
            (["server", "--max-buffer", "1"], "--max-buffer", "at least 16K"),
            (["client", "-n", ""], "-n/--nick", "1-32 characters"),
            (["client", "-n", "a b"], "-n/--nick", "only letters"),
            (["client", "--fingerprint", "SHA256:nonsense"], "--fingerprint", "not a SHA-256 fingerprint"),
            (["server", "--tls-key", "k.pem"], "--tls-key", "needs --tls-cert"),
            (["server", "--workers", "2"], "--workers", "needs --redis"),
            (["server", "--redis", "http://x"], "--redis", "redis://"),
            (["server", "--redis", "redis://h", "--history-file", "f"], "--history-file", "--redis"),
            (["gencert", "--days", "0"], "--days", "days from 1"),
            (["bench", "-c", "2", "-s", "5"], "--senders", "--clients"),
        ]
        for argv, option, range_ in cases:
            with self.subTest(argv):
                code, err = usage_error(*argv)
                self.assertEqual(code, 2)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(option, err)
                self.assertIn(range_, err)

    def test_sizes_take_a_suffix(self):
        parser = chat.build_parser()
        self.assertEqual(parser.parse_args(["server", "--history-bytes", "64M"]).history_bytes, 64 << 20)
        self.assertEqual(parser.parse_args(["server", "--max-buffer", "512k"]).max_buffer, 512 << 10)

    def test_a_fingerprint_or_a_ca_file_implies_tls(self):
        parser = chat.build_parser()
        for extra in (["--cafile", "ca.pem"], ["--fingerprint", "SHA256:" + "A" * 43]):
            args = parser.parse_args(["client", *extra])
            chat.check_args(parser, args)
            self.assertTrue(args.tls)

    def test_fingerprints_in_every_form_people_have(self):
        canonical = chat.fingerprint(TEST_CERT.encode())       # any 32-byte digest will do
        hexed = chat.fingerprint_forms(canonical)[1]
        b64 = canonical[len("SHA256:"):]
        for form in (canonical, b64, b64 + "=", "sha256:" + b64, hexed, hexed.lower(), hexed.replace(":", ""),
                     "SHA256 Fingerprint=" + hexed, " " + hexed + " "):
            with self.subTest(form):
                self.assertEqual(chat.fingerprint_option(form), canonical)
        for bad in ("", "SHA256:", b64[:-2], hexed[:-3], "MD5:" + hexed, "zz" * 32):
            with self.subTest(bad):
                with self.assertRaises(argparse.ArgumentTypeError):
                    chat.fingerprint_option(bad)

    def test_help_states_each_real_default_once(self):
        parser = chat.build_parser()
        for name, sub in parser.subcommands.items():
            with self.subTest(name):
                text = sub.format_help()
                self.assertNotIn("(default: None)", text)
                self.assertNotIn("(default: False)", text)
                self.assertNotRegex(text, r"default:[^)]*\)\s*\(default:", "one default per option")
                self.assertNotRegex(text, r"default: \d+\.0\)", "floats as 100, not 100.0")
                self.assertTrue(sub.description)
        server = parser.subcommands["server"].format_help()
        self.assertIn("(default: 50000)", server)
        self.assertIn("(default: 127.0.0.1)", server)
        self.assertIn("(default: 1M)", server)
        self.assertIn("in days (default: 825)", parser.subcommands["gencert"].format_help())

    def test_the_gitignore_keeps_private_keys_out_of_commits(self):
        with open(os.path.join(HERE, ".gitignore")) as f:
            patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        for name in ("chat-key.pem", "chat-cert.pem", "server-key.pem"):
            self.assertTrue(any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name)


class StartupErrorTest(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.cert = os.path.join(self.dir, "cert.pem")
        with open(self.cert, "w") as f:
            f.write(TEST_CERT)

    def assert_one_line(self, args, *expected):
        code, _, err = run_chat(*args)
        self.assertEqual(code, 1, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        for fragment in expected:
            self.assertIn(fragment, err)

    def test_each_bad_file_or_host_is_one_line_naming_it(self):
        missing = os.path.join(self.dir, "missing.pem")
        cases = [
            (["server", "-p", 0, "--tls-cert", missing], missing, "TLS certificate", "No such file"),
            (["server", "-p", 0, "--tls-cert", self.cert], self.cert, "holds no private key", "--tls-key"),
            (["server", "-p", 0, "--history-file", os.path.join(self.dir, "nodir", "h.jsonl")],
             os.path.join(self.dir, "nodir"), "does not exist"),
            (["server", "-p", 0, "-H", "nosuch.invalid"], "nosuch.invalid", "no such host"),
            (["server", "-p", 0, "--password-file", missing], missing, "password file"),
            (["client", "-p", 1, "--password-file", missing], missing, "password file"),
            (["client", "-p", 1, "--tls", "--cafile", missing], missing, "CA file"),
            (["client", "-p", 1, "--cafile", missing], missing, "CA file"),
        ]
        for args, *expected in cases:
            with self.subTest(args):
                self.assert_one_line(args, *expected)

    def test_a_file_that_is_not_a_history_is_left_as_it_is_and_nothing_listens(self):
        notes = os.path.join(self.dir, "notes.txt")
        with open(notes, "w") as f:
            f.write("my notes\nbuy milk\n")
        port = free_port()
        self.assert_one_line(["server", "-p", port, "--history-file", notes], notes, "not a chat.py history")
        with open(notes) as f:
            self.assertEqual(f.read(), "my notes\nbuy milk\n")
        self.assertFalse(os.path.exists(notes + ".tmp"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))     # nothing was ever bound there

    def test_an_empty_history_file_is_made_a_history(self):
        path = os.path.join(self.dir, "empty.jsonl")
        open(path, "w").close()
        server, _ = server_process("--history-file", path)
        server.kill()
        with open(path) as f:
            self.assertIn('"format":1', f.readline())


class ReadmeTest(unittest.TestCase):
    """The README stands alone and says what the program does."""

    def setUp(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            self.readme = f.read()

    def test_no_link_leads_out_of_the_repository(self):
        for target in re.findall(r"\]\(([^)]+)\)", self.readme):
            with self.subTest(target):
                if target.startswith("#"):
                    anchors = {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")
                               for heading in re.findall(r"^#+ (.*)$", self.readme, re.M)}
                    self.assertIn(target[1:], anchors)
                else:
                    self.assertFalse(re.match(r"\w+://|\.\./|/", target), "outside the repository")
                    self.assertTrue(os.path.exists(os.path.join(HERE, target)))

    def test_every_frame_type_both_ways_is_in_the_protocol(self):
        protocol = self.readme[self.readme.index("## Protocol"):self.readme.index("## Exit codes")]
        server = Harness()
        client_sends = set(server.chat.handlers) | set(server.chat.before_hello)
        server_sends = {"welcome", "msg", "join", "leave", "nick", "who", "joined", "parted", "rooms", "notice",
                        "error", "ping", "pong", "bye", "registered", "topic", "whois", "bans", "op", "mode", "invited"}
        self.assertEqual(set(chat._RENDERERS) - server_sends, set(), "the client renders no other type")
        for kind in client_sends | server_sends:
            with self.subTest(kind):
                self.assertIn(f"| `{kind}`", protocol)
        with open(CHAT, encoding="utf-8") as f:
            codes = set(re.findall(r'ProtocolError\(\s*"([a-z-]+)"', f.read()))
        for code in codes:
            with self.subTest(code):
                self.assertIn(f"| `{code}` |", protocol)
        self.assertIn('"protocol": 3', protocol)
        self.assertEqual(chat.PROTOCOL, 3)

    def test_the_command_reference_is_the_help(self):
        reference = self.readme[self.readme.index("<!-- help -->"):self.readme.index("<!-- /help -->")]
        parser = chat.build_parser()
        for name, sub in parser.subcommands.items():
            block = reference[reference.index(f"$ python3 chat.py {name} --help"):]
            block = block[:block.index("```")]
            for action in sub._actions:
                if action.help == argparse.SUPPRESS:
                    continue
                with self.subTest(f"{name} {action.option_strings}"):
                    self.assertIn(action.option_strings[-1], block)
                    help_text = chat.HelpFormatter("x")._get_help_string(action)
                    default = re.search(r"\(default: [^)]*\)$", help_text)
                    if default:
                        self.assertIn(default[0], " ".join(block.split()))


class ReadmeCommandsTest(unittest.TestCase):
    def test_the_readme_lists_every_client_command(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        args = chat.build_parser().parse_args(["client"])
        args.password = args.account_password = None
        client = chat.ChatClient(args, chat.Console(False), chat.View())
        self.addCleanup(client.console.wake_r.close)
        self.addCleanup(client.console.wake_w.close)
        for command in client.commands.commands.values():
            with self.subTest(command.name):
                self.assertIn(f"| `/{command.name}{' ' + command.usage if command.usage else ''}` |", readme)
