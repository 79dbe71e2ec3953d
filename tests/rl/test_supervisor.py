"""The supervisor of `posttrain rl run` with real child processes (stand-ins for run-api, the inference
server, the trainer and environments; see supervised_child.py): ordered starts with health waits, the run
ending when the trainer finishes, any part's failure stopping all, Ctrl-C / SIGTERM stopping all, processes
in sessions of their own included, and ports free afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest
from ports import free_port
from waiting import kill_process, wait_for

from posttrain.ports import port_in_use
from posttrain.rl.loop.supervisor import ChildSpec, Supervisor

CHILD = str(Path(__file__).with_name("supervised_child.py"))


def child(tmp_path: Path, name: str, *flags: str, port: int | None = None, **options) -> ChildSpec:
    command = [sys.executable, CHILD, "--pids", str(tmp_path / "pids"), *flags]
    health = None
    if port is not None:
        command += ["--port", str(port)]
        options.setdefault("ports", (("127.0.0.1", port),))
        health = lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200  # noqa: E731
    return ChildSpec(name, command, tmp_path / "logs" / f"{name}.log", health=health, **options)


def recorded_pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(tmp_path: Path, ports: list[int], expected_processes: int) -> None:
    pids = recorded_pids(tmp_path)
    assert len(pids) == expected_processes, pids
    assert [pid for pid in pids if alive(pid)] == []
    assert [port for port in ports if port_in_use("127.0.0.1", port)] == []


def test_run_completes_when_the_trainer_finishes_and_stops_every_other_part(tmp_path):
    api, server, orphan = free_port(), free_port(), free_port()
    lines: list[str] = []
    supervisor = Supervisor(
        [
            child(tmp_path, "api", port=api),
            # The server starts a process of its own in another session: it must go too.
            child(tmp_path, "inference", "--grandchild-port", str(orphan), port=server),
            child(tmp_path, "env", "--exit-after", "0", exit_zero="allowed"),  # done producing: not the end
            child(tmp_path, "trainer", "--exit-after", "1.5", exit_zero="ends_run"),
        ],
        report=lines.append, progress=lambda: f"{len(lines)} lines so far", progress_interval=0.1,
    )
    outcome = supervisor.run()
    assert (outcome.state, outcome.exit_code, outcome.message) == ("completed", 0, "trainer finished")
    # Each part waited for before the next started.
    assert [line.split()[0] for line in lines if " is ready (" in line] == ["api", "inference", "env", "trainer"]
    assert "env finished (exit 0)" in lines
    assert any(line.endswith("lines so far") for line in lines)
    assert [c.spec.name for c in supervisor.children] == ["api", "inference", "env", "trainer"]
    assert_nothing_left(tmp_path, [api, server, orphan], expected_processes=5)


def test_a_part_that_fails_stops_all_and_is_named_with_its_log(tmp_path):
    api, server = free_port(), free_port()
    supervisor = Supervisor(
        [
            child(tmp_path, "api", port=api),
            child(tmp_path, "inference", port=server),
            child(tmp_path, "trainer", "--say", "CUDA out of memory", "--exit-after", "0.5", "--exit-code", "3",
                  exit_zero="ends_run"),
        ],
        report=lambda _line: None,
    )
    outcome = supervisor.run()
    assert outcome.state == "failed" and outcome.exit_code == 1
    assert outcome.message.startswith("trainer exited with status 3")
    assert "CUDA out of memory" in outcome.message  # the tail of its log says why
    assert_nothing_left(tmp_path, [api, server], expected_processes=3)


def test_a_server_exiting_by_itself_is_a_failure_even_with_status_0(tmp_path):
    supervisor = Supervisor([child(tmp_path, "api", "--exit-after", "0.5", port=free_port()),
                             child(tmp_path, "trainer", exit_zero="ends_run")], report=lambda _line: None)
    outcome = supervisor.run()
    assert outcome.state == "failed" and outcome.message.startswith("api exited with status 0")


def test_a_part_that_never_gets_ready_times_out_and_a_part_dying_while_starting_is_reported(tmp_path):
    never = child(tmp_path, "inference", start_timeout=1.0)
    never.health = lambda: False
    outcome = Supervisor([child(tmp_path, "api", port=free_port()), never], report=lambda _line: None).run()
    assert outcome.state == "failed" and outcome.message.startswith("inference did not become ready within 1 s")

    dies = child(tmp_path, "env", "--say", "no such model", "--exit-after", "0", "--exit-code", "2")
    dies.health = lambda: False
    outcome = Supervisor([dies], report=lambda _line: None).run()
    assert outcome.message.startswith("env exited with status 2") and "no such model" in outcome.message
    assert [pid for pid in recorded_pids(tmp_path) if alive(pid)] == []


def test_a_busy_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        supervisor = Supervisor([child(tmp_path, "api", port=free_port()), child(tmp_path, "inference", port=port)],
                                report=lambda _line: None)
        outcome = supervisor.run()
    assert outcome.state == "failed"
    assert outcome.message == (f"inference: port {port} on 127.0.0.1 is already in use by another process; "
                               "stop it or choose another port")
    assert supervisor.children == [] and recorded_pids(tmp_path) == []


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(Exception, match="unique"):
        Supervisor([child(tmp_path, "env"), child(tmp_path, "env")])


DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from posttrain.rl.loop.supervisor import ChildSpec, Supervisor
    import httpx

    def health(port):
        return lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200

    children = []
    for c in json.loads(sys.argv[1]):
        children.append(ChildSpec(c["name"], c["command"], Path(c["log"]),
                                  health=health(c["port"]) if c.get("port") else None,
                                  ports=(("127.0.0.1", c["port"]),) if c.get("port") else (),
                                  exit_zero=c.get("exit_zero", "failure")))
    outcome = Supervisor(children, report=lambda line: print(line, flush=True), stop_grace=1.0).run()
    print("OUTCOME", outcome.state, outcome.message, flush=True)
    sys.exit(outcome.exit_code)
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_every_part_even_one_that_ignores_sigterm(tmp_path, signum):
    api, server, orphan = free_port(), free_port(), free_port()
    base = [sys.executable, CHILD, "--pids", str(tmp_path / "pids")]
    children = [
        {"name": "api", "command": [*base, "--port", str(api)], "port": api},
        {"name": "inference", "command": [*base, "--port", str(server), "--grandchild-port", str(orphan)],
         "port": server},
        # A trainer busy in a step that does not react to SIGTERM: killed after the grace period.
        {"name": "trainer", "command": [*base, "--ignore-sigterm"], "exit_zero": "ends_run"},
    ]
    for spec in children:
        spec["log"] = str(tmp_path / f"{spec['name']}.log")
    output = tmp_path / "driver.out"
    with open(output, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(children)], stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: "trainer is ready" in output.read_text(), timeout=60, what="every part ready")
        wait_for(lambda: len(recorded_pids(tmp_path)) == 4, timeout=30, what="the grandchild to start")
        driver.send_signal(signum)
        assert driver.wait(60) == 128 + signum
    finally:
        kill_process(driver)
    text = output.read_text()
    assert f"OUTCOME interrupted stopped by {signal.Signals(signum).name}" in text
    assert "trainer did not stop within 1 s: killing it" in text
    # Stopped in reverse start order.
    assert text.index("stopping trainer") < text.index("stopping inference") < text.index("stopping api")
    assert_nothing_left(tmp_path, [api, server, orphan], expected_processes=4)


def test_a_part_may_start_the_next_before_it_is_ready_and_both_are_awaited(tmp_path):
    """The trainer and the first environment load together; the environment itself waits for the trainer."""
    trainer = child(tmp_path, "trainer", "--exit-after", "2", exit_zero="ends_run", ready_before_next=False,
                    start_timeout=30)
    trainer.health = lambda: len(recorded_pids(tmp_path)) == 2  # ready only once the environment runs too
    env = child(tmp_path, "env", exit_zero="allowed")
    lines: list[str] = []
    outcome = Supervisor([trainer, env], report=lines.append).run()
    assert outcome.state == "completed"
    started_env = lines.index(next(line for line in lines if line.startswith("started env")))
    trainer_ready = lines.index(next(line for line in lines if line.startswith("trainer is ready")))
    assert started_env < trainer_ready
