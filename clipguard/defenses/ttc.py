"""Test-time counterattacks (TTC): Xing, Zhao & Sebe, "CLIP is Strong Enough to Fight Back: Test-time
Counterattacks towards Zero-shot Adversarial Robustness of CLIP", CVPR 2025 (github Sxing2/CLIP-Test-time-
Counterattacks, ``tau_thres_weighted_counterattacks``).

Before classifying an image x, TTC pushes it *away* from its own image embedding f(x) (the tower's output before
L2-normalisation, the paper's ``encode_image``) inside an L-inf ball of radius ``eps``:

1. a random start delta_0 ~ U(-eps, eps), clipped so x + delta_0 stays in [0, 1];
2. tau = ||f(x + delta_0) - f(x)||_2 / ||f(x)||_2: adversarial images are "falsely stable" (small tau);
3. ``steps`` sign-gradient *ascent* steps on sum_i ||f(x_i + delta_i) - f(x_i)||_2^2:
   delta_{k+1} = clip_[-x, 1-x](clip_[-eps, eps](delta_k + alpha * sign(grad)));
4. an image with tau < tau_threshold gets sum_k w_k delta_k with w_k = softmax_k(beta * k) (later steps weigh
   more); every other image keeps delta_0 alone (random noise, no counterattack);
5. the classifier sees x + that delta.

Defaults are the paper's (TTC.sh): eps 4/255, 2 steps, alpha 1/255, tau 0.2, beta 2.

Deviations from the reference code (also in the record, ``defense.deviations``):
- fp32 (the reference runs under CUDA autocast, fp16);
- tau is measured with the tower that classifies (with ``--adapter``, the reference measures tau with the original
  CLIP tower and counterattacks with the fine-tuned one);
- the random start comes from the defense's own generator, seeded by ``--seed`` (the reference: the global RNG).

Differentiability (for adaptive attacks): with grad enabled and an input that requires grad, every step is built
with ``create_graph`` (unrolled). sign() and the tau threshold are step functions: their derivative is zero almost
everywhere, which is their true derivative (not a masked one), so no step needs BPDA.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def counterattack_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float,
                       alpha: float) -> torch.Tensor:
    """One counterattack step: sign-gradient *ascent* of the embedding distance, projected on the eps ball and on
    the pixels that keep x + delta in [0, 1]. Shape: all (N, C, H, W)."""
    delta = torch.clamp(delta + alpha * torch.sign(grad), -eps, eps)
    return torch.maximum(torch.minimum(delta, 1 - x), -x)


def step_weights(tau: torch.Tensor, tau_threshold: float, beta: float, steps: int) -> torch.Tensor:
    """(N, steps + 1) weights of delta_0 ... delta_steps: softmax(beta * k) for the falsely stable images
    (tau < tau_threshold), (1, 0, ..., 0) (the random start alone) for the others."""
    k = torch.arange(steps + 1, device=tau.device, dtype=tau.dtype)
    soft = torch.softmax(beta * k, dim=0).expand(tau.shape[0], -1)
    hard = torch.zeros_like(soft)
    hard[:, 0] = 1
    return torch.where((tau < tau_threshold).unsqueeze(1), soft, hard)


REFERENCE = ("Xing, Zhao & Sebe, CLIP is Strong Enough to Fight Back: Test-time Counterattacks towards Zero-shot "
             "Adversarial Robustness of CLIP, CVPR 2025; github Sxing2/CLIP-Test-time-Counterattacks")
DEVIATIONS = (
    "fp32 (the reference code runs under CUDA autocast, fp16)",
    "tau measured with the tower that classifies (with --adapter the reference measures it with the original CLIP "
    "tower)",
    "random starts from the defense's own generator seeded by --seed (the reference: the global RNG); under torchrun "
    "each rank's generator starts from the same seed",
)


class TTC(nn.Module):
    """A ZeroShotClassifier behind test-time counterattacks: "counterattack, then classify", [0, 1] -> logits.

    Args:
        classifier: the ZeroShotClassifier (its ``visual`` and ``preprocess`` give the embedding f).
        eps, alpha: counterattack radius and step in [0, 1] pixel units (L-inf).
        steps: counterattack steps (0: the random start alone, the paper's "RN" baseline).
        tau_threshold: images with tau below it are counterattacked.
        beta: weight of later steps.
        seed: seeds the random starts (the defense's own generator).

    Shape:
        - Input: (N, 3, H, W) float in [0, 1]. Output: (N, C) logits.
    """

    randomized = True  # a new random start on every forward: attacks need EOT (defenses.adaptive)
    name = "ttc"

    def __init__(self, classifier: nn.Module, *, eps: float = 4 / 255, steps: int = 2, alpha: float = 1 / 255,
                 tau_threshold: float = 0.2, beta: float = 2.0, seed: int = 0):
        super().__init__()
        self.classifier = classifier
        self.eps, self.steps, self.alpha = float(eps), int(steps), float(alpha)
        self.tau_threshold, self.beta = float(tau_threshold), float(beta)
        self.generator = torch.Generator(device=classifier.text_embeddings.device)
        self.generator.manual_seed(int(seed))

    # what every task reads from a classifier: the same as the wrapped one's
    @property
    def text_embeddings(self) -> torch.Tensor:
        return self.classifier.text_embeddings

    @property
    def input_size(self) -> tuple[int, int]:
        return self.classifier.input_size

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.resize(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the image tower's output before L2-normalisation (the paper's ``encode_image``)."""
        return self.classifier.visual(self.classifier.preprocess(x))

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * self.eps

    def counterattack(self, x: torch.Tensor, start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + the counterattack's delta, tau per image). ``start``: delta_0 before clipping (default: random)."""
        unrolled = torch.is_grad_enabled() and x.requires_grad  # an adaptive attack differentiates through it
        x0 = x if unrolled else x.detach()
        start = self.random_start(x0) if start is None else start
        delta = torch.maximum(torch.minimum(start, 1 - x0), -x0)
        # Unrolled, the steps' gradients are differentiated again: fused attention kernels have no double backward
        # (CPU flash attention raises), the math kernel does.
        kernel = sdpa_kernel([SDPBackend.MATH]) if unrolled else nullcontext()
        with torch.enable_grad(), kernel:  # the counterattack needs gradients even inside a no_grad evaluation
            with torch.set_grad_enabled(unrolled):
                f_x = self.embed(x0)
            if not unrolled:
                delta = delta.detach().requires_grad_(True)
            deltas, tau = [delta], None
            for k in range(self.steps):
                f_adv = self.embed(x0 + delta)
                dist = ((f_adv - f_x) ** 2).sum(1)
                if k == 0:
                    tau = (dist.sqrt() / f_x.norm(dim=1)).detach()
                (grad,) = torch.autograd.grad(dist.sum(), delta, create_graph=unrolled)
                delta = counterattack_step(delta, grad, x0, self.eps, self.alpha)
                if not unrolled:
                    delta = delta.detach().requires_grad_(True)
                deltas.append(delta)
            if tau is None:  # steps 0: the random start alone
                with torch.no_grad():
                    tau = torch.zeros(x0.shape[0], device=x0.device)
            w = step_weights(tau, self.tau_threshold, self.beta, self.steps).to(x0.dtype)
            mixed = sum(w[:, k].view(-1, 1, 1, 1) * d for k, d in enumerate(deltas))
        out = x0 + mixed
        return (out if unrolled else out.detach()), tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.counterattack(x)[0])

    def to_record(self) -> dict:
        return {"name": self.name, "eps": self.eps, "steps": self.steps, "alpha": self.alpha,
                "tau_threshold": self.tau_threshold, "beta": self.beta, "norm": "linf", "randomized": self.randomized,
                "reference": REFERENCE, "deviations": list(DEVIATIONS)}
