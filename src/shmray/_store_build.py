"""cffi build script for shmray's object store; run by setup.py, never imported at run time.

The cdef is the block of ``_store.h`` between its ``cdef-begin``/``cdef-end`` markers, so
every C declaration exists once, in the header.  The extension is compiled in API mode
(``set_source``): cffi then releases the GIL around each call into the store, which lets a
large copy in ``shm_copy`` run while other Python threads go on.

Runs in: ``setup.py`` (at install), never in a session.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "_store.h"


def _cdef_from_header(text: str) -> str:
    start = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    end = text.index("/* cdef-end */")
    return text[start:end]


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header(HEADER.read_text()))
# setuptools wants paths relative to the project (setup.py's folder, the working directory
# when it builds); relpath also serves a direct run of this script from any folder.
ffibuilder.set_source(
    "shmray._store_cffi",
    '#include "_store.h"',
    sources=[os.path.relpath(HERE / "_store.c"), os.path.relpath(HERE / "_lend.c"),
             os.path.relpath(HERE / "_ring.c")],
    include_dirs=[os.path.relpath(HERE)],
    libraries=["pthread"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
