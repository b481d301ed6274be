"""The role machine's loop: roles run in turn, and the current one alone decides the
published role, the status, the control commands and what healthy means."""
import asyncio
import json
import logging

from remus.common import log
from remus.common.config import load
from remus.common.control import query, request
from remus.common.exitcodes import EXIT_STOOD_DOWN
from remus.common.node import Node
from remus.common.roles import Role, StoodDown
from remus.common.status import RoleName


def _config(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(f'[guest]\nname = "g"\nkernel = "k"\n'
                    f'[primary]\naddress = "127.0.0.1"\nstate_dir = "{tmp_path / "p"}"\n'
                    f'[backup]\naddress = "127.0.0.1:1"\nstate_dir = "{tmp_path / "b"}"\n'
                    '[tls]\ninsecure = true\n')
    (tmp_path / "p").mkdir()
    return load(path)


class Recording(Role):
    def __init__(self, name: RoleName, following, seen: list, command: str):
        self.name, self.following, self.seen, self.command = name, following, seen, command

    async def run(self, node):
        assert not getattr(self, "ran", False), f"{self.name} ran twice"
        self.ran = True
        # What a control client sees while this role runs.
        status = await asyncio.to_thread(query, node.state_dir)
        reply = await asyncio.to_thread(request, node.state_dir, self.command)
        self.seen.append((status["role"], reply, node._healthy()))
        return self.following

    def commands(self):
        return {self.command: lambda arg: {"ok": True, "by": self.name.value}}

    def healthy(self):
        return self.name is RoleName.ACTIVE


class FakeHeartbeat:
    def __init__(self):
        self.beats = []

    async def start(self):
        pass

    async def stop(self):
        pass

    def update(self, role, session, generation, epoch):
        self.beats.append(role)


def test_roles_run_in_turn_and_the_current_one_answers(tmp_path):
    seen = []
    third = Recording(RoleName.ACTIVE, 7, seen, "reprotect")
    first = Recording(RoleName.BACKUP, third, seen, "poke")
    node = Node(_config(tmp_path), "primary", roles=None)
    node.hb = FakeHeartbeat()
    assert asyncio.run(node.run(first)) == 7
    assert seen == [("backup", {"ok": True, "by": "backup"}, False),
                    ("active", {"ok": True, "by": "active"}, True)]
    assert node.hb.beats == ["backup", "active"], "each role published once, in order"


def test_a_role_does_not_answer_the_commands_of_another(tmp_path):
    seen = []

    class Asks(Recording):
        async def run(self, node):
            try:
                await asyncio.to_thread(request, node.state_dir, "reprotect")
            except RuntimeError as exc:
                seen.append(str(exc))
            return 0
    node = Node(_config(tmp_path), "primary", roles=None)
    assert asyncio.run(node.run(Asks(RoleName.PRIMARY, 0, seen, "drill"))) == 0
    assert seen and "reprotect" in seen[0] and "drill" in seen[0]


def test_stood_down_is_the_last_role(tmp_path, caplog):
    node = Node(_config(tmp_path), "primary", roles=None)
    with caplog.at_level(logging.ERROR):
        code = asyncio.run(node.run(StoodDown(3, {"node": "backup", "generation": 4},
                                              log.get("remus.test"))))
    assert code == EXIT_STOOD_DOWN
    assert "stood-down" in caplog.text and "holder_generation=4" in caplog.text


def test_status_is_typed_and_serialises_to_the_control_json(tmp_path):
    node = Node(_config(tmp_path), "backup", roles=None, generation=5)
    status = node.status()
    assert status.role is RoleName.BACKUP and status.generation == 5
    assert json.loads(json.dumps(status.to_dict()))["role"] == "backup"


def test_asyncio_error_reports_are_rate_limited(caplog):
    """accept() failing with EMFILE makes asyncio report once per attempt, each with a
    traceback: a flood of those must not bury the log."""
    from remus.common.node import _loop_error_logger

    report = _loop_error_logger()
    with caplog.at_level(logging.DEBUG):
        for _ in range(1000):
            report(None, {"message": "socket.accept() out of system resource",
                          "exception": OSError(24, "Too many open files")})
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 3 and "Too many open files" in lines[0].getMessage()
    assert "Traceback" not in caplog.text


def test_the_same_beat_is_handed_to_the_heartbeat_once(tmp_path):
    """Roles publish from loops (every 50-100 ms): only a change reaches the heartbeat."""
    class Publishes(Role):
        name = RoleName.BACKUP

        async def run(self, node):
            for epoch in (1, 1, 1, 2, 2):
                node.publish("s", epoch)
            return 0

    class Recording(FakeHeartbeat):
        def update(self, *beat):
            self.beats.append(beat)
    node = Node(_config(tmp_path), "backup", roles=None)
    node.hb = Recording()
    assert asyncio.run(node.run(Publishes())) == 0
    assert node.hb.beats == [("backup", "", 1, 0), ("backup", "s", 1, 1), ("backup", "s", 1, 2)]
