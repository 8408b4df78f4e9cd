"""Models for the exactness tests: randomness (dropout) and per-rank state (BatchNorm) are what the
tutorial MLP lacks, and what hid real bugs in resume and in DDP's view of one model."""

from torch import nn


class DropoutBatchNormNet(nn.Module):
    """Digits at 8x8: conv -> BatchNorm -> ReLU -> dropout -> linear. The conv has no bias: BatchNorm cancels
    it, so its gradient is rounding noise that Adam would amplify into differences between equal runs."""

    def __init__(self, width: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(p))
        self.head = nn.Linear(width * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class FailsInEvaluation(nn.Module):
    """The tutorial MLP's shape on 8x8 digits, whose evaluation raises (as a bad label in a test split would)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        if not self.training:
            raise ValueError("a bad label in the test split")
        return self.linear(x.flatten(1))
