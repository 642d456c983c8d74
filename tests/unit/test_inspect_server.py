"""The inspect server's rules, driven turn by turn with a selector of the test's own, as the
scheduler's loop drives it (no session): order, bounds, errors, peers that misbehave."""

import json
import os
import selectors
import socket
import time

import pytest

from shmray._inspect_client import MAX_REQUEST, SESSION_FILE
from shmray._scheduler import inspect_server


class Loop:
    """A server in ``folder`` answering with ``answer``; ``turn()`` is one turn of a loop."""

    def __init__(self, folder, answer=lambda request: {"echo": request}):
        self.selector = selectors.DefaultSelector()
        self.server = inspect_server.start(str(folder), str(folder), 1, self.selector, answer)
        assert self.server is not None

    def turn(self, times=1):
        for _ in range(times):
            for key, mask in self.selector.select(0):
                key.data(mask)

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.server.path)
        sock.settimeout(0.01)
        self.turn()
        return sock

    def replies(self, sock, count, turns=200):
        """``count`` answer lines, running the loop meanwhile."""
        data = b""
        for _ in range(turns):
            self.turn()
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                break
            data += chunk
            if data.count(b"\n") >= count:
                break
        return [json.loads(line) for line in data.split(b"\n")[:count] if line]

    def closed(self, sock, turns=200) -> bool:
        for _ in range(turns):
            self.turn()
            try:
                if sock.recv(1 << 20) == b"":
                    return True
            except socket.timeout:
                continue
            except ConnectionResetError:
                return True
        return False

    def close(self):
        self.server.close()
        self.selector.close()


@pytest.fixture
def loop(tmp_path):
    made = Loop(tmp_path)
    yield made
    made.close()


def test_the_card_says_where_to_connect(loop, tmp_path):
    card = json.loads((tmp_path / SESSION_FILE).read_text())
    assert card["socket"] == loop.server.path
    assert card["scheduler_pid"] == os.getpid() and card["driver_pid"] == 1
    assert oct(os.stat(tmp_path / SESSION_FILE).st_mode & 0o777) == "0o600"


def test_pipelined_and_split_requests_are_answered_in_order(loop):
    sock = loop.connect()
    sock.sendall(b"".join(json.dumps({"n": i}).encode() + b"\n" for i in range(100)))
    sock.sendall(b'{"n": ')
    loop.turn(3)
    sock.sendall(b'"last"}\n')
    replies = loop.replies(sock, 101)
    assert [reply["value"]["echo"]["n"] for reply in replies] == [*range(100), "last"]


def test_a_peer_is_answered_a_batch_a_turn(loop):
    sock = loop.connect()
    sock.sendall(b'{"n": 1}\n' * (3 * inspect_server._BATCH))
    time.sleep(0.05)
    loop.turn()  # reads them all, answers a batch
    sock.settimeout(1)
    first = sock.recv(1 << 20)
    assert first.count(b"\n") == inspect_server._BATCH


@pytest.mark.parametrize("line", [b"garbage", b"\xff\xfe", b"[1]", b"null", b"[" * 50000,
                                  b"9" * 5000, b""])
def test_what_is_not_a_json_object_gets_an_error_and_the_connection_goes_on(loop, line):
    sock = loop.connect()
    sock.sendall(line + b"\n" + b'{"ok": 1}\n')
    error, answer = loop.replies(sock, 2)
    assert "error" in error and answer == {"value": {"echo": {"ok": 1}}}


def test_a_line_too_long_closes_the_connection(loop):
    sock = loop.connect()
    sock.settimeout(1)
    sock.sendall(b"x" * (MAX_REQUEST + 1))
    sock.settimeout(0.01)
    assert loop.closed(sock)
    assert loop.server.peers == {}


def test_an_answer_that_fails_or_is_not_json_is_an_error_not_a_crash(tmp_path, capfd):
    def answer(request):
        if request.get("fail"):
            raise RuntimeError("a bug")
        return {"bytes": b"x"} if request.get("bytes") else "fine"

    loop = Loop(tmp_path, answer)
    try:
        sock = loop.connect()
        sock.sendall(b'{"fail": 1}\n{"bytes": 1}\n{}\n')
        failed, not_json, fine = loop.replies(sock, 3)
        assert "internal error" in failed["error"] and "not JSON" in not_json["error"]
        assert fine == {"value": "fine"}
        assert "RuntimeError: a bug" in capfd.readouterr().err
    finally:
        loop.close()


def test_a_peer_that_does_not_read_holds_one_answer_then_is_hung_up_on(loop, monkeypatch):
    big = "y" * (1 << 20)
    loop.server.answer = lambda request: big
    sock = loop.connect()
    sock.sendall(b"{}\n" * 1000)
    loop.turn(50)
    peer = next(iter(loop.server.peers.values()))
    assert 0 < len(peer.out) <= len(big) + 20
    assert loop.server.queued == len(peer.out)
    monkeypatch.setattr(inspect_server, "_STALL_SECONDS", 0.0)
    other = loop.connect()  # any event hangs up on peers that took nothing for too long
    assert loop.server.peers.get(peer.fd) is not peer  # its number may be ``other``'s now
    assert loop.server.queued == 0
    sock.close()
    other.close()


def test_too_many_peers_are_told_so(loop):
    peers = [loop.connect() for _ in range(inspect_server._MAX_PEERS)]
    extra = loop.connect()
    extra.settimeout(1)
    assert b"too many connections" in extra.recv(1 << 16)
    peers[0].close()
    loop.turn(3)
    again = loop.connect()
    again.sendall(b'{"n": 1}\n')
    assert loop.replies(again, 1) == [{"value": {"echo": {"n": 1}}}]
    for sock in [*peers, extra, again]:
        sock.close()


def test_closing_refuses_new_connections_and_hangs_up(tmp_path):
    loop = Loop(tmp_path)
    sock = loop.connect()
    path = loop.server.path
    loop.close()
    sock.settimeout(1)
    assert sock.recv(1) == b""
    assert not os.path.exists(path)
