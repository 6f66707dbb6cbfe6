"""The quantizer that owns a tensor's S and Z: when its observer records, what forward does, that
S and Z are state (buffers, or a parameter once learned), and a learned S trains."""
import pytest
import torch

from errors import IntsimError
from function import Grid, fake_quantize, scale_zero_point
from observer import make_observer
from quantizer import Quantizer


def quantizer(observer="minmax", bits=4):
    return Quantizer(Grid(bits), make_observer(observer, Grid(bits)), name="t")


def test_observes_only_when_asked_and_fake_quantizes_only_when_enabled():
    q = quantizer()
    x = torch.linspace(-1, 3, 101)
    assert torch.equal(q(x), x) and not q.observer.has_data()            # off: the identity, nothing seen
    with pytest.raises(IntsimError, match="calibrate"):
        q.qparams()
    q.observe = "always"
    q(x)
    q.finish()
    s, z = scale_zero_point(torch.tensor([-1.0]), torch.tensor([3.0]), Grid(4))
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)
    q.observe, q.enabled = "never", True
    assert torch.equal(q(x * 2), fake_quantize(x * 2, s, z, 0, 15))      # fixed range: 6 clips to 3
    q.observe = "training"
    q.eval()(x * 2)
    assert torch.equal(q.scale, s)                                        # eval: no recording
    q.train()(x * 2)
    assert not torch.equal(q.scale, s)                                    # training, enabled: S follows


def test_scale_and_zero_point_are_state_and_a_learned_scale_trains():
    q = quantizer()
    q.observe = "always"
    q(torch.randn(1000))
    q.finish()
    assert {"scale", "zero_point", "has_qparams", "observer.min_val"} <= set(q.state_dict())
    q.learn_scale()
    q.enabled, q.observe = True, "always"                                # a learned S ignores the observer
    s0 = q.scale.detach().clone()
    x = torch.randn(256) * 3
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    for _ in range(20):
        loss = (q(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert isinstance(q.scale, torch.nn.Parameter) and not torch.equal(q.scale.detach(), s0)
    assert "scale" in q.state_dict() and torch.equal(q.qparams()[0], q.scale.detach())
