"""dist_train: distributed training for tutorial-sized PyTorch models."""

__version__ = "0.1.0"
