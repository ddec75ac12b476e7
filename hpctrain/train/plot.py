"""``hpctrain plot RUN``: PNG curves of a run from its JSON-lines metrics file.

RUN is the metrics file, a directory holding ``metrics.jsonl``, or the run's TOML config
(its ``[metrics] path``). Written next to the metrics file (or into ``--out``)::

    loss.png         training loss (the mean of each reported window) and eval logloss
    auc.png          eval AUC (and progressive AUC of online runs); only with evaluations
    throughput.png   samples/s of each reported window
    lr.png           the dense learning rate; only for runs with a [dense_optimizer] schedule

Needs matplotlib (the ``bench`` extra: ``pip install 'hpctrain[bench]'``).
"""
import argparse
import json
import os
import sys

INSTALL_HINT = "pip install 'hpctrain[bench]'"


def metrics_path(run):
    """The metrics file of ``run`` (a file, a directory holding metrics.jsonl, or a config).

    Raises:
        FileNotFoundError, ValueError: naming what is missing.
    """
    if os.path.isdir(run):
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run}: no metrics.jsonl in this directory")
        return path
    if run.endswith(".toml"):
        from hpctrain.config import load_config
        path = load_config(run).metrics.path
        if path is None:
            raise ValueError(f"{run}: the config sets no [metrics] path")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run}: its metrics file {path} does not exist")
        return path
    if not os.path.isfile(run):
        raise FileNotFoundError(f"{run}: no such file or directory")
    return run


def read_series(path):
    """``{name: ([steps], [values])}`` from a metrics file, each sorted by step: ``loss``,
    ``samples_per_s``, ``lr``, ``eval_<metric>`` and ``progressive_<metric>``."""
    series = {}

    def add(name, step, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            series.setdefault(name, {})[step] = float(value)

    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if not isinstance(step, int):
                continue
            for key in ("loss", "samples_per_s", "lr"):
                add(key, step, rec.get(key))
            for group in ("eval", "progressive"):
                for k, v in (rec.get(group) or {}).items():
                    add(f"{group}_{k}", step, v)
    return {name: ([s for s in sorted(v)], [v[s] for s in sorted(v)])
            for name, v in series.items()}


def plot_run(path, out_dir=None):
    """Write the PNG curves of metrics file ``path``; returns the paths written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    s = read_series(path)
    run = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    figures = [
        ("loss.png", "loss (binary cross-entropy)",
         [("loss", "train (window mean)"), ("eval_logloss", "eval logloss"),
          ("progressive_logloss", "progressive logloss")]),
        ("auc.png", "AUC", [("eval_auc", "eval"), ("progressive_auc", "progressive")]),
        ("throughput.png", "samples/s", [("samples_per_s", "training")]),
        ("lr.png", "dense learning rate", [("lr", "dense optimizer")]),
    ]
    written = []
    for name, ylabel, curves in figures:
        curves = [(k, label) for k, label in curves if k in s]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, label in curves:
            steps, values = s[k]
            few = len(steps) < 30
            ax.plot(steps, values, marker="o" if few or k.startswith("eval") else None,
                    markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{run}: {ylabel}")
        ax.grid(True, alpha=0.3)
        if len(curves) > 1:
            ax.legend()
        fig.tight_layout()
        out = os.path.join(out_dir, name)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None):
    """``hpctrain plot RUN [--out DIR]``."""
    p = argparse.ArgumentParser(prog="hpctrain plot",
                                description="PNG curves (loss, AUC, throughput, learning rate) "
                                            "from a run's metrics.jsonl.")
    p.add_argument("run", help="the metrics file, a directory holding metrics.jsonl, or the "
                               "run's TOML config")
    p.add_argument("--out", default=None,
                   help="directory for the PNG files (default: the metrics file's)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"hpctrain plot: error: plotting needs matplotlib: {INSTALL_HINT}",
              file=sys.stderr)
        return 1
    from hpctrain.errors import HpctrainError
    try:
        path = metrics_path(args.run)
        written = plot_run(path, args.out)
    except (OSError, ValueError, HpctrainError) as e:
        print(f"hpctrain plot: error: {e}", file=sys.stderr)
        return 1
    if not written:
        print(f"hpctrain plot: error: {path} holds no metrics records", file=sys.stderr)
        return 1
    for out in written:
        print(f"hpctrain plot: wrote {out}")
    return 0
