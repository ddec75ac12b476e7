"""Dense side: layers with explicit forward/backward on NumPy or CuPy, CTR models,
one flat parameter/gradient buffer, dense optimizers, data-parallel synchronisation.

Public names::

    get_array_module, FlatParameters,
    Linear, ReLU, Sigmoid, Dropout, Concat, MLP,
    DotInteraction, FMInteraction, CrossLayer, CrossNet,
    DLRM, WideAndDeep, DeepFM,
    bce_with_logits, mse, make_optimizer, dense_state_dict, load_dense_state_dict,
    allreduce_gradients, BucketedAllreduce, broadcast_parameters, check_parameters_identical,
    EmbeddingTransfer
"""
from hpctrain.dense.backend import get_array_module, to_numpy
from hpctrain.dense.interactions import CrossLayer, CrossNet, DotInteraction, FMInteraction
from hpctrain.dense.layers import MLP, Concat, Dropout, Linear, ReLU, Sigmoid
from hpctrain.dense.loss import bce_with_logits, mse, sigmoid
from hpctrain.dense.models import DLRM, DeepFM, WideAndDeep
from hpctrain.dense.optim import (OPTIMIZERS, dense_state_dict, load_dense_state_dict,
                                  make_optimizer)
from hpctrain.dense.params import FlatParameters
from hpctrain.dense.parallel import (BucketedAllreduce, allreduce_gradients,
                                     broadcast_parameters, check_parameters_identical)
from hpctrain.dense.transfer import EmbeddingTransfer

__all__ = ["get_array_module", "to_numpy", "FlatParameters", "Linear", "ReLU", "Sigmoid",
           "Dropout", "Concat", "MLP", "DotInteraction", "FMInteraction", "CrossLayer",
           "CrossNet", "DLRM", "WideAndDeep", "DeepFM", "bce_with_logits", "mse", "sigmoid",
           "make_optimizer", "OPTIMIZERS", "dense_state_dict", "load_dense_state_dict",
           "allreduce_gradients", "BucketedAllreduce",
           "broadcast_parameters", "check_parameters_identical", "EmbeddingTransfer"]
