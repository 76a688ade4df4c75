"""Small synthetic datasets shared by the tests."""

import torch


def prototype_data(n: int, seed: int, shape=(1, 8, 8), classes: int = 10,
                   noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy copies of ``classes`` fixed Gaussian prototype images and their labels: a
    task the zoo's small models learn in a couple of epochs (the prototypes depend only on
    shape and classes, the draw on ``seed``)."""
    proto = torch.randn(classes, *shape, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return proto[y] + noise * torch.randn(n, *shape, generator=g), y
