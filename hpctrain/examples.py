"""``hpctrain configs [NAME] [-o DEST]``: the example configs installed with hpctrain.

They are package data (``hpctrain/configs/*.toml``), wherever pip put the package:
``hpctrain configs`` lists them and their folder, ``hpctrain configs NAME`` prints one,
``hpctrain configs NAME -o DEST`` copies it to a file or folder, to edit and train from.
In a config, relative data paths are relative to the config file, and outputs
(checkpoints, metrics) to the working directory of the run (docs/configuration.md).
"""
import argparse
import glob
import os
import shutil
import sys
from importlib import resources

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def folder():
    """The folder of the installed example configs."""
    return str(resources.files("hpctrain") / "configs")


def names():
    """The example configs' names (file names without ``.toml``), sorted."""
    return sorted(n[:-5] for n in os.listdir(folder()) if n.endswith(".toml"))


def path(name):
    """Path of the example config ``name`` (with or without ``.toml``); KeyError if none."""
    stem = name[:-5] if name.endswith(".toml") else name
    if stem not in names():
        raise KeyError(stem)
    return os.path.join(folder(), stem + ".toml")


def summary(name):
    """The first line of the config's leading comment ("" without one)."""
    with open(path(name), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("#").strip()
            if line.strip():
                break
    return ""


def unresolved_data_paths(config_path):
    """The relative data paths of the config at ``config_path`` that match no file when
    read relative to its folder (as hpctrain will read them)."""
    with open(config_path, "rb") as f:
        data = tomllib.load(f).get("data", {})
    base = os.path.dirname(os.path.abspath(config_path))
    out = []
    for split in ("train", "eval"):
        paths = data.get(split, {}).get("paths", [])
        for p in [paths] if isinstance(paths, str) else paths:
            p = os.path.expandvars(os.path.expanduser(p))
            if not os.path.isabs(p) and not glob.glob(os.path.join(base, p)):
                out.append(p)
    return list(dict.fromkeys(out))


def _copy(name, dest, force):
    src = path(name)
    if os.path.isdir(dest) or dest.endswith(os.sep):
        os.makedirs(dest, exist_ok=True)
        dest = os.path.join(dest, os.path.basename(src))
    if os.path.exists(dest) and not force:
        print(f"hpctrain configs: {dest} exists (--force overwrites it)", file=sys.stderr)
        return 1
    shutil.copyfile(src, dest)
    print(f"wrote {dest}")
    missing = unresolved_data_paths(dest)
    if missing:
        print(f"note: {dest} reads data from {', '.join(missing)} relative to its own folder, "
              f"where there is none: edit the paths of [data.train] and [data.eval]")
    return 0


def main(argv=None):
    """List, print or copy the example configs; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="hpctrain configs", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("name", nargs="?", help="the config to print (or copy with -o)")
    p.add_argument("-o", "--output", metavar="DEST",
                   help="copy the config to DEST (a file, or a folder to copy it into)")
    p.add_argument("--force", action="store_true", help="overwrite DEST when it exists")
    args = p.parse_args(argv)
    if args.name is None:
        if args.output:
            p.error("-o needs a config NAME")
        width = max(map(len, names()))
        print(f"example configs in {folder()}:")
        for n in names():
            print(f"  {n:<{width}}  {summary(n)}")
        print("print one: hpctrain configs NAME; copy it: hpctrain configs NAME -o DEST")
        return 0
    try:
        src = path(args.name)
    except KeyError:
        print(f"hpctrain configs: no example config {args.name!r}; there are: "
              f"{', '.join(names())}", file=sys.stderr)
        return 2
    if args.output:
        return _copy(args.name, args.output, args.force)
    with open(src, encoding="utf-8") as f:
        sys.stdout.write(f.read())
    return 0
