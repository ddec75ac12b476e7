"""Alpha-beta cost model of a collective training step, fitted from the micro-benchmarks.

    python -m hpctrain.bench costmodel --results bench-results/scaling --interconnect ib_hdr

Three parts, each usable alone::

    model       the formulas: Link/Regimes (piecewise alpha-beta; ByNodes: one per node
                count), Network (allreduce,
                alltoallv inside a node and across nodes), Workload, ComputeRates, CostModel
    fit_links   Regimes of the intra-node collectives and the local copy, fitted from the
                one-node allreduce / alltoallv benchmark JSONs, and of the inter-node link
                from the multi-node ones at each node count (--net-fit)
    fit_rates   compute rates (dense, sparse, contention, reader load) from the dense,
                exchange and train benchmark JSONs, calibrated on the 1-rank train step
    report      the command: load results, fit, print predicted vs measured and the
                predicted scaling, write JSON
    hybrid      the hybrid step (parameter servers + worker groups): worker compute plus
                the pull round trip, the server's apply time and the staleness bound s,
                fitted from ``bench hybrid`` (``costmodel --hybrid JSON``)

The formulas, what is fitted from what, and the assumptions are in docs/scaling.md.
"""
from hpctrain.bench.costmodel.fit_links import (collective_points, fit_alpha_beta,
                                                fit_net_links, fit_node_links, fit_regimes,
                                                net_points, oversubscribed, ranks_per_machine,
                                                relative_errors)
from hpctrain.bench.costmodel.fit_rates import (TRAIN_DATA_THREADS, dense_contention,
                                                dense_rate_and_points, exchange_comm,
                                                exchange_runs, fit_compute,
                                                sparse_rates_and_points, train_data_threads,
                                                train_rates_and_points, train_workload,
                                                unique_fraction)
from hpctrain.bench.costmodel.hybrid import (HybridRates, fit_hybrid, hybrid_points, hybrid_step,
                                             pull_rtt_over)
from hpctrain.bench.costmodel.model import (INTERCONNECTS, ByNodes, ComputeRates, CostModel,
                                            Link, Network, Regimes, Workload, allreduce_terms,
                                            alltoallv_net_terms, alltoallv_terms, copy_cost,
                                            sparse_exchange_bytes, sparse_exchange_time)
from hpctrain.bench.costmodel.report import load_results, main, parse_args, parse_net_regimes

__all__ = [
    "INTERCONNECTS", "TRAIN_DATA_THREADS", "ByNodes", "ComputeRates", "CostModel", "HybridRates", "Link",
    "Network", "fit_hybrid", "hybrid_points", "hybrid_step", "pull_rtt_over",
    "Regimes", "Workload", "allreduce_terms", "alltoallv_net_terms", "alltoallv_terms",
    "collective_points", "copy_cost", "dense_contention", "dense_rate_and_points",
    "exchange_comm",
    "exchange_runs", "fit_alpha_beta", "fit_compute", "fit_net_links", "fit_node_links",
    "fit_regimes", "load_results", "main", "net_points", "oversubscribed", "parse_args",
    "parse_net_regimes", "ranks_per_machine", "relative_errors", "sparse_exchange_bytes",
    "sparse_exchange_time", "sparse_rates_and_points", "train_data_threads",
    "train_rates_and_points", "train_workload", "unique_fraction",
]
