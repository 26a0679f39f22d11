"""model.py's training step written out by hand, for CPU batches too small to hide autograd.

At the paper's batch of 20 a step's matrix products take under half its time with autograd; the
rest is the graph, dozens of small allocations and kernels, and `Optimizer.step`'s Python. Here
the same step runs over buffers allocated once (step_memory.py):

- the parameters, their gradients and Adam's two moments each live in one flat tensor, so Adam is
  one call of the fused kernel `Adam(fused=True)` uses, without `Optimizer.step`'s Python;
- mu and logvar are one matrix product: their weights lie side by side in the flat buffer;
- the gradients are written in closed form: the loss's gradient on the pixel logits is
  sigmoid(logits) - x, on mu it is dL/dz + mu, on logvar 0.5 (dL/dz (z - mu) + exp(logvar) - 1);
  through a layer they are matrix products and aten's own tanh and relu backward kernels.

It computes what model.py's `loss_terms` and autograd compute (tests/vae/test_fast_step.py holds
it to that) and draws the same random numbers in the same order, so on the same seed the two
paths train the same model up to float rounding. model.py stays the reference.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from pipeline.vae.model import ACTIVATIONS as MODULES_OF
from pipeline.vae.model import VAE, loss_terms
from pipeline.vae.step_memory import Buffers, Linear, flat_order, flatten


def relu_backward(
    grad: torch.Tensor, output: torch.Tensor, grad_input: torch.Tensor
) -> torch.Tensor:
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad_input)


# activation: its in-place forward, and its backward from the output (aten's own kernels)
ACTIVATIONS = {
    "tanh": (torch.tanh_, torch.ops.aten.tanh_backward.grad_input),
    "relu": (torch.relu_, relu_backward),
}


PROBE_IMAGES = 16  # the batch `uncovered` runs through both steps


def uncovered(model: VAE, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> str | None:
    """What of `model` and its loss this step does not compute as model.py and autograd do, in a
    few words; None when it covers them.

    First the structure: every parameter in the flat buffer, and only Linear layers and the
    activation the step writes out. Then one probe batch through both steps with the same noise:
    equal loss terms and gradients up to float rounding, so that a change to model.py's forward
    or loss (a weighted KL, another term) is caught too. The model, the optimizer and the random
    number generator are left as they were.
    """
    if model.activation not in ACTIVATIONS:
        return f"the activation {model.activation!r}"
    allowed = (VAE, nn.Sequential, nn.Linear, MODULES_OF[model.activation])
    for name, module in model.named_modules():
        if not isinstance(module, allowed):
            return f"the layer {name} ({type(module).__name__}) of the model"
    order = {id(p) for p in flat_order(model)}
    for name, p in model.named_parameters():
        if id(p) not in order:
            return f"the parameter {name} of the model"
    try:
        return differs_from_autograd(model, optimizer, images[:PROBE_IMAGES])
    except (ValueError, RuntimeError) as exc:  # shapes the flat layout cannot take
        return f"this model and optimizer ({str(exc).splitlines()[0]})"


def differs_from_autograd(
    model: VAE, optimizer: torch.optim.Optimizer, x: torch.Tensor
) -> str | None:
    model.train()
    noise = torch.get_rng_state()
    step = FastStep(model, optimizer)
    b = step.batch(x, torch.arange(len(x), device=x.device), binarize=False)
    terms = torch.zeros(2, device=x.device)
    step.forward(b, b.x, terms)
    step.backward(b, b.x)
    torch.set_rng_state(noise)  # the same eps for model.py's loss
    reference = torch.stack([term.sum() for term in loss_terms(model, x)])
    grads = torch.autograd.grad(reference.sum(), step.order)
    torch.set_rng_state(noise)  # training then draws what it would have drawn
    if reference.shape != terms.shape or not torch.allclose(terms, reference.detach(), rtol=1e-4):
        return f"model.py's loss (terms {reference.tolist()} against the step's {terms.tolist()})"
    names = {id(p): name for name, p in model.named_parameters()}
    for p, ours, theirs in zip(step.order, step.views_of(step.grads), grads, strict=True):
        scale = theirs.abs().max()
        if not torch.allclose(ours, theirs, atol=1e-5 * scale, rtol=1e-4):
            return f"model.py's gradient on {names[id(p)]}"
    return None


class FastStep:
    """Training steps of `model` with `optimizer` (a fused Adam from `make_optimizer`).

    It takes the model's parameters and Adam's state into its flat buffers when made, and gives
    them back with `write_back()`; in between only the buffers change.
    """

    def __init__(self, model: VAE, optimizer: torch.optim.Optimizer) -> None:
        group = optimizer.param_groups[0]
        if len(optimizer.param_groups) > 1 or group["amsgrad"] or group["weight_decay"]:
            raise ValueError("it runs Adam without weight decay or amsgrad, one parameter group")
        self.model, self.optimizer = model, optimizer
        self.order = flat_order(model)
        self.params = flatten([p.detach() for p in self.order])
        self.grads = torch.zeros_like(self.params)
        states = [optimizer.state.get(p, {}) for p in self.order]
        if all(states):
            self.exp_avg = flatten([s["exp_avg"] for s in states])
            self.exp_avg_sq = flatten([s["exp_avg_sq"] for s in states])
            steps = {float(s["step"]) for s in states}
            if len(steps) > 1:
                raise ValueError(f"Adam's parameters are at different steps: {sorted(steps)}")
            self.step_count = torch.tensor(steps.pop(), device=self.params.device)
        else:  # a fresh Adam: no state until its first step
            self.exp_avg, self.exp_avg_sq = (torch.zeros_like(self.params) for _ in range(2))
            self.step_count = torch.zeros((), device=self.params.device)
        self.encoder, self.heads, self.decoder = self.layers()
        self.forward_act, self.backward_act = ACTIVATIONS[model.activation]
        self.buffers: dict[int, Buffers] = {}
        # constants as tensors: a Python number in an op is wrapped into a new tensor each call
        self.one, self.minus_half = (
            torch.tensor(c, device=self.params.device) for c in (1.0, -0.5)
        )

    def layers(self) -> tuple[list[Linear], Linear, list[Linear]]:
        """The encoder's layers, the two heads as one layer, the decoder's layers."""
        offsets = [0, *accumulate(p.numel() for p in self.order)]

        def linear(i: int, count: int = 1) -> Linear:  # `count` weights side by side, then biases
            rows, columns = self.order[i].shape
            weights = slice(offsets[i], offsets[i + count])
            biases = slice(offsets[i + count], offsets[i + 2 * count])
            weight = self.params[weights].view(count * rows, columns)
            weight_grad = self.grads[weights].view(count * rows, columns)
            return Linear(weight, weight.t(), self.params[biases], weight_grad, self.grads[biases])

        n = 2 * self.model.hidden_layers  # the encoder's weights and biases come first
        encoder = [linear(i) for i in range(0, n, 2)]
        decoder = [linear(i) for i in range(n + 4, len(self.order), 2)]
        return encoder, linear(n, count=2), decoder

    def __call__(
        self, images: torch.Tensor, index: torch.Tensor, binarize: bool, terms: torch.Tensor
    ) -> None:
        """One step on `images[index]` (Bernoulli-sampled when `binarize`); the batch's summed
        reconstruction and KL terms go into `terms` (a tensor of 2)."""
        b = self.batch(images, index, binarize)
        self.forward(b, b.x, terms)
        self.backward(b, b.x)
        self.adam()

    def batch(self, images: torch.Tensor, index: torch.Tensor, binarize: bool) -> Buffers:
        """The buffers of a batch of len(index), with `images[index]` (binarised) in `x`."""
        size = len(index)
        if size not in self.buffers:
            self.buffers[size] = Buffers.allocate(self.model, size, self.params.device)
        b = self.buffers[size]
        torch.index_select(images, 0, index, out=b.x)
        if binarize:  # Bernoulli(x) as U < x: the draws of step.py's binarisation
            torch.lt(b.pixels.uniform_(), b.x, out=b.x)
        return b

    def adam(self) -> None:
        """Adam's step over the flat tensors: the kernel `Adam(fused=True).step` ends in, called
        directly; torch's functional wrapper would add its tensor grouping and a `_foreach_add_`
        on the step counter, which cost a large part of the kernel's time (docs/speed.md)."""
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        self.step_count.add_(self.one)
        torch._fused_adam_(
            [self.params], [self.grads], [self.exp_avg], [self.exp_avg_sq], [],
            [self.step_count], lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0,
            eps=group["eps"], amsgrad=False, maximize=False,
        )  # fmt: skip

    def forward(self, b: Buffers, x: torch.Tensor, terms: torch.Tensor) -> None:
        h = x
        for layer, out in zip(self.encoder, b.encoder, strict=True):
            h = self.forward_act(torch.addmm(layer.bias, h, layer.weight_t, out=out))
        torch.addmm(self.heads.bias, h, self.heads.weight_t, out=b.heads)  # [mu, logvar]
        var = torch.exp(b.logvar, out=b.var)
        # exp(0.5 logvar), as model.py: oneMKL's sqrt gives other bits on other CPU vendors
        std = torch.mul(b.logvar, 0.5, out=b.std).exp_()
        torch.mul(std, b.eps.normal_(), out=b.noise)
        g = torch.add(b.mu, b.noise, out=b.z)  # z = mu + exp(0.5 logvar) eps
        # 0.5 (exp(logvar) - 1): in the KL and in its gradient on logvar
        torch.add(self.minus_half, var, alpha=0.5, out=b.half_var_m1)
        for layer, out in zip(self.decoder[:-1], b.decoder, strict=True):
            g = self.forward_act(torch.addmm(layer.bias, g, layer.weight_t, out=out))
        last = self.decoder[-1]
        logits = torch.addmm(last.bias, g, last.weight_t, out=b.logits)
        # BCE from logits: softplus(l) - x l, with softplus(l) = max(l, 0) + log(1 + exp(-|l|))
        # in vectorised kernels (torch's softplus and log1p are 4x slower on CPU)
        recon = torch.abs(logits, out=b.pixels).neg_().exp_().add_(self.one).log_()
        recon.add_(torch.clamp(logits, min=0, out=b.positive)).addcmul_(x, logits, value=-1)
        # KL: 0.5 (mu^2 + exp(logvar) - 1 - logvar)
        kl = torch.addcmul(b.half_var_m1, b.mu, b.mu, value=0.5, out=b.kl)
        kl.sub_(b.logvar, alpha=0.5)
        torch.stack([recon.sum(), kl.sum()], out=terms)

    def backward(self, b: Buffers, x: torch.Tensor) -> None:
        grad = torch.sigmoid(b.logits, out=b.pixels).sub_(x)  # dL/dlogits
        inputs = [b.z, *b.decoder]
        for i in reversed(range(len(inputs))):
            self.weight_grads(grad, inputs[i], self.decoder[i])
            if i:
                grad = self.through(grad, self.decoder[i].weight, inputs[i], b.spare(grad))
        dz = torch.mm(grad, self.decoder[0].weight, out=b.z_grad)
        torch.add(dz, b.mu, out=b.mu_grad)
        # dL/dlogvar = 0.5 (dL/dz (z - mu) + exp(logvar) - 1)
        torch.addcmul(b.half_var_m1, dz, b.noise, value=0.5, out=b.logvar_grad)
        top = b.encoder[-1]
        self.weight_grads(b.heads_grad, top, self.heads)
        grad = self.through(b.heads_grad, self.heads.weight, top, b.hidden_grads[0])
        inputs = [x, *b.encoder[:-1]]
        for i in reversed(range(len(inputs))):
            self.weight_grads(grad, inputs[i], self.encoder[i])
            if i:
                grad = self.through(grad, self.encoder[i].weight, inputs[i], b.spare(grad))

    @staticmethod
    def weight_grads(grad: torch.Tensor, inputs: torch.Tensor, layer: Linear) -> None:
        """A linear layer's gradients, from the gradient on its output and its inputs."""
        torch.mm(grad.t(), inputs, out=layer.weight_grad)
        torch.sum(grad, 0, out=layer.bias_grad)

    def through(
        self, grad: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, into: torch.Tensor
    ) -> torch.Tensor:
        """The gradient on the pre-activation below `output`, from the one on the layer above."""
        torch.mm(grad, weight, out=into)
        return self.backward_act(into, output, grad_input=into)

    def write_back(self) -> None:
        """Copy the trained parameters and Adam's state into the model and the optimizer."""
        state = self.optimizer.state
        with torch.no_grad():
            for p, value, m, v in zip(
                self.order,
                *(self.views_of(t) for t in (self.params, self.exp_avg, self.exp_avg_sq)),
                strict=True,
            ):
                p.copy_(value)
                state[p] = {
                    "step": self.step_count.clone(),
                    "exp_avg": m.clone(),
                    "exp_avg_sq": v.clone(),
                }

    def views_of(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`flat` cut into tensors shaped as the parameters, in the flat order."""
        pieces = flat.split([p.numel() for p in self.order])
        return [piece.view(p.shape) for piece, p in zip(pieces, self.order, strict=True)]
