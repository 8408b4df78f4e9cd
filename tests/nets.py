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


class DictBatchNet(nn.Module):
    """A model of a user's own shape: it takes the whole batch (a dict) and brings its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, batch):
        return self.body(batch["pixels"])

    def loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs, batch["label"], label_smoothing=0.1)


class _DigitDicts:
    def __init__(self, pixels, labels) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixels": self.pixels[index], "label": self.labels[index]}


def digits_as_dicts(data_cfg):
    """data.source=tests.nets:digits_as_dicts: scikit-learn's digits as {pixels, label} samples."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return _DigitDicts(pixels[:1400], labels[:1400]), _DigitDicts(pixels[1400:], labels[1400:])
