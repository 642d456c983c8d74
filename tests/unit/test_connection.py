"""Framing over a socket pair, without any other process: ``_connection``."""

import pickle
import struct
import threading
import time

from shmray._connection import connection_pair, wait_readable


def test_a_blocking_read_on_a_non_blocking_socket_waits_for_the_rest_of_a_frame():
    """An async actor's socket is non-blocking; a get() in one of its methods read a frame
    that came in parts as the scheduler being gone (BlockingIOError from the second read)."""
    reader, writer = connection_pair("a", "b")
    reader.sock.setblocking(False)
    payload = pickle.dumps([("message", b"x" * 200_000)])
    frame = struct.pack("<I", len(payload)) + payload

    def write_in_two_parts():
        writer.sock.sendall(frame[:1000])
        time.sleep(0.2)
        writer.sock.sendall(frame[1000:])

    thread = threading.Thread(target=write_in_two_parts)
    thread.start()
    try:
        assert wait_readable(reader.fd, 10)
        assert reader.recv_messages(block=True) == [("message", b"x" * 200_000)]
    finally:
        thread.join()
        reader.close()
        writer.close()
