"""Entry point of a worker process: ``python -m engine.worker``.

The supervisor starts each worker with ``subprocess.Popen`` (never ``fork``
of a process holding threads and database connections), hands it the
shared segment, the eventfds and the listening socket with ``pass_fds``, and
describes them in the ``BATCHSCHEDULER_WORKER_SPEC`` environment variable (not
argv, so a DSN with a password does not show in ``ps``).

A worker names itself (``batchscheduler: flusher 0`` for lane 0, ``batchscheduler: ingest
0``), asks the kernel to SIGTERM it if the supervisor dies, maps the segment,
runs its role and exits 0 after a clean drain.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

import msgspec

from ipc.lifetime import signal_on_parent_death

WORKER_SPEC_ENV = "BATCHSCHEDULER_WORKER_SPEC"


class WorkerSpec(msgspec.Struct):
    role: str  # "flusher" | "ingest"
    index: int  # the flusher's lane, or the ingest's number
    segment_fd: int
    segment_size: int
    segment_map: list[int]  # SegmentMap.args()
    data_wake_fds: list[int]  # one per lane: an ingest signals lane l's after writing ring [i][l]
    release_wake_fds: list[int]
    listen_fd: int
    dsn: str
    options: dict
    supervisor_pid: int


def title(role: str, index: int) -> str:
    return f"batchscheduler: {role} {index}"


def main() -> int:
    spec = msgspec.json.decode(os.environ.pop(WORKER_SPEC_ENV), type=WorkerSpec)
    from setproctitle import setproctitle

    name = title(spec.role, spec.index)
    setproctitle(name)
    from engine.options import from_mapping

    options = from_mapping(spec.options, source="supervisor")
    from engine import logs

    logs.configure(options.log_level, options.log_format, name)
    signal_on_parent_death(signal.SIGTERM, spec.supervisor_pid)

    import gc

    from engine import handlers
    from ipc.control import Control, SegmentMap
    from ipc.shm import Segment
    from ipc.wakeup import Wakeup

    # Everything imported so far lives as long as the worker: move it out of
    # the collector's sight, so a full collection in the hot loop walks only
    # the objects made since (fewer multi-millisecond pauses in a 10 ms window).
    gc.freeze()
    segment = Segment.attach(spec.segment_fd, spec.segment_size)
    control = Control(segment.buf, SegmentMap(*spec.segment_map))
    data_wakes = [Wakeup(fd) for fd in spec.data_wake_fds]
    registry = handlers.load(options.handlers)
    try:
        if spec.role == "flusher":
            from engine.flusher import FlusherProcess
            from engine.planner import StatePlanner

            flusher = FlusherProcess(
                spec.index,
                control,
                data_wakes[spec.index],
                [Wakeup(fd) for fd in spec.release_wake_fds],
                spec.dsn,
                options,
                StatePlanner(registry) if options.apply_state else None,
            )
            try:
                flusher.run()
            finally:
                flusher.close()
        else:
            from engine import ingest

            listener = socket.socket(fileno=spec.listen_fd)
            listener.setblocking(False)
            ingest.run(
                spec.index,
                control,
                listener,
                data_wakes,
                Wakeup(spec.release_wake_fds[spec.index]),
                options,
                registry.schemas(),
            )
    finally:
        # Views into the segment held by reference cycles (an exception's
        # traceback frames) are freed before the unmap needs them gone.
        gc.collect()
        control.close()
        segment.close()
    logging.getLogger(__name__).info("%s exiting cleanly", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
