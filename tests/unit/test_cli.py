"""The ``shmray`` command line against a fake session: its tables and JSON, status and memory
in words, and its errors as one line on stderr."""

import json
import subprocess
import sys

import pytest
from state_rows import (
    BIG,
    DRIVER,
    MID,
    SMALL,
    SPILLED,
    W1,
    FakeTransport,
    objects,
    outside_a_session,
    status,
)

from shmray import _cli, _cli_text
from shmray.util import state


@pytest.fixture
def session(monkeypatch):
    return outside_a_session(monkeypatch)


def run(capsys, *argv):
    code = _cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_an_aligned_table_with_whole_ids(session, capsys):
    code, out, err = run(capsys, "list", "tasks")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["TASK_ID", "NAME", "STATE", "WORKER_PID", "ERROR_TYPE",
                                "WAITING_FOR"]
    assert len(lines) == 1 + 9
    state_column = lines[0].index("STATE")
    assert all(line[state_column - 2:state_column] == "  " for line in lines)  # aligned
    assert f"{3:048x}" in out  # ids whole: they are what filters and get_task take
    waiting = next(line for line in lines if "needs_gpu" in line)
    assert waiting.endswith("…") and len(waiting.split("  ")[-1].strip()) == 40  # cut


def test_list_json_is_what_the_api_returns(session, capsys):
    code, out, _ = run(capsys, "list", "actors", "--format", "json", "--limit", "2")
    assert code == 0
    assert json.loads(out) == state.list_actors(limit=2)
    code, out, _ = run(capsys, "list", "actors", "--format", "json", "--detail")
    assert json.loads(out) == state.list_actors(detail=True)


def test_list_filters_as_rays_command_line(session, capsys):
    code, out, _ = run(capsys, "list", "tasks", "--filter", "state=running",
                       "--filter", "type != actor_task", "--format", "json")
    assert code == 0 and [t["name"] for t in json.loads(out)] == ["square"]
    code, out, _ = run(capsys, "list", "workers", "--filter", "state=IDLE")
    assert code == 0 and len(out.splitlines()) == 2


def test_detail_prints_each_row_as_a_block(session, capsys):
    code, out, _ = run(capsys, "list", "tasks", "--detail", "--filter", "name=needs_gpu")
    assert code == 0
    assert "waiting_for" in out and "required_resources  CPU: 1" in out
    assert "creation_time_ms    2023-11-14" in out  # times read as clock times


def test_no_rows_say_so(session, capsys):
    assert run(capsys, "list", "tasks", "--filter", "name=nothing")[1] == "No tasks match.\n"


