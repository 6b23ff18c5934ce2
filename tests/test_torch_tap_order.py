"""Tapped layers of a torch module (K-FAC's and K-BFGS's per-layer statistics) are matched to
their taps by the module's registration order, whatever order the forward pass calls them in:
a network whose output layer is registered first trains exactly as the same network registered
in call order (the reference, checked against curvlinops and ASDL elsewhere). A layer that the
forward pass does not call exactly once raises UnsupportedModelError."""

from __future__ import annotations

import warnings

import pytest

from secondorder.errors import UnsupportedModelError

torch = pytest.importorskip("torch")
nn = torch.nn

from secondorder.integrations.torch import Optimizer  # noqa: E402


class HeadFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)  # registered first, called last
        self.mid = nn.Conv2d(2, 4, 3)
        self.body = nn.Linear(6, 2 * 5 * 5)

    def forward(self, x):
        a = torch.tanh(self.body(x)).reshape(-1, 2, 5, 5)
        a = torch.tanh(self.mid(a)).mean(dim=(2, 3))
        return self.head(torch.cat([a, a, a, a], dim=1))


class CallOrder(HeadFirst):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.body = nn.Linear(6, 2 * 5 * 5)
        self.mid = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(16, 3)


def _copy(src: nn.Module, dst: nn.Module) -> nn.Module:
    dst.load_state_dict(src.state_dict())
    return dst


@pytest.mark.parametrize("method", ["kfac", "kbfgs"])
def test_registration_order_does_not_change_the_steps(method):
    torch.manual_seed(0)
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    first = HeadFirst().double()
    second = _copy(first, CallOrder().double())
    opts = [Optimizer(m, nn.CrossEntropyLoss(), method, lr=0.1) for m in (first, second)]
    for _ in range(4):
        losses = [float(opt.step((x, y))) for opt in opts]
        assert losses[0] == pytest.approx(losses[1], rel=1e-12, abs=0.0)
    for name, p in first.named_parameters():
        q = dict(second.named_parameters())[name]
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), name


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_layers_not_called_exactly_once_are_refused_by_name():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with pytest.raises(UnsupportedModelError, match=r"'inner' \(2 calls\)"):
        Optimizer(Reused(), nn.CrossEntropyLoss(), "kfac").step((x, y))

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0].mean(1))

    xs = torch.randn(8, 3, 4)
    with pytest.raises(UnsupportedModelError, match=r"'att.out_proj' \(0 calls\)"):
        Optimizer(Attention(), nn.CrossEntropyLoss(), "kfac").step((xs, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(Optimizer(Attention(), nn.CrossEntropyLoss(), "curveball")
                              .step((xs, y)))
