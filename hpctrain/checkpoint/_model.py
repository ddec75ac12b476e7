"""The model a checkpoint was trained for, rebuilt from the config text it stores.

``export_model`` runs without the trainer, so the only description of the model
is ``state["config"]`` (the run's TOML). This is the one place where the
checkpoint package looks at models: it rebuilds the dense model and the table
specs from that text to compare names, shapes, dtypes and dims with the files.
"""


def expected_from_config(text, dense):
    """``(params tree, table dims, table exports)`` the stored config describes, or
    ``(None, None, None)``; the exports are of empty tables (their structure: slots, counters).

    Args:
        text: the config's TOML text (``state["config"]``), or None.
        dense: the checkpoint's dense tree; when the config does not fix the number of
            dense features (HDF5 data), it is inferred from the parameter that depends on it.

    Raises:
        HpctrainError: the stored config is not valid, or describes no buildable model.
    """
    if not isinstance(text, str):
        return None, None, None
    from hpctrain.config import loads_config
    from hpctrain.sparse.plan import make_table
    from hpctrain.train.build import build_model, table_specs

    cfg = loads_config(text, source="the config stored in the checkpoint")
    specs = table_specs(cfg)
    num_dense = cfg.data.num_dense()
    if num_dense is None:
        num_dense = _infer_num_dense(cfg, build_model, dense.get("params"))
    return (build_model(cfg, num_dense).state_dict(), {s.name: s.dim for s in specs},
            {s.name: make_table(s, 0).export() for s in specs})


def _infer_num_dense(cfg, build_model, params):
    """The number of dense features that makes the shape of a parameter depending on it
    match ``params`` (1 when none does: the comparison then names the mismatch)."""
    one, two = build_model(cfg, 1).state_dict(), build_model(cfg, 2).state_dict()
    if not isinstance(params, dict):
        return 1
    for name, a in one.items():
        b, got = two[name].shape, getattr(params.get(name), "shape", None)
        if a.shape == b or got is None or len(got) != len(b):
            continue
        axis = next(i for i, (x, y) in enumerate(zip(a.shape, b)) if x != y)
        slope = b[axis] - a.shape[axis]
        n, rem = divmod(got[axis] - a.shape[axis], slope)
        if rem == 0 and n >= 0:
            return 1 + n
    return 1

