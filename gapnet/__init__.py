"""gapnet: pooling layers for CNNs and the global-average-pooling classifier."""

__version__ = "0.1.0"
