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

    class Direct(nn.Module):  # a Linear whose weight is applied without calling the layer
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(nn.functional.linear(x, self.proj.weight, self.proj.bias))

    with pytest.raises(UnsupportedModelError, match=r"'proj' \(0 calls\)"):
        Optimizer(Direct(), nn.CrossEntropyLoss(), "kfac").step((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(Optimizer(Direct(), nn.CrossEntropyLoss(), "curveball")
                              .step((x, y)))


class Padded(nn.Module):
    """A convolution with its own padding (a mode, or "same" with an even kernel)."""

    def __init__(self, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, **conv)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


class PaddedByHand(Padded):
    """The same layer with the padding done by F.pad before an unpadded convolution."""

    def __init__(self, pad, mode, **conv) -> None:
        super().__init__(**conv)
        self.pad, self.mode = pad, mode

    def forward(self, x):
        a = torch.nn.functional.pad(x, self.pad, self.mode)
        return self.head(torch.tanh(self.conv(a)).mean(dim=(2, 3)))


@pytest.mark.parametrize(("conv", "pad", "mode"), [
    ({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, (1, 1, 1, 1), "reflect"),
    ({"kernel_size": 3, "padding": (2, 1), "padding_mode": "circular"}, (1, 1, 2, 2),
     "circular"),
    ({"kernel_size": 4, "padding": "same"}, (1, 2, 1, 2), "constant"),
])
def test_padded_convolutions_tap_the_patches_the_layer_sees(conv, pad, mode):
    """K-FAC's input statistics come from the padded patches: a layer that pads itself (a
    padding mode, or asymmetric "same") steps exactly as the same layer fed a tensor padded by
    hand, float64, to 1e-12."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    own = Padded(**conv).double()
    by_hand = _copy(own, PaddedByHand(pad, mode, kernel_size=conv["kernel_size"]).double())
    opts = [Optimizer(m, nn.CrossEntropyLoss(), "kfac", lr=0.1) for m in (own, by_hand)]
    for _ in range(3):
        losses = [float(opt.step((x, y))) for opt in opts]
        assert losses[0] == pytest.approx(losses[1], rel=1e-12, abs=0.0)
    for (name, p), q in zip(own.named_parameters(), by_hand.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), name


def test_grouped_convolutions_are_left_untapped():
    """A grouped (here depthwise) convolution is not a Kronecker block: from_torch leaves it
    out of the tapped layers and K-FAC steps with the others."""
    from secondorder.models import from_torch

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    apply, _ = from_torch(model)
    assert [layer.kind for layer in apply.layers] == ["conv", "dense"]
    x, y = torch.randn(8, 4, 6, 6), torch.randint(0, 3, (8,))
    opt = Optimizer(model, nn.CrossEntropyLoss(), "kfac", lr=0.1)
    losses = [float(opt.step((x, y))) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
