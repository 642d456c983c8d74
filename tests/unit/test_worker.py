"""ParkedReports: which held-back reports may wait in the slot, and its clearing."""

import mmap

from shmray import _protocol as P, _slot
from shmray._worker import ParkedReports

PARKABLE = frozenset((P.DIRECT_DONE, P.HOLD, P.RELEASE))


def done(i):
    return P.direct_done(bytes([i]) * 24, [(bytes([i]) * 28, b"x", b"", ())], 1, False)


def test_parks_while_only_parkable_messages_are_unsent_and_the_scheduler_reads_them():
    parking = ParkedReports(mmap.mmap(-1, _slot.SLOT_SIZE), PARKABLE)
    pending = [done(1)]
    assert parking.park(pending[-1], pending)
    pending += [P.release([b"r" * 28]), done(2)]
    assert parking.park(pending[-1], pending)
    assert _slot.parked_reports(parking.slot) == [done(1), done(2)]
    parking.clear()
    assert _slot.parked_reports(parking.slot) == []


def test_a_message_it_may_depend_on_unsent_stops_parking_until_the_next_flush():
    parking = ParkedReports(mmap.mmap(-1, _slot.SLOT_SIZE), PARKABLE)
    pending = [done(1)]
    assert parking.park(pending[-1], pending)
    pending += [P.put(b"p" * 28, b"", b"", ()), done(2)]  # a put made by the next call
    assert not parking.park(pending[-1], pending)
    pending.append(done(3))
    assert not parking.park(pending[-1], pending)  # the put is still unsent
    parking.clear()
    pending = [done(4)]  # a flush starts a new queue
    assert parking.park(pending[-1], pending)
    assert _slot.parked_reports(parking.slot) == [done(4)]


def test_nothing_is_parked_without_a_slot_or_past_the_batch():
    assert not ParkedReports(None, PARKABLE).park(done(1), [done(1)])
    parking = ParkedReports(mmap.mmap(-1, _slot.SLOT_SIZE), PARKABLE)
    pending = [done(i) for i in range(64)]
    assert not parking.park(pending[-1], pending)


def test_a_leased_tasks_reply_parks_beside_reports_and_one_too_big_leaves_them_whole():
    parking = ParkedReports(mmap.mmap(-1, _slot.SLOT_SIZE), PARKABLE)
    reply = P.result(b"t" * 24, [(b"o" * 28, b"x" * 100, b"")], [], 0.0, False)
    assert parking.park(reply, [])  # a reply goes to its caller: nothing queued for us
    pending = [done(1)]
    assert parking.park(pending[-1], pending)
    too_big = P.result(b"u" * 24, [(b"o" * 28, b"x" * _slot.SLOT_SIZE, b"")], [], 0.0, False)
    assert not parking.park(too_big, pending)
    assert _slot.parked_reports(parking.slot) == [reply, done(1)]
    pending.append(done(2))
    assert parking.park(pending[-1], pending)  # after the one that didn't fit
    assert _slot.parked_reports(parking.slot) == [reply, done(1), done(2)]
    parking.clear()
    assert parking.park(reply, [])
    assert _slot.parked_reports(parking.slot) == [reply]


def test_replies_of_every_shape_read_back_as_parked():
    """A reply of one result has a record of its own (its time to run is not kept); others
    are pickled."""
    parking = ParkedReports(mmap.mmap(-1, _slot.SLOT_SIZE), PARKABLE)
    replies = [
        P.result(b"a" * 24, [(b"o" * 28, b"", b"")], [], 0.0, False),
        P.result(b"b" * 24, [(b"p" * 28, None, b"")], [], 0.0, False),  # in the arena
        P.result(b"c" * 24, [(b"q" * 28, b"data", b"meta")], [], 0.0, False),
        P.result(b"d" * 24, [(b"r" * 28, b"1", b""), (b"s" * 28, None, b"m")], [], 0.5,
                 False),
        P.result(b"e" * 24, [], [], 0.25, True),
    ]
    for reply in replies:
        assert parking.park(reply, [])
    assert _slot.parked_reports(parking.slot) == replies
    took = P.result(b"f" * 24, [(b"o" * 28, b"x", b"")], [], 0.125, False)
    assert parking.park(took, [])
    assert _slot.parked_reports(parking.slot)[-1] == (*took[:4], 0.0, False)