@pytest.mark.parametrize("argv, message", [
    (["list", "tasks", "--filter", "state"], "--filter 'state': write KEY=VALUE"),
    (["list", "tasks", "--filter", "colour=red"], "filter column 'colour' is not supported"),
    (["list", "workers", "--filter", "pid=many"], "pid many.*int type column"),
])
def test_a_bad_filter_is_one_line_on_stderr(session, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("shmray list: ")
    import re
    assert re.search(message, err)


def test_no_session_is_one_line_on_stderr(monkeypatch, capsys):
    outside_a_session(monkeypatch, FakeTransport(
        error=LookupError("no shmray session of yours is running")))
    code, out, err = run(capsys, "status")
    assert (code, out) == (1, "")
    assert err == "shmray status: no shmray session of yours is running\n"


def test_session_names_the_session_asked(session, capsys):
    run(capsys, "summary", "actors", "--session", "session_other")
    run(capsys, "status")
    assert [named for _, named in session.asked] == ["session_other", None]


def test_usage_errors_exit_with_2(session, capsys):
    with pytest.raises(SystemExit) as exited:
        _cli.main(["list", "jobs"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        _cli.main(["memory", "--limit", "-1"])


def test_status_in_words(session, capsys):
    code, out, _ = run(capsys, "status")
    assert code == 0
    assert f"Session session_test  (driver pid {DRIVER}, scheduler pid 999" in out
    assert "  CPU     1.5 / 2" in out and "memory  0 B / 8.0 GiB" in out
    assert "Workers  3: 2 busy, 1 idle, 0 leased to the driver, 0 blocked in get" in out
    assert "Actors   1 PENDING_CREATION, 1 ALIVE, 1 DEAD" in out
    assert "Store    9.0 MiB of 150.0 MiB used (6%), 2 objects; 4.0 MiB spilled (1 objects)" \
        in out
    assert "Tasks    1 PENDING_NODE_ASSIGNMENT, 2 RUNNING, 5 FINISHED, 1 FAILED" in out
    assert "  1  1 task needs a GPU and the session has none" in out
    assert "Stuck: 1 task(s) will not run unless you act" in out
    assert f"  needs_gpu (task {5:048x}): needs {{'GPU': 1.0}}" in out
    code, out, _ = run(capsys, "status", "--format", "json")
    assert json.loads(out) == status()


def test_memory_counts_each_object_once_biggest_first(session, capsys):
    code, out, _ = run(capsys, "memory")
    assert code == 0
    assert out.startswith("4 objects held\n")
    ids = [line.split()[0] for line in out.splitlines() if len(line.split("  ")[0]) == 56]
    assert ids == [BIG, SPILLED, MID, SMALL]
    big = next(line for line in out.splitlines() if line.startswith(BIG))
    assert "8.0 MiB" in big and "arena, pinned" in big
    assert f"driver {DRIVER} (LOCAL_REFERENCE), worker {W1} (PINNED_IN_MEMORY)" in big
    assert "In the store    9.0 MiB in 2 objects; the store has 9.0 MiB of 150.0 MiB" in out
    assert "(4.0 KiB of the store's use is in no object listed" in out
    assert "Spilled         4.0 MiB in 1 objects; the store counts 4.0 MiB in 1" in out
    assert "Inline          100 B in 1 objects" in out
    code, out, _ = run(capsys, "memory", "--limit", "1")
    assert "4 objects held, the 1 biggest shown" in out and SPILLED not in out


def test_memory_json_totals_add_up(session, capsys):
    code, out, _ = run(capsys, "memory", "--format", "json")
    report = json.loads(out)
    arena = report["totals"]["arena"]
    assert arena == {"objects": 2, "bytes": (8 << 20) + (1 << 20)}
    assert sum(o["object_size"] for o in report["objects"] if o["where"] == "arena") \
        == arena["bytes"]
    assert report["store"] == status()["store"]
    assert len(report["objects"]) == len({o["object_id"] for o in objects()})


def test_summary_tables(session, capsys):
    code, out, _ = run(capsys, "summary", "tasks")
    assert code == 0
    assert out.startswith("6 tasks, 2 actor calls, 1 actors created\n")
    assert "FUNC_OR_CLASS_NAME" in out
    assert "square              NORMAL_TASK          2 RUNNING" not in out
    line = next(line for line in out.splitlines() if line.startswith("square"))
    assert line.split("  ")[-1].strip() == "1 RUNNING, 2 FINISHED"
    code, out, _ = run(capsys, "summary", "objects")
    assert "5 object references, 21.0 MiB" in out and "disabled" in out
    code, out, _ = run(capsys, "summary", "actors", "--format", "json")
    assert json.loads(out) == state.summarize_actors()


def test_timeline_writes_the_trace(session, capsys, tmp_path):
    path = tmp_path / "trace.json"
    code, out, _ = run(capsys, "timeline", "-o", str(path))
    assert code == 0 and "9 events on 4 lanes written to" in out
    events = json.loads(path.read_text())
    assert sum(e["ph"] == "X" for e in events) == 9
    assert session.asked == [({"what": "tasks", "with_transfers": True}, None)]
    code, out, _ = run(capsys, "timeline")
    printed = json.loads(out)
    assert [(e["name"], e.get("ts")) for e in printed] == [(e["name"], e.get("ts"))
                                                           for e in events]


def test_sessions(monkeypatch, capsys):
    outside_a_session(monkeypatch)
    code, out, _ = run(capsys, "sessions")
    assert out.splitlines()[0].split() == ["SESSION_NAME", "DRIVER_PID"]
    assert out.splitlines()[1].split() == ["session_test", str(DRIVER)]
    outside_a_session(monkeypatch, FakeTransport(sessions=[]))
    assert run(capsys, "sessions")[1] == "No shmray session of yours is running.\n"


def test_values_read_for_people():
    assert _cli_text.size(512) == "512 B" and _cli_text.size(1536) == "1.5 KiB"
    assert _cli_text.size(3 << 30) == "3.0 GiB" and _cli_text.size(None) == "?"
    assert _cli_text.cell("required_resources", {"CPU": 1.0, "GPU": 0.5}) == "CPU: 1, GPU: 0.5"
    assert _cli_text.cell("error_message", "line one\n  line two") == "line one line two"
    assert _cli_text.cell("name", None) == "-"


def test_python_dash_m_shmray_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "shmray", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for command in ("status", "memory", "list", "summary", "timeline", "sessions"):
        assert command in done.stdout
