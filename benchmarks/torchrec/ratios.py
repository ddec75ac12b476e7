"""hpctrain / TorchRec samples/s of the pairs compare.sh ran: one row per pair, the median per case.

Reads the manifest compare.sh writes (``pairs.tsv``: layout, dim, bag, pair, which side ran
first, the load average before the pair, and the two JSON files), divides hpctrain's
samples/s (of the median step, and over all timed steps) by TorchRec's, prints the pairs
and the median ratio of every case, and writes them as JSON.

    python benchmarks/torchrec/ratios.py bench-results/torchrec-compare/pairs.tsv \
        --json bench-results/torchrec-compare.json
"""
import argparse
import csv
import json
import os
import statistics
import sys
import time

from hpctrain.bench.common import print_table


def case_result(path, dim, bag):
    """``(the JSON document, its result of case (dim, bag))``."""
    with open(path) as f:
        doc = json.load(f)
    for r in doc["results"]:
        if int(r["dim"]) == dim and int(r["bag"]) == bag:
            return doc, r
    raise ValueError(f"{path}: no result for dim {dim}, bag {bag}")


def _rss_gb(r):
    rss = r.get("peak_rss_bytes") or []
    return max(rss) / 1e9 if rss else None


def _last10(r):
    losses = r.get("losses") or []
    return statistics.fmean(losses[-10:]) if losses else None


def side(r):
    """What a side's result contributes to a pair."""
    return {"samples_per_s": r["samples_per_s"],
            "samples_per_s_all_steps": r["samples_per_s_all_steps"],
            "median_step_s": r["median_step_s"], "threads": r.get("threads"),
            "global_batch": r["global_batch"], "steps": r["steps"], "warmup": r["warmup"],
            "first_loss": r.get("first_loss"), "last10_loss": _last10(r),
            "reader_cpu_ms_per_step": r.get("reader_cpu_ms_per_step"),
            "peak_rss_gb_per_process": _rss_gb(r)}


def read_pairs(manifest):
    base = os.path.dirname(os.path.abspath(manifest))
    pairs, docs = [], {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            dim, bag = int(row["dim"]), int(row["bag"])
            got = {}
            for name in ("hpctrain", "torchrec"):
                path = row[f"{name}_json"]
                if not os.path.exists(path) and os.path.exists(os.path.join(base, path)):
                    path = os.path.join(base, path)
                doc, r = case_result(path, dim, bag)
                docs.setdefault(name, doc)
                got[name] = side(r)
                if name == "torchrec":
                    got["torchrec_setup"] = {k: r.get(k) for k in (
                        "mode", "procs", "emb_optimizer", "batches", "init", "embedding",
                        "omp_wait_policy")}
            hp, tr = got["hpctrain"], got["torchrec"]
            if hp["global_batch"] != tr["global_batch"] or hp["steps"] != tr["steps"]:
                raise ValueError(f"pair {row}: global batch or steps differ: "
                                 f"{hp['global_batch']}/{hp['steps']} vs "
                                 f"{tr['global_batch']}/{tr['steps']}")
            pairs.append({
                "layout": row["layout"], "dim": dim, "bag": bag, "pair": int(row["pair"]),
                "first": row["first"], "load_before": row.get("load_before"),
                "hpctrain": hp, "torchrec": tr, "torchrec_setup": got["torchrec_setup"],
                "ratio": hp["samples_per_s"] / tr["samples_per_s"],
                "ratio_all_steps": hp["samples_per_s_all_steps"] / tr["samples_per_s_all_steps"],
            })
    return pairs, docs


def summarise(pairs):
    cases = {}
    for p in pairs:
        cases.setdefault((p["layout"], p["dim"], p["bag"]), []).append(p)
    out = []
    for (layout, dim, bag), ps in cases.items():
        out.append({
            "layout": layout, "dim": dim, "bag": bag, "pairs": len(ps),
            "ratios": [p["ratio"] for p in ps],
            "median_ratio": statistics.median(p["ratio"] for p in ps),
            "median_ratio_all_steps": statistics.median(p["ratio_all_steps"] for p in ps),
            "hpctrain_median_samples_per_s": statistics.median(
                p["hpctrain"]["samples_per_s"] for p in ps),
            "torchrec_median_samples_per_s": statistics.median(
                p["torchrec"]["samples_per_s"] for p in ps),
            "hpctrain_first_loss": ps[0]["hpctrain"]["first_loss"],
            "torchrec_first_loss": ps[0]["torchrec"]["first_loss"],
            "torchrec_embedding": ps[0]["torchrec_setup"]["embedding"],
            "torchrec_emb_optimizer": ps[0]["torchrec_setup"]["emb_optimizer"],
        })
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="pairs.tsv written by compare.sh")
    p.add_argument("--json", default="bench-results/torchrec-compare.json",
                   help="output JSON (default bench-results/torchrec-compare.json)")
    args = p.parse_args(argv)
    pairs, docs = read_pairs(args.manifest)
    if not pairs:
        print(f"ratios.py: no pairs in {args.manifest}", file=sys.stderr)
        return 1
    cases = summarise(pairs)
    print("# hpctrain / TorchRec samples/s per pair (samples/s of the median step; 'all': "
          "over all timed steps); first: which ran first; load: 1-min load before the pair")
    print_table(["layout", "dim", "bag", "pair", "first", "load", "hpctrain/s", "torchrec/s",
                 "ratio", "ratio all", "hp loss1", "tr loss1", "hp RSS GB", "tr RSS GB"],
                [[q["layout"], q["dim"], q["bag"], q["pair"], q["first"], q["load_before"],
                  q["hpctrain"]["samples_per_s"], q["torchrec"]["samples_per_s"], q["ratio"],
                  q["ratio_all_steps"], q["hpctrain"]["first_loss"], q["torchrec"]["first_loss"],
                  q["hpctrain"]["peak_rss_gb_per_process"],
                  q["torchrec"]["peak_rss_gb_per_process"]] for q in pairs])
    print("# median over the pairs of each case")
    print_table(["layout", "dim", "bag", "pairs", "median ratio", "median ratio all",
                 "hpctrain/s", "torchrec/s", "TorchRec emb. optimizer"],
                [[c["layout"], c["dim"], c["bag"], c["pairs"], c["median_ratio"],
                  c["median_ratio_all_steps"], c["hpctrain_median_samples_per_s"],
                  c["torchrec_median_samples_per_s"], c["torchrec_emb_optimizer"]]
                 for c in cases])
    if any(c["torchrec_emb_optimizer"] != "adagrad" for c in cases):
        print("# note: TorchRec ran row-wise Adagrad; hpctrain's configs run element-wise "
              "Adagrad, so those ratios compare different optimizers")
    doc = {"benchmark": "torchrec-compare", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "manifest": args.manifest,
           "versions": {k: d.get("versions") for k, d in docs.items()},
           "cases": cases, "pairs": pairs}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
