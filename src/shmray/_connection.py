"""Message framing over a Unix socket: length-prefixed pickled batches.

Runs in: every process.  The scheduler's sockets and every direct channel (``_direct``) are
non-blocking; a process's own connection to the scheduler blocks.

A frame is ``u32 length`` + ``pickle(list of messages)``; a message is a plain tuple
``(opcode, field, ...)`` (see ``_protocol``).  Plain tuples because pickling a NamedTuple costs
seven times as much per message (1.8 us against 0.26 us here), and every hop pays it twice.

- ``Connection.send`` queues; ``flush`` writes everything queued as one frame: one system call
  for any number of messages, and the peer unpickles the batch in one call.
- ``recv_messages`` returns every message that has arrived, reading as many frames as one
  ``recv_into`` brought in.
- The scheduler never blocks on a write (a slow reader must not stall the loop), nor does
  either end of a direct channel (two peers blocked writing to each other would deadlock):
  those connections keep unsent bytes in ``out``, finished when the socket has room.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import select
import socket
import struct
import termios
from typing import List, Optional

_frame = struct.Struct("<I")
_int = struct.Struct("i")
_ZERO_INT = bytes(_int.size)
_READ_SIZE = 1 << 16  # below malloc's mmap threshold: recv() of 1 MiB costs an mmap per call


class ConnectionClosed(EOFError):
    """The peer closed its end or died."""


class Connection:
    def __init__(self, sock: socket.socket, peer: str = "peer"):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pending: list = []  # messages queued for the next frame
        self.out = bytearray()   # encoded bytes not yet written (non-blocking side)
        self._in = bytearray()

    def fileno(self) -> int:
        return self.fd

    # -- writing ---------------------------------------------------------------------------

    def send(self, message: tuple) -> None:
        self.pending.append(message)

    def _encode_pending(self) -> None:
        if self.pending:
            payload = pickle.dumps(self.pending, protocol=5)
            self.pending = []
            self.out += _frame.pack(len(payload))
            self.out += payload

    def flush(self) -> None:
        """Write everything queued, waiting until it is written.

        Also right for a non-blocking socket (an async actor's): a full buffer means wait
        for room, never drop what is unsent, since half a frame would corrupt the stream.
        """
        self._encode_pending()
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                wait_writable(self.fd, None)
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                self.out.clear()
                raise ConnectionClosed(f"{self.peer} closed the connection") from exc
            del self.out[:sent]

    def send_now(self, message: tuple) -> None:
        self.pending.append(message)
        self.flush()

    def flush_nonblocking(self) -> bool:
        """Write what the socket takes now; True when nothing is left to write."""
        self._encode_pending()
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return False
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"{self.peer} closed the connection") from exc
            del self.out[:sent]
        return True

    # -- reading ---------------------------------------------------------------------------

    def recv_messages(self, block: bool = True) -> List[tuple]:
        """Messages that have arrived; with ``block``, waits until at least one has (also
        on a non-blocking socket, such as an async actor's, whose frame may come in parts)."""
        while True:
            messages = self._parse()
            if messages or not block:
                return messages
            try:
                self.fill()
            except BlockingIOError:
                wait_readable(self.fd, None)

    def read_available(self):
        """(messages that have arrived, whether the peer is gone) for a non-blocking socket
        whose peer we don't depend on: a corrupt frame counts as the peer being gone."""
        closed = False
        try:
            self.fill_nonblocking()
        except (ConnectionClosed, OSError):
            closed = True
        try:
            return self.recv_messages(block=False), closed
        except Exception:
            return [], True

    def fill_arrived(self) -> None:
        """Read every byte that has arrived by now and no more, so a peer that keeps writing
        can't keep us reading (the socket must be non-blocking)."""
        waiting = _int.unpack(fcntl.ioctl(self.fd, termios.FIONREAD, _ZERO_INT))[0]
        while waiting > 0:
            try:
                chunk = self.sock.recv(min(waiting, _READ_SIZE))
            except BlockingIOError:
                return
            except ConnectionResetError as exc:
                raise ConnectionClosed(f"{self.peer} died") from exc
            if not chunk:
                raise ConnectionClosed(f"{self.peer} closed the connection")
            self._in += chunk
            waiting -= len(chunk)

    def fill_nonblocking(self) -> None:
        """Read what is available now (the socket must be non-blocking)."""
        try:
            self.fill()
        except BlockingIOError:
            pass

    def fill(self) -> None:
        """Read what has arrived (once the socket is known readable, it doesn't block)."""
        try:
            chunk = self.sock.recv(_READ_SIZE)
        except ConnectionResetError as exc:
            raise ConnectionClosed(f"{self.peer} died") from exc
        if not chunk:
            raise ConnectionClosed(f"{self.peer} closed the connection")
        self._in += chunk

    def _parse(self) -> List[tuple]:
        buf = self._in
        messages: List[tuple] = []
        position = 0
        with memoryview(buf) as view:  # released before the bytearray is resized below
            while len(buf) - position >= 4:
                (length,) = _frame.unpack_from(buf, position)
                end = position + 4 + length
                if end > len(buf):
                    break
                messages.extend(pickle.loads(view[position + 4 : end]))
                position = end
        if position:
            del buf[:position]
        return messages

    def close(self, hang_up: bool = False) -> None:
        """Close this descriptor.  ``hang_up`` also shuts the socket down, which wakes a
        thread of ours blocked in select() on it and gives the peer EOF at once; never for
        a forked child's inherited copies: the socket itself is shared with the parent."""
        if hang_up:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass


def connection_pair(peer_a: str, peer_b: str):
    """Two connected ends: (a, b); each end's ``peer`` names the other side."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a, peer=peer_b), Connection(b, peer=peer_a)


def wait_writable(fd: int, timeout: Optional[float]) -> bool:
    """poll(), not select(): descriptors may be numbered past select()'s 1024."""
    return _wait(fd, select.POLLOUT, timeout)


def wait_readable(fd: int, timeout: Optional[float]) -> bool:
    return _wait(fd, select.POLLIN, timeout)


def _wait(fd: int, events: int, timeout: Optional[float]) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def close_fd_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
