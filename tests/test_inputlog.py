from remus.backup.inputlog import InputLog


def test_replay_keeps_what_came_after_the_last_commit():
    log = InputLog(1 << 20)
    log.add(0, [b"a"])
    log.add(1, [b"b", b"c"])
    log.add(2, [b"d"], nic=1)
    log.committed(1)  # input from before barrier 1 is inside checkpoint 1
    assert log.replay(1) == [(0, b"b"), (0, b"c"), (1, b"d")]
    log.committed(2)
    assert log.replay(2) == [(1, b"d")]
    assert log.held_bytes == 1


def test_cap_drops_new_input_and_counts_it():
    log = InputLog(3)
    log.add(0, [b"ab"])
    log.add(0, [b"cd"])
    assert log.replay(0) == [(0, b"ab")] and log.dropped_frames == 1
    log.clear()
    assert log.replay(0) == [] and log.held_bytes == 0
