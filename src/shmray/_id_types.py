"""Ray's ID classes (``shmray.TaskID``, ``ActorID``, ...): a fixed-size binary id with
``binary()``, ``hex()``, ``from_hex()``, ``nil()``, as Ray's, for programs that build or
compare them.

Runs in: every process.

shmray's own messages carry ids as plain bytes (``_ids``); these wrap such bytes where a
program asks for an object.  ``ObjectID`` is ``ObjectRef``: what Ray's users meant by an
ObjectID is a ref.
"""

from __future__ import annotations

import os


class BaseID:
    """A binary id of ``SIZE`` bytes."""

    SIZE = 28
    __slots__ = ("_id",)

    def __init__(self, id_bytes: bytes):
        if not isinstance(id_bytes, bytes) or len(id_bytes) != self.SIZE:
            raise ValueError(f"{type(self).__name__} takes {self.SIZE} bytes, got "
                             f"{id_bytes!r}")
        self._id = id_bytes

    @classmethod
    def size(cls) -> int:
        return cls.SIZE

    @classmethod
    def from_binary(cls, id_bytes: bytes):
        return cls(id_bytes)

    @classmethod
    def from_hex(cls, hex_id: str):
        return cls(bytes.fromhex(hex_id))

    @classmethod
    def nil(cls):
        return cls(b"\xff" * cls.SIZE)  # Ray's nil id: every byte 0xff

    @classmethod
    def from_random(cls):
        return cls(os.urandom(cls.SIZE))

    def is_nil(self) -> bool:
        return self._id == b"\xff" * self.SIZE

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()})"

    def __reduce__(self):
        return type(self), (self._id,)


def _id_class(name: str, size: int) -> type:
    return type(name, (BaseID,), {"SIZE": size, "__slots__": (), "__module__": "shmray",
                                  "__doc__": f"Ray's {name}: {size} bytes."})


UniqueID = _id_class("UniqueID", 28)
JobID = _id_class("JobID", 4)
TaskID = _id_class("TaskID", 24)
ActorID = _id_class("ActorID", 28)  # Ray's are 16 bytes; shmray's, an object id's 28
ActorClassID = _id_class("ActorClassID", 28)
FunctionID = _id_class("FunctionID", 28)
NodeID = _id_class("NodeID", 28)
WorkerID = _id_class("WorkerID", 28)
PlacementGroupID = _id_class("PlacementGroupID", 18)
