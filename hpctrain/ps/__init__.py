"""Hybrid mode: parameter-server ranks and worker groups with bounded staleness (SSP).

    roles       world split into S servers and W workers in G groups
    protocol    message kinds (tags) and the int64 header
    server      the single-threaded server loop: clocked aggregation, SSP on reads
    client      PSClient, the worker's embedding store (``hpctrain.sparse.store``)
    dense       dense parameter slices on the servers (DPUSH / DPULL)
    checkpoint  checkpoints the servers write in the collective format; resuming
    delta       delta exports the servers write in the collective format (online runs)

The transport is ``hpctrain.comm.p2p``; docs/hybrid.md has the semantics.
"""
