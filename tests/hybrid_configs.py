"""Configs and helpers shared by the hybrid-mode tests."""
from hpctrain.config import loads_config
from trainer_configs import SMALL_DLRM

PLANTED = """
seed = {seed}
global_batch = 256
steps = {steps}
threads = 1
{mode}

[model]
kind = "dlrm"
bottom = [16, 8]
top = [16, 1]

[[tables]]
name = "users"
features = ["C1", "C2", "C3"]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.05 }}

[[tables]]
name = "items"
features = ["C4", "C5", "C6"]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.05 }}

[dense_optimizer]
kind = "adagrad"
lr = 0.01

[data]
format = "synthetic"

[data.synthetic]
num_features = 6
num_dense = 4
vocab = 500
zipf = 1.05
bag_size = 1
positive_rate = 0.3
signal = 3.0

[data.train]
num_samples = 1000000

[data.eval]
num_samples = 4096

[eval]
at_end = true
{extra}
"""


def ps_section(servers=1, groups=1, consistency="bsp", staleness=0, dense_on_servers=True,
               timeout_s=60):
    st = "" if consistency == "asp" else f"staleness = {staleness}\n"
    return (f"\n[ps]\nservers = {servers}\ngroups = {groups}\nconsistency = \"{consistency}\"\n"
            f"{st}dense_on_servers = {str(dense_on_servers).lower()}\ntimeout_s = {timeout_s}\n")


def small(mode="collective", steps=6, sparse_opt="adam", **ps):
    """The trainer tests' small DLRM, collective or hybrid (``ps``: ``ps_section`` args)."""
    text = SMALL_DLRM.format(steps=steps, overlap="false", sparse_opt=sparse_opt,
                             eval_at_end="true", extra=ps_section(**ps) if mode == "hybrid"
                             else "")
    if mode == "hybrid":
        text = 'mode = "hybrid"\n' + text
    return loads_config(text, source="small_hybrid.toml")


def planted(mode="collective", steps=60, seed=0, **ps):
    """A synthetic planted-model DLRM that learns in a few dozen steps."""
    text = PLANTED.format(seed=seed, steps=steps,
                          mode='mode = "hybrid"' if mode == "hybrid" else "",
                          extra=ps_section(**ps) if mode == "hybrid" else "")
    return loads_config(text, source="planted_hybrid.toml")
