"""``shmray.util.serialization``: Ray's module path for custom serializers.

Runs in: every process.
"""

from .._pickling import deregister_serializer, register_serializer

__all__ = ["deregister_serializer", "register_serializer"]
