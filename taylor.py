"""The task loss as a function of one layer's weights, for the AdaRound paper's section 2.1:
its gradient g, Hessian-vector products H v (double backward; H is never formed) and the
terms of the Taylor expansion L(w + dw) - L(w) ~ g^T dw + 1/2 dw^T H dw."""
import torch
import torch.nn.functional as F
from torch.func import functional_call

from model import set_phase
from module import fold_bn


class LayerLoss:
    """The task loss as a function of one QLayer's BN-folded weight w (everything else float
    and fixed): L(w) = mean cross-entropy over `batches`. Holds the gradient at the float
    weights w0 and the per-batch gradient graphs, so that each H v costs one more backward."""

    def __init__(self, qmodel, name, batches, device):
        self.qmodel, self.device = qmodel, device
        layer = qmodel.get_submodule(name)
        self.key = f"{name}.layer.weight"
        w_raw = layer.layer.weight.detach()
        # w_folded = w_raw * factor per output channel (gamma / sigma with BN, else 1).
        self.factor = (fold_bn(torch.ones_like(w_raw), None, layer.bn)[0].detach()
                       if layer.bn is not None else torch.ones_like(w_raw))
        self.w0 = (w_raw * self.factor).clone().requires_grad_(True)
        self.batches = [(x.to(device), y.to(device)) for x, y in batches]
        self.n = sum(len(y) for _, y in self.batches)
        set_phase(qmodel, "float").eval()
        self.grad_graphs = [torch.autograd.grad(self._loss(self.w0, x, y), self.w0, create_graph=True)[0]
                            for x, y in self.batches]
        self.g = sum(g.detach() for g in self.grad_graphs) / self.n               # dL/dw at w0
        with torch.no_grad():
            self.loss0 = self.loss(self.w0)

    def _loss(self, w, x, y):
        out = functional_call(self.qmodel, {self.key: w / self.factor}, (x,))
        return F.cross_entropy(out, y, reduction="sum")

    @torch.no_grad()
    def loss(self, w):
        set_phase(self.qmodel, "float")       # the float path reads the substituted weight
        return sum(float(self._loss(w, x, y)) for x, y in self.batches) / self.n

    def hvp(self, v):
        """H v, H the Hessian of L at w0 (double backward through each batch's gradient)."""
        return sum(torch.autograd.grad(g, self.w0, grad_outputs=v, retain_graph=True)[0]
                   for g in self.grad_graphs) / self.n

    def terms(self, dw):
        """(g^T dw, 1/2 dw^T H dw, L(w0 + dw) - L(w0))."""
        first = float((self.g * dw).sum())
        second = 0.5 * float((dw * self.hvp(dw)).sum())
        return first, second, self.loss(self.w0.detach() + dw) - self.loss0
