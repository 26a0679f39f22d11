"""model.py's training step written out by hand, for CPU batches too small to hide autograd.

At the paper's batch of 20 a step's matrix products take well under half its time with autograd;
the rest is the graph, dozens of small allocations, one Adam call per parameter tensor and its
Python. Here the same step runs over buffers allocated once:

- the parameters, their gradients and Adam's two moments each live in one flat tensor, so Adam is
  one fused kernel over one tensor (torch's functional `adam`, without `Optimizer.step`'s Python);
- mu and logvar are one matrix product: their weights lie side by side in the flat buffer;
- the gradients are written in closed form: the loss's gradient on the pixel logits is
  sigmoid(logits) - x, on mu it is dL/dz + mu, on logvar 0.5 (dL/dz (z - mu) + exp(logvar) - 1);
  through a layer they are matrix products and aten's own tanh and relu backward kernels.

It computes what model.py's `loss_terms` and autograd compute (tests/vae/test_fast_step.py holds
it to that) and draws the same random numbers in the same order, so on the same seed the two
paths train the same model up to float rounding. model.py stays the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adam import adam

from pipeline.vae.model import IMAGE_DIM, VAE


def relu_backward(grad: torch.Tensor, output: torch.Tensor, grad_input: torch.Tensor):
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad_input)


# activation: its in-place forward, and its backward from the output (aten's own kernels)
ACTIVATIONS = {
    "tanh": (torch.tanh_, torch.ops.aten.tanh_backward.grad_input),
    "relu": (torch.relu_, relu_backward),
}


def linears(model: VAE) -> tuple[list[nn.Linear], list[nn.Linear]]:
    encoder = [m for m in model.encoder if isinstance(m, nn.Linear)]
    decoder = [m for m in model.decoder if isinstance(m, nn.Linear)]
    return encoder, decoder


def flat_order(model: VAE) -> list[nn.Parameter]:
    """The parameters in the flat buffer's order: the two heads' weights next to each other (and
    their biases), so that one [2 latent, hidden] view multiplies both."""
    encoder, decoder = linears(model)
    heads = [model.to_mu.weight, model.to_logvar.weight, model.to_mu.bias, model.to_logvar.bias]
    layers = [p for layer in encoder for p in (layer.weight, layer.bias)]
    return layers + heads + [p for layer in decoder for p in (layer.weight, layer.bias)]


@dataclass
class Buffers:
    """Every activation and gradient of one batch size, allocated once."""

    x: torch.Tensor  # the batch, binarised in place
    pixels: torch.Tensor  # uniform noise, then softplus(logits), then the logits' gradient
    encoder: list[torch.Tensor]  # each hidden layer's output
    heads: torch.Tensor  # [mu, logvar], and then their gradient
    heads_grad: torch.Tensor
    std: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor
    z_grad: torch.Tensor
    decoder: list[torch.Tensor]
    logits: torch.Tensor
    hidden_grads: tuple[torch.Tensor, torch.Tensor]  # in turn: a product can't write its input
    latent_tmp: torch.Tensor

    def spare(self, grad: torch.Tensor) -> torch.Tensor:
        return self.hidden_grads[1] if grad is self.hidden_grads[0] else self.hidden_grads[0]

    @classmethod
    def allocate(cls, model: VAE, batch: int, device: torch.device) -> Buffers:
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(batch, *shape, device=device)

        hidden, latent, layers = model.hidden_dim, model.latent_dim, model.hidden_layers
        return cls(
            x=empty(IMAGE_DIM),
            pixels=empty(IMAGE_DIM),
            encoder=[empty(hidden) for _ in range(layers)],
            heads=empty(2 * latent),
            heads_grad=empty(2 * latent),
            std=empty(latent),
            eps=empty(latent),
            z=empty(latent),
            z_grad=empty(latent),
            decoder=[empty(hidden) for _ in range(layers)],
            logits=empty(IMAGE_DIM),
            hidden_grads=(empty(hidden), empty(hidden)),
            latent_tmp=empty(latent),
        )


class FastStep:
    """Training steps of `model` with `optimizer` (a fused Adam from `make_optimizer`).

    It takes the model's parameters and Adam's state into its flat buffers when made, and gives
    them back with `write_back()`; in between only the buffers change.
    """

    def __init__(self, model: VAE, optimizer: torch.optim.Optimizer) -> None:
        group = optimizer.param_groups[0]
        if len(optimizer.param_groups) > 1 or group["amsgrad"] or group["weight_decay"]:
            raise ValueError("FastStep runs plain Adam over one parameter group")
        self.model, self.optimizer = model, optimizer
        self.order = flat_order(model)
        self.params = torch.cat([p.detach().reshape(-1) for p in self.order])
        self.grads = torch.zeros_like(self.params)
        states = [optimizer.state.get(p, {}) for p in self.order]
        if all(states):
            self.exp_avg = torch.cat([s["exp_avg"].reshape(-1) for s in states])
            self.exp_avg_sq = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
            steps = {float(s["step"]) for s in states}
            if len(steps) > 1:
                raise ValueError(f"Adam's parameters are at different steps: {sorted(steps)}")
            self.step_count = torch.tensor(steps.pop(), device=self.params.device)
        else:  # a fresh Adam: no state until its first step
            self.exp_avg, self.exp_avg_sq = (torch.zeros_like(self.params) for _ in range(2))
            self.step_count = torch.zeros((), device=self.params.device)
        self.param_views, self.grad_views = self.views(self.params), self.views(self.grads)
        self.forward_act, self.backward_act = ACTIVATIONS[model.activation]
        self.buffers: dict[int, Buffers] = {}

    def views(self, flat: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(weight, bias) views of `flat` per layer: the encoder's, the joined heads', the
        decoder's."""
        tensors = self.views_of(flat)
        n = 2 * self.model.hidden_layers  # the encoder's weights and biases, then the heads'
        pairs = lambda ts: list(zip(ts[0::2], ts[1::2], strict=True))  # noqa: E731
        mu_w, _, mu_b, _ = tensors[n : n + 4]
        start = mu_w.storage_offset() - flat.storage_offset()
        heads_w = flat[start : start + 2 * mu_w.numel()].view(2 * mu_w.shape[0], mu_w.shape[1])
        start = mu_b.storage_offset() - flat.storage_offset()
        heads_b = flat[start : start + 2 * mu_b.numel()]
        return {
            "encoder": pairs(tensors[:n]),
            "heads": [(heads_w, heads_b)],
            "decoder": pairs(tensors[n + 4 :]),
        }

    def __call__(
        self, images: torch.Tensor, index: torch.Tensor, binarize: bool, terms: torch.Tensor
    ) -> None:
        """One step on `images[index]` (Bernoulli-sampled when `binarize`); the batch's summed
        reconstruction and KL terms go into `terms` (a tensor of 2)."""
        batch = len(index)
        if batch not in self.buffers:
            self.buffers[batch] = Buffers.allocate(self.model, batch, self.params.device)
        b = self.buffers[batch]
        x = torch.index_select(images, 0, index, out=b.x)
        if binarize:  # Bernoulli(x) as U < x: the draws of training.py's binarisation
            torch.lt(b.pixels.uniform_(), x, out=x)
        self.forward(b, x, terms)
        self.backward(b, x)
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        adam(
            [self.params], [self.grads], [self.exp_avg], [self.exp_avg_sq], [],
            [self.step_count], fused=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False,
        )  # fmt: skip

    def forward(self, b: Buffers, x: torch.Tensor, terms: torch.Tensor) -> None:
        views, latent = self.param_views, self.model.latent_dim
        h = x
        for (weight, bias), out in zip(views["encoder"], b.encoder, strict=True):
            h = self.forward_act(torch.addmm(bias, h, weight.t(), out=out))
        ((heads_w, heads_b),) = views["heads"]
        torch.addmm(heads_b, h, heads_w.t(), out=b.heads)
        mu, logvar = b.heads[:, :latent], b.heads[:, latent:]
        torch.mul(logvar, 0.5, out=b.std).exp_()
        torch.addcmul(mu, b.std, b.eps.normal_(), out=b.z)  # z = mu + exp(0.5 logvar) eps
        g = b.z
        for (weight, bias), out in zip(views["decoder"][:-1], b.decoder, strict=True):
            g = self.forward_act(torch.addmm(bias, g, weight.t(), out=out))
        weight, bias = views["decoder"][-1]
        logits = torch.addmm(bias, g, weight.t(), out=b.logits)
        # BCE from logits, summed: softplus(l) - x l, with softplus(l) = max(l, 0) + log(1 +
        # exp(-|l|)) in vectorised kernels (torch's softplus and log1p are 4x slower on CPU),
        # and max(l, 0) = (l + |l|) / 2
        magnitude = torch.abs(logits, out=b.pixels)
        positive = 0.5 * (logits.sum() + magnitude.sum())
        tail = magnitude.neg_().exp_().add_(1).log_().sum()
        recon = positive + tail - torch.dot(x.view(-1), logits.view(-1))
        # KL: 0.5 (mu^2 + exp(logvar) - 1 - logvar)
        var = torch.mul(b.std, b.std, out=b.latent_tmp)
        kl = 0.5 * (mu.pow(2).sum() + var.sum() - logvar.sum()) - 0.5 * mu.numel()
        torch.stack([recon, kl], out=terms)

    def backward(self, b: Buffers, x: torch.Tensor) -> None:
        views, grads, latent = self.param_views, self.grad_views, self.model.latent_dim
        grad = torch.sigmoid(b.logits, out=b.pixels).sub_(x)  # dL/dlogits
        inputs = [b.z, *b.decoder]
        for i in reversed(range(len(inputs))):
            self.weight_grads(grad, inputs[i], *grads["decoder"][i])
            weight, _ = views["decoder"][i]
            if i:
                grad = self.through(grad, weight, inputs[i], b.spare(grad))
        dz = torch.mm(grad, weight, out=b.z_grad)
        torch.add(dz, b.heads[:, :latent], out=b.heads_grad[:, :latent])
        # dL/dlogvar = 0.5 (dL/dz (z - mu) + exp(logvar) - 1), with z - mu = std eps
        tmp = torch.mul(dz, b.eps, out=b.latent_tmp).mul_(b.std)
        tmp.addcmul_(b.std, b.std).sub_(1).mul_(0.5)
        b.heads_grad[:, latent:].copy_(tmp)
        ((heads_w, _),) = views["heads"]
        self.weight_grads(b.heads_grad, b.encoder[-1], *grads["heads"][0])
        grad = self.through(b.heads_grad, heads_w, b.encoder[-1], b.hidden_grads[0])
        inputs = [x, *b.encoder[:-1]]
        for i in reversed(range(len(inputs))):
            self.weight_grads(grad, inputs[i], *grads["encoder"][i])
            if i:
                weight, _ = views["encoder"][i]
                grad = self.through(grad, weight, inputs[i], b.spare(grad))

    @staticmethod
    def weight_grads(
        grad: torch.Tensor, inputs: torch.Tensor, weight_grad: torch.Tensor, bias_grad: torch.Tensor
    ) -> None:
        """A linear layer's gradients, from the gradient on its output and its inputs."""
        torch.mm(grad.t(), inputs, out=weight_grad)
        torch.sum(grad, 0, out=bias_grad)

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
