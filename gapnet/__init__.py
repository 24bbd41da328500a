"""gapnet: pooling layers for CNNs and the global-average-pooling classifier.

`gapnet.reference` is the NumPy specification of every op, `gapnet.functional` the fast PyTorch
ops, `gapnet.nn` the modules. Optional parts (Triton kernels, data sets, reports) load lazily.
"""

from gapnet import functional, nn
from gapnet.functional import (
    adaptive_avg_pool2d,
    adaptive_max_pool2d,
    avg_pool2d,
    gap_linear,
    global_avg_pool2d,
    global_max_pool2d,
    global_pool2d,
    max_pool2d,
    set_backend,
    use_backend,
)
from gapnet.nn import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    ClassifierHead,
    GeM,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    GlobalPool2d,
    MaxPool2d,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "ClassifierHead",
    "GeM",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "GlobalPool2d",
    "MaxPool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "avg_pool2d",
    "functional",
    "gap_linear",
    "global_avg_pool2d",
    "global_max_pool2d",
    "global_pool2d",
    "max_pool2d",
    "nn",
    "set_backend",
    "use_backend",
]
