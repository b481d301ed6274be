"""The heartbeat process: what the daemon spawns (child_main), from start-up to exit."""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time

from remus.common.heartbeat.outbox import LogForward, Outbox
from remus.common.heartbeat.runner import Runner
from remus.common.heartbeat.settings import LOGGER, HeartbeatConfig, HeartbeatError

_RT_PRIORITY = 10              # SCHED_RR: above every normal task (QEMU, the daemons), below kernel threads


def child_main(cfg: HeartbeatConfig, state: tuple, ctl, out, parent_pid: int, level: int) -> None:
    # The daemon handles Ctrl-C and stops us through the control pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Before any thread exists, so the outbox, ZAP and zmq I/O threads inherit it.
    sched = "normal"
    if cfg.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(_RT_PRIORITY))
            sched = f"rr:{_RT_PRIORITY}"
        except (OSError, AttributeError) as exc:
            sched = f"normal ({exc})"
    outbox = Outbox(out)
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [LogForward(outbox)]
    logger.setLevel(level)
    logger.propagate = False
    runner = Runner(cfg, state, ctl, outbox, parent_pid)
    code = 0
    try:
        try:
            runner.setup()
        except HeartbeatError as exc:
            outbox.put(("error", str(exc)))
            code = 1
            return
        except Exception as exc:
            outbox.put(("error", f"heartbeat set-up failed: {type(exc).__name__}: {exc}"))
            code = 1
            return
        outbox.put(("ready", {"pid": os.getpid()}))
        runner.log("info", "heartbeat-started", links=len(cfg.links), interval_ms=cfg.interval_ms,
                   miss=cfg.miss, peer_node=cfg.peer_node, pid=os.getpid(), sched=sched)
        gc.collect()
        gc.freeze()      # nothing long-lived left for the collector to walk at each beat
        runner.run()
        runner.post_status(time.monotonic())
        runner.log("info", "heartbeat-stopped", beats=runner.seq)
    finally:
        runner.close()
        outbox.close()
        ctl.close()
        out.close()
        sys.exit(code)
