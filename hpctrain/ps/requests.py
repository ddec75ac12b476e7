"""What a server does besides applying clocks: worker 0's checkpoint and delta requests,
and stop signals (``Server`` mixin, see ``hpctrain.ps.server``).

A CKPT or DELTA of clock K is acted on once K is applied and before K + 1 (the BSP state
of K, no extra round), in the order the requests arrived, which is the same on every
server, so the servers' collective writes match. A stop signal on any server goes to
server 0, which settles the stop clock and announces it in every reply.
"""
import signal
import time

from hpctrain.errors import CheckpointError, CommError
from hpctrain.ps import protocol as P


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Requests:
    """Checkpoint and delta requests, stop signals."""

    def _on_ckpt(self, msg):
        if self.checkpoints is None:
            raise CheckpointError(f"server {self.index}: CKPT of clock "
                                  f"{int(msg.header[P.H_CLOCK])} from rank {msg.source} but this "
                                  f"server has no [checkpoint] section")
        self._request(msg)

    def _on_delta(self, msg):
        if self.online is None:
            raise CheckpointError(f"server {self.index}: DELTA of clock "
                                  f"{int(msg.header[P.H_CLOCK])} from rank {msg.source} but this "
                                  f"server has no [online] section")
        self._request(msg)

    def _request(self, msg):
        """Worker 0's CKPT or DELTA of a clock: acted on once that clock is applied."""
        clock, kind = int(msg.header[P.H_CLOCK]), P.NAMES[msg.tag]
        if clock < self.applied:
            raise CommError(f"server {self.index}: {kind} of clock {clock} from rank "
                            f"{msg.source} arrived after clock {self.applied} was applied "
                            f"(worker 0 must ask before it pushes the next clock)")
        pending = self._requests.setdefault(clock, [])
        if any(m.tag == msg.tag for m in pending):
            raise CommError(f"server {self.index}: a second {kind} of clock {clock} from rank "
                            f"{msg.source}")
        pending.append(msg)
        self._requests_due()

    def _requests_due(self):
        """Write the checkpoint and/or delta of ``applied`` that worker 0 asked for, in the
        order the requests arrived (the same on every server: the servers' collectives
        match)."""
        for msg in self._requests.pop(self.applied, ()):
            if msg.tag == P.CKPT:
                from hpctrain.ps.checkpoint import save_server
                self.checkpoints_written.append(save_server(self, msg))
            else:
                from hpctrain.ps.delta import write_server_delta
                path, rows, gone, secs = write_server_delta(self, msg)
                self.deltas_written.append((path, rows, gone, secs))
                self._metrics_record({"server": self.index, "delta": self.applied,
                                      "rows": rows, "tombstones": gone,
                                      "seconds": round(secs, 6), "time": time.time()})

    def _on_stop(self, msg):
        if self.index != 0:
            raise CommError(f"server {self.index}: STOP from rank {msg.source}; only server 0 "
                            f"decides where the job stops")
        who = (f"worker {int(msg.header[P.H_WORKER])}" if msg.header[P.H_WORKER] >= 0
               else f"rank {msg.source}")
        self._decide_stop(f"{_signal_name(int(msg.header[P.H_AUX]))} on {who}")

    def _signalled(self):
        """A stop signal arrived on this server: decide (server 0) or tell server 0."""
        self._stop_sent = True
        if self.index == 0:
            self._decide_stop(f"{self.watcher.reason} on server 0")
            return
        self._sends.append(self.p2p.send(self.roles.servers[0], P.STOP,
                                         P.header(self.applied, aux=int(self.watcher.signum))))

    def _decide_stop(self, reason):
        """Server 0: every worker stops after clock 1 + the highest clock answered so far.

        No worker can have started that clock: each needs this server's rows of it,
        and every reply from now on carries the decision.
        """
        if self.stop_clock:
            return
        self.stop_clock = max(self._answered, self.applied) + 1
        self._log.write(f"[ps server 0] stop signal ({reason}): every worker stops after clock "
                        f"{self.stop_clock}\n")
        self._log.flush()
