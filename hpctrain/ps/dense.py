"""Dense parameters on the servers: contiguous slices of the flat buffer, one per server.

The model's flat parameter buffer (``FlatParameters.data``, N floats) is cut into S
contiguous ranges, server i owning ``[i N / S, (i + 1) N / S)`` and the optimizer
state of that range. The dense optimizers are elementwise, so running one on a
slice gives the same bits as running it on the whole buffer::

    group g:  group allreduce of the gradient (as the collective trainer does)
              leader ── DPUSH(c, slice i of the gradient) ──> server i
    server i: sum the G group slices in group order ─> optimizer step on the slice
              leader <── DROWS(slice i of the parameters) ── server i  (DPULL(c + 1))
    group g:  leader assembles the slices, broadcasts them in its group
"""
import time

import numpy as np

from hpctrain.ps import protocol as P


def slice_bounds(size, servers):
    """List of ``(lo, hi)``: server i's range of a flat buffer of ``size`` elements."""
    return [(i * size // servers, (i + 1) * size // servers) for i in range(servers)]


class FlatSlice:
    """The part of ``FlatParameters`` a dense optimizer touches (``data``, ``grad``, ``xp``)."""

    def __init__(self, data):
        self.xp = np
        self.data = np.array(data, dtype=np.float32)
        self.dtype = self.data.dtype
        self.grad = np.zeros_like(self.data)


class DenseShard:
    """Server side: one slice of the dense parameters and its optimizer.

    Args:
        make_optimizer: callable ``params -> Optimizer`` (``hpctrain.dense.optim``),
            given a ``FlatSlice``.
    """

    def __init__(self, make_optimizer):
        self._make_optimizer = make_optimizer
        self.params = None
        self.opt = None

    @property
    def ready(self):
        return self.params is not None

    def init(self, values):
        """Take the initial values of this slice (DINIT)."""
        self.params = FlatSlice(values)
        self.opt = self._make_optimizer(self.params)

    def restore(self, values, slots, step):
        """Take this slice's values and optimizer state from a checkpoint (RESTORE).

        Args:
            values: the slice of the parameters.
            slots: optimizer slot name -> the slice of that slot (every slot of the
                optimizer, each as long as ``values``).
            step: the optimizer's step count.
        """
        from hpctrain.errors import CheckpointError
        self.init(values)
        want = set(self.opt.state)
        if set(slots) != want:
            raise CheckpointError(f"dense optimizer slots {sorted(slots)} from the checkpoint, "
                                  f"the servers' {self.opt.kind} optimizer has {sorted(want)}")
        for name, buf in slots.items():
            if buf.shape != self.opt.state[name].shape:
                raise CheckpointError(f"dense optimizer slot {name!r}: {buf.shape[0]} values for "
                                      f"a slice of {self.params.data.shape[0]}")
            self.opt.state[name][...] = buf
        self.opt.step_count = int(step)

    def apply(self, group_grads, clock=None):
        """Sum the groups' gradient slices in group order, then one optimizer step (at the
        learning rate of ``clock`` when the optimizer has a schedule)."""
        g = self.params.grad
        g[...] = group_grads[0]
        for other in group_grads[1:]:
            g += other
        self.opt.step(clock)


class DenseClient:
    """Worker side: push gradient slices, pull parameter slices (group leaders talk).

    Args:
        p2p: the ``PointToPoint`` transport over the world.
        servers: world ranks of the servers.
        group_comm: the worker's group communicator (parameters are broadcast in it).
        leader: whether this worker is its group's leader.
        worker, group: this worker's index and group.
        size: elements of the flat dense buffer.
        timeout: ``ps.timeout_s`` (waits last ``protocol.WORKER_WAIT`` times that).
    """

    def __init__(self, p2p, servers, group_comm, leader, worker, group, size, timeout):
        self.p2p, self.servers, self.group_comm = p2p, list(servers), group_comm
        self.leader, self.worker, self.group = leader, worker, group
        self.bounds = slice_bounds(size, len(servers))
        self.timeout = timeout * P.WORKER_WAIT
        self.sends = []
        self.wait_s = 0.0
        self.staleness = []

    def init_servers(self, data):
        """Send every server its slice of the initial parameters (worker 0 only)."""
        for k, (lo, hi) in zip(self.servers, self.bounds):
            self.sends.append(self.p2p.send(k, P.DINIT, P.header(0, self.worker, self.group),
                                            [data[lo:hi]]))

    def push(self, clock, grad):
        """Leader: send each server its slice of the group's (reduced) gradient."""
        if not self.leader:
            return
        h = P.header(clock, self.worker, self.group)
        for k, (lo, hi) in zip(self.servers, self.bounds):
            self.sends.append(self.p2p.send(k, P.DPUSH, h, [grad[lo:hi]]))
        self.sends = [s for s in self.sends if not s.test()]

    def start_pull(self, clock, fresh=False):
        """Leader: ask every server for its slice of the parameters to use at ``clock``.

        With ``fresh`` the servers answer once every clock up to ``clock`` is applied
        (evaluation), else under the staleness bound (training).
        """
        if not self.leader:
            return
        h = P.header(clock, self.worker, self.group, aux=P.FRESH if fresh else 0)
        for k in self.servers:
            self.sends.append(self.p2p.send(k, P.DPULL, h))

    def wait_pull(self, clock, out, fresh=False):
        """Fill ``out`` with the parameters for ``clock`` (leader receives, group broadcast)."""
        if self.leader:
            t0 = time.perf_counter()
            oldest = None
            for k, (lo, hi) in zip(self.servers, self.bounds):
                msg = self.p2p.recv(k, P.DROWS, self.timeout,
                                    what=f"the dense parameters of clock {clock} (DPULL sent "
                                         f"by worker {self.worker})",
                                    idle=self._progress)
                got = int(msg.header[P.H_CLOCK])
                if got != clock:
                    raise RuntimeError(f"worker {self.worker}: server rank {k} answered DPULL "
                                       f"of clock {got}, expected {clock}")
                out[lo:hi] = msg.arrays[0]
                applied = int(msg.header[P.H_AUX])
                oldest = applied if oldest is None else min(oldest, applied)
            if not fresh:
                self.staleness.append(clock - 1 - oldest)
            self.wait_s += time.perf_counter() - t0
        if self.group_comm.size > 1:
            self.group_comm.bcast(out, root=0)
        return out

    def _progress(self):
        self.sends = [s for s in self.sends if not s.test()]

    def finish(self):
        """Complete every outstanding send."""
        for s in self.sends:
            s.wait()
        self.sends = []
