"""What spilling costs: gets that restore objects from disk while spilling others.

Run: python -m pytest bench/bench_spill.py --benchmark-enable --benchmark-only

Group spill-40MiB: a get that restores a 40 MiB object from the session's spill folder (and
spills the least recently used one to make room), against the floor under it: writing and
reading the same 40 MiB through a file.  A restored object keeps its spill file (its bytes
never change), so once every object has been spilled, spilling one again writes nothing and
each get costs a read.
"""

import numpy as np
import pytest

import shmray

MiB = 1 << 20


@pytest.fixture(scope="module")
def small_ray():
    shmray.init(num_cpus=2, object_store_memory=150 * MiB)
    yield shmray
    shmray.shutdown()


def test_spill_and_restore_40mib(benchmark, small_ray):
    """Cycle through 5 x 40 MiB arrays in a 150 MiB store: every get restores one from disk
    and spills the least recently used one (group spill-40MiB; compare with get-100MiB)."""
    benchmark.group = "spill-40MiB"
    refs = [small_ray.put(np.full(40 * MiB, i, dtype=np.uint8)) for i in range(5)]
    position = [0]

    def get_next():
        value = small_ray.get(refs[position[0] % 5])
        position[0] += 1
        return value[0]

    benchmark.pedantic(get_next, rounds=10, iterations=1, warmup_rounds=5)
    spiller = shmray._context.runtime.spiller
    benchmark.extra_info["restored_MiB"] = spiller.restored_bytes / MiB


def test_write_and_read_40mib_file(benchmark, tmp_path):
    """The floor under a spill + restore: write 40 MiB to a file and read 40 MiB back."""
    benchmark.group = "spill-40MiB"
    array = np.full(40 * MiB, 1, dtype=np.uint8)
    target = np.empty_like(array)
    path = tmp_path / "blob"

    def write_read():
        with open(path, "wb") as f:
            f.write(memoryview(array))
        with open(path, "rb") as f:
            f.readinto(memoryview(target))

    benchmark.pedantic(write_read, rounds=10, iterations=1, warmup_rounds=2)
