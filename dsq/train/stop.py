"""Stopping a run at a step boundary: the signals that ask for it (SLURM's warning before a time
limit or preemption, SIGTERM, Ctrl-C), the agreement of all ranks on it, and the exception and
exit code that follow the checkpoint it triggers."""

from __future__ import annotations

import signal

from dsq.parallel import all_reduce_max

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written on a stop signal; resubmit to resume


class Preempted(Exception):
    """Raised after the checkpoint requested by a stop signal has been written on all ranks."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint written, rerun the same command to resume")
        self.step, self.signum = step, signum


class StopRequest:
    """SIGUSR1 (SLURM's warning before a time limit or preemption), SIGTERM and SIGINT (Ctrl-C)
    set a flag; all ranks agree on it at the next step boundary with one tiny all-reduce.
    SIGINT wins over the others (Ctrl-C under a launcher that then also sends SIGTERM), so
    ``dsq train`` exits 130 after its checkpoint."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum != signal.SIGINT:
            self.signum = signum

    def agreed(self) -> int:
        code = 1000 if self.signum == signal.SIGINT else self.signum  # SIGINT wins
        code = int(all_reduce_max(code))
        return int(signal.SIGINT) if code == 1000 else code

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
