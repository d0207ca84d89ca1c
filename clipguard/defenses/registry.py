"""The defense registry: ``DEFENSES`` / ``build_defense(name, classifier, options, seed)``.

A defense wraps a [0, 1] -> logits classifier and returns another (DESIGN contract 6), with ``text_embeddings``,
``input_size`` and ``resize`` of the wrapped one (what tasks read), ``randomized`` (a forward draws randomness: attacks
need EOT) and ``to_record()`` (its name and options, as the record keeps them). ``options`` is the command's
``DefenseOptions`` (``tasks.configs``): a builder reads the fields named after it (``ttc_*``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from clipguard.defenses.ttc import TTC
from clipguard.registry import Registry

DEFENSES: Registry[Callable[[nn.Module, object, int], nn.Module]] = Registry("--defense")


@DEFENSES.register("ttc")
def _ttc(classifier: nn.Module, options, seed: int) -> nn.Module:
    return TTC(classifier, eps=options.ttc_eps.value, steps=options.ttc_steps, alpha=options.ttc_alpha.value,
               tau_threshold=options.ttc_tau, beta=options.ttc_beta, seed=seed)


def build_defense(name: str, classifier: nn.Module, options, seed: int = 0) -> nn.Module:
    """``classifier`` behind the defense ``name`` (a name in DEFENSES; unknown: one-line ClipguardError)."""
    return DEFENSES.get(name)(classifier, options, seed).eval()


def list_defenses() -> list[str]:
    return DEFENSES.names()
