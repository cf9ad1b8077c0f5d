"""Launching a command in N local processes through torchrun (single node; docs/distributed.md for clusters).

`cpmctl pretrain --nproc N ...` re-runs itself as `python -m torch.distributed.run --standalone
--nproc_per_node=N -m cpmctl pretrain ...` and waits. Ctrl-C in a terminal reaches every process of the group:
the workers save a checkpoint and stop, torchrun follows, and this process only waits. A SIGTERM sent to this
process alone is passed on to torchrun.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from cpmctl import CpmctlError

EXIT_INTERRUPTED = 130


def run_under_torchrun(nproc: int, command: str, args: list[str]) -> int:
    """Run `cpmctl COMMAND ARGS` in `nproc` processes; the exit code (130 when interrupted)."""
    if nproc < 1:
        raise CpmctlError(f"--nproc must be at least 1, got {nproc}")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cpmctl", *command.split(), *args]
    child = subprocess.Popen(argv)
    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        if signum == signal.SIGTERM:
            child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_INTERRUPTED if interrupted else code
