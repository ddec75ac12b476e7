"""Small synthetic configs shared by the trainer tests."""
import os

from hpctrain.config import loads_config

SMALL_DLRM = """
seed = 7
global_batch = 64
steps = {steps}
overlap = {overlap}

[model]
kind = "dlrm"
bottom = [16, 8]
top = [16, 1]

[[tables]]
name = "t_small"
features = ["C1", "C2"]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.1 }}

[[tables]]
name = "t_big"
features = ["C3", "C4"]
dim = 8
pooling = "mean"
optimizer = {{ kind = "{sparse_opt}", lr = 0.05 }}

[dense_optimizer]
kind = "adam"
lr = 0.01

[data]
format = "synthetic"
[data.train]
num_samples = 100000
[data.eval]
num_samples = 256
[data.synthetic]
features = ["C1", "C2", "C3", "C4"]
num_dense = 5
vocab = [50, 200, 5000, 5000]
bag_size = [1, 1, 3, 2]
bag_size_min = [1, 1, 0, 1]

[eval]
at_end = {eval_at_end}
{extra}
"""


def small_config(tmpdir=None, steps=8, overlap=False, sparse_opt="adam", eval_at_end=False,
                 checkpoint_every=None, extra=""):
    """A 4-feature synthetic DLRM run; with ``tmpdir``, checkpoints and metrics go there."""
    if tmpdir is not None:
        extra += f"""
[checkpoint]
directory = "{os.path.join(tmpdir, 'ckpt')}"
keep_last = 10
""" + (f"every_steps = {checkpoint_every}\n" if checkpoint_every else "") + f"""
[metrics]
path = "{os.path.join(tmpdir, 'metrics.jsonl')}"
every_steps = 2
"""
    text = SMALL_DLRM.format(steps=steps, overlap=str(overlap).lower(), sparse_opt=sparse_opt,
                             eval_at_end=str(eval_at_end).lower(), extra=extra)
    return loads_config(text, source="small_config.toml")
