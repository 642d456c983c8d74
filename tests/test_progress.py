"""shmray.util.progress end to end: over refs (results as tasks finish, exact counts when
tasks fail or are cancelled) and over plain iterables, with tqdm and with the text counter
that replaces it when tqdm is missing."""

import io
import sys
import time

import pytest

import shmray
from shmray.util import progress

DEADLOCK = 60


@pytest.fixture
def no_tqdm(monkeypatch):
    """As if tqdm were not installed: importing it raises ImportError."""
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)


def final_count(text):
    """The last 'n/total' the bar wrote."""
    return text.replace("\r", "\n").strip().splitlines()[-1]


def test_refs_give_values_as_they_finish_with_a_tqdm_bar(ray):
    pytest.importorskip("tqdm")

    @ray.remote
    def square(x):
        time.sleep(0.3 if x == 0 else 0)
        return x * x

    out = io.StringIO()
    refs = [square.remote(x) for x in range(12)]
    values = list(progress(refs, desc="squares", file=out, chunk_size=4))
    assert sorted(values) == [x * x for x in range(12)]
    assert values[0] != 0  # the slow first task does not hold back the others
    assert "squares" in out.getvalue() and "12/12" in final_count(out.getvalue())


def test_failed_and_cancelled_tasks_count_as_done(ray):
    pytest.importorskip("tqdm")

    @ray.remote
    def work(x):
        if x == 3:
            raise ValueError("bad input 3")
        if x == 4:
            time.sleep(DEADLOCK)
        return x

    refs = [work.remote(x) for x in range(6)]
    ray.cancel(refs[4])
    out = io.StringIO()
    done = list(progress(refs, file=out, yield_obj_refs=True))
    assert sorted(done, key=refs.index) == refs
    assert "6/6" in final_count(out.getvalue())

    out = io.StringIO()
    got = []
    with pytest.raises((ValueError, shmray.exceptions.TaskCancelledError)):
        for value in progress(refs, file=out, chunk_size=6):
            got.append(value)
    # The error comes after the values of the chunk ahead of it; the bar counted it too.
    assert f"{len(got) + 1}/6" in final_count(out.getvalue())


def test_iterables_such_as_imap_results(ray):
    pytest.importorskip("tqdm")

    @ray.remote
    def inc(x):
        return x + 1

    out = io.StringIO()
    lazy = (shmray.get(inc.remote(x)) for x in range(7))
    assert list(progress(lazy, desc="lazy", total=7, file=out)) == list(range(1, 8))
    assert "7/7" in final_count(out.getvalue())
    out = io.StringIO()
    assert list(progress(["a", "b"], file=out)) == ["a", "b"]  # len() gives the total
    assert "2/2" in final_count(out.getvalue())


def test_without_tqdm_a_text_counter_on_stderr(ray, no_tqdm, capsys):
    @ray.remote
    def f(x):
        if x == 2:
            raise ValueError("no")
        return x

    refs = [f.remote(x) for x in range(5)]
    assert len(list(progress(refs, desc="tasks", yield_obj_refs=True))) == 5
    assert final_count(capsys.readouterr().err) == "tasks: 5/5"
    assert list(progress(iter(range(3)), desc="items")) == [0, 1, 2]
    assert final_count(capsys.readouterr().err) == "items: 3"
    assert list(progress(range(4), disable=True)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


def test_bad_arguments_say_what_is_wrong(ray):
    @ray.remote
    def f():
        return 1

    with pytest.raises(TypeError, match="mixing ObjectRefs"):
        progress([f.remote(), 2])
    with pytest.raises(ValueError, match="chunk_size"):
        progress([f.remote()], chunk_size=0)
    with pytest.raises(ValueError, match="yield_obj_refs"):
        progress(iter([1]), yield_obj_refs=True)
