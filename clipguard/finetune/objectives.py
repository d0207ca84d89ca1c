"""Fine-tuning objectives: the registry ``OBJECTIVES``.

Each objective is one loss per image over adversarial pixels: the training adversary maximises it (PGD on δ)
and the optimizer minimises its batch mean, as TeCoA and FARE do.

- tecoa: cross-entropy over ``logit_scale * cos(image, class text)`` with the frozen text embeddings
  (Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models", ICLR 2023).
- ce: the same cross-entropy over plain cosine logits (no temperature), the reference notebook's variant;
  its gradients are ~100x flatter, so it needs a larger learning rate.
- fare: unsupervised ``||f(x+δ) - f0(x)||²`` to the frozen original encoder's clean features
  (Schlarmann et al., "Robust CLIP", ICML 2024); labels are not used.
- noise: tecoa's cross-entropy at ``x + N(0, sigma² I)`` (``--sigma``, [0, 1] pixel units, a fresh draw every
  forward, not clamped): Gaussian data augmentation, the training recipe of Cohen et al., "Certified Adversarial
  Robustness via Randomized Smoothing", ICML 2019, for a base classifier that `clipguard certify` smooths. With
  ``--eps 0`` it is exactly their recipe; with a PGD adversary, a one-sample SmoothAdv (Salman et al. 2019).
- pmg: PMG-AFT (Wang et al., "Pre-trained Model Guided Fine-Tuning for Zero-Shot Adversarial Robustness", CVPR
  2024): tecoa's cross-entropy at x+δ plus ``--pmg-general-weight`` x KL(P_orig(x+δ) || P(x+δ)) (guidance toward
  the frozen pre-trained model's outputs on the same adversarial images) plus ``--pmg-clean-weight`` x
  KL(P(x) || P(x+δ)) (toward the model's own clean outputs; gradients flow through both of its passes, as in
  the paper's code). Its training PGD maximises the cross-entropy only (TeCoA's adversary), as the code does.
- tga: TGA-ZSR (Yu et al., "Text-Guided Attention is All You Need for Zero-Shot Robustness in Vision-Language
  Models", NeurIPS 2024): tecoa's cross-entropy plus ``--tga-refine-weight`` x ||A(x+δ) - A_orig(x)||_2
  (attention refinement) plus ``--tga-constraint-weight`` x ||A(x) - A_orig(x)||_2 (attention constraint), where
  A is the text-guided attention map (:func:`text_guided_attention`) of the model being trained and A_orig that
  of the frozen original; ViT towers only. Its training PGD also maximises the cross-entropy only.

PMG and TGA read the clean images and the frozen original classifier: the loop hands them a :class:`Guide` in
the ``ref`` slot of the common signature (``Objective.guide``), so the other objectives' calls are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.errors import ClipguardError
from clipguard.registry import Registry
from clipguard.specs import parse_model_spec

# (classifier, x_adv in [0, 1], labels, reference features, a Guide, or None) -> (N,) loss per image
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class Guide:
    """What a guided objective (pmg, tga) reads beside the adversarial images: the clean images of the same batch
    (in [0, 1]) and the frozen original classifier (the pre-trained model; never trains)."""

    clean: torch.Tensor
    frozen: nn.Module


@dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFn
    reference: bool  # needs f0(x): the frozen original encoder's clean, unnormalised features
    summary: str
    options: tuple[str, ...] = ()  # FinetuneConfig fields the loss takes as keyword arguments (noise: sigma)
    guide: bool = False  # ref is a Guide (clean images + frozen original classifier): pmg, tga
    adversary_loss: LossFn | None = None  # what the training PGD maximises, when not this loss (pmg, tga: the CE)
    check: Callable[[nn.Module], None] | None = None  # refuses an image tower it cannot train (tga: non-ViT)
    deviations: tuple[str, ...] = ()  # where it differs from its paper's protocol (the record names each)

    @property
    def attack_loss(self) -> LossFn:
        """The per-image loss the training adversary ascends."""
        return self.adversary_loss or self.loss

    def bind(self, cfg) -> Objective:
        """This objective with its ``options`` taken from a FinetuneConfig: a loss of the common signature."""
        if not self.options:
            return self
        return replace(self, loss=partial(self.loss, **{k: getattr(cfg, k) for k in self.options}))


def _tecoa(clf, x, y, ref):
    return F.cross_entropy(clf(x).float(), y, reduction="none")


def _ce(clf, x, y, ref):
    cosine = clf.features(x) @ clf.text_embeddings.to(x.dtype).T
    return F.cross_entropy(cosine.float(), y, reduction="none")


def _fare(clf, x, y, ref):
    feats = clf.visual(clf.preprocess(x)).float()
    return (feats - ref).pow(2).sum(dim=1)


def _noise(clf, x, y, ref, *, sigma: float):
    return F.cross_entropy(clf(x + sigma * torch.randn_like(x)).float(), y, reduction="none")


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per row: ``nn.KLDivLoss(log_softmax(q), softmax(p))`` summed over classes."""
    log_p, log_q = F.log_softmax(p_logits, dim=1), F.log_softmax(q_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _pmg(clf, x, y, guide: Guide, *, pmg_general_weight: float, pmg_clean_weight: float):
    adv = clf(x).float()
    with torch.no_grad():  # the pre-trained model only guides
        orig_adv = guide.frozen(x).float()
    clean = clf(guide.clean).float()  # not detached: the paper's code lets this pass train too
    return (F.cross_entropy(adv, y, reduction="none") + pmg_general_weight * _kl_rows(orig_adv, adv)
            + pmg_clean_weight * _kl_rows(clean, adv))


# --- TGA-ZSR's text-guided attention (its attention_map.py, 'text' mode)

def _vit(visual: nn.Module) -> nn.Module:
    """The open_clip VisionTransformer in ``visual`` (also under LoRA / VPT wrappers); ClipguardError otherwise."""
    for m in visual.modules():
        if all(hasattr(m, a) for a in ("ln_post", "proj", "grid_size", "class_embedding", "transformer")):
            if getattr(m, "attn_pool", None) is not None or getattr(m, "final_ln_after_pool", False):
                break  # tokens are pooled by attention / normalised after pooling: no per-patch embedding
            return m
    raise ClipguardError(f"--objective tga needs an open_clip ViT image tower (patch tokens); this model's is "
                         f"{type(visual).__name__}: use a ViT model (e.g. --model ViT-B-32) or another --objective")


def check_vit(visual: nn.Module) -> None:
    _vit(visual)


def check_vit_spec(model: str) -> None:
    """What :func:`check_vit` would refuse once the weights loaded, refused from the model spec before they do: a
    transformers: checkpoint (its tower is transformers' own, with no open_clip patch-token layout), an open_clip
    architecture whose vision config is a timm or ResNet tower, or pools its tokens by attention or normalises after
    pooling. hf-hub: models are checked once loaded (their config comes with the weights); a spec that does not
    parse is left to the loader's own message."""
    try:
        spec = parse_model_spec(model)
    except ClipguardError:
        return
    advice = "use an open_clip ViT (e.g. --model ViT-B-32:openai) or another --objective"
    if spec.kind == "transformers":
        raise ClipguardError(f"--objective tga needs an open_clip ViT image tower (patch tokens); --model {model!r} "
                             f"is a transformers checkpoint, whose tower is transformers' own: {advice}")
    if spec.kind in ("toy", "hf-hub") or not spec.arch:
        return
    import open_clip  # Lazy: only a tga run on an open_clip architecture reads its config (~2 s of import)

    vision = (open_clip.get_model_config(spec.arch) or {}).get("vision_cfg", {})
    tower = ("a timm tower " + repr(vision["timm_model_name"]) if vision.get("timm_model_name") else
             "a ResNet tower" if isinstance(vision.get("layers"), (list, tuple)) else
             "a ViT that pools its tokens by attention" if vision.get("attentional_pool") else
             "a ViT normalised after pooling" if vision.get("final_ln_after_pool") else None)
    if tower:
        raise ClipguardError(f"--objective tga needs an open_clip ViT image tower (patch tokens); {spec.arch} has "
                             f"{tower}: {advice}")


class _Tokens:
    """Context manager: the post-``ln_post`` token sequence (N, T, width) of the next forward of ``vit``."""

    def __init__(self, vit: nn.Module):
        self.vit, self.out = vit, None

    def __enter__(self):
        self.handle = self.vit.ln_post.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output):
        self.out = output

    def __exit__(self, *exc):
        self.handle.remove()


def text_guided_attention(vit: nn.Module, tokens: torch.Tensor, text: torch.Tensor, size) -> torch.Tensor:
    """TGA-ZSR's attention map, flattened (N, H*W): the projected post-LN tokens, L2-normalised over the token
    axis (dim 1, as the paper's code does), the patch tokens' dot product with each image's class text embedding,
    min-max normalised over the patches, laid out on the patch grid and bilinearly upsampled to ``size`` (the
    model's input size)."""
    tokens = tokens.float()
    if vit.proj is not None:
        tokens = tokens @ vit.proj.float()
    tokens = tokens / tokens.norm(dim=1, keepdim=True)
    gh, gw = vit.grid_size
    patches = tokens[:, -gh * gw:, :]  # the last grid tokens: after the class token (and any VPT tokens)
    am = (patches @ text.float().unsqueeze(-1)).squeeze(-1)  # (N, P)
    lo, hi = am.min(dim=1, keepdim=True)[0], am.max(dim=1, keepdim=True)[0]
    am = (am - lo) / (hi - lo).clamp_min(1e-12)
    am = F.interpolate(am.view(-1, 1, gh, gw), size=tuple(size), mode="bilinear")
    return am.flatten(1)


def _attention(clf, x: torch.Tensor, text: torch.Tensor, *, logits: bool = False):
    """(attention map, logits or None) of classifier ``clf`` at [0, 1] pixels ``x`` (one forward)."""
    vit = _vit(clf.visual)
    with _Tokens(vit) as t:
        out = clf(x) if logits else clf.visual(clf.preprocess(x))
    return text_guided_attention(vit, t.out, text, clf.input_size), (out if logits else None)


def _tga(clf, x, y, guide: Guide, *, tga_refine_weight: float, tga_constraint_weight: float):
    text = clf.text_embeddings[y]  # each image's own class text embedding (L2-normalised)
    adv_map, adv = _attention(clf, x, text, logits=True)
    with torch.no_grad():  # the original model's clean attention is the target of both terms
        orig_map = _attention(guide.frozen, guide.clean, text)[0]
    clean_map = _attention(clf, guide.clean, text)[0]
    return (F.cross_entropy(adv.float(), y, reduction="none")
            + tga_refine_weight * (adv_map - orig_map).norm(dim=1)
            + tga_constraint_weight * (clean_map - orig_map).norm(dim=1))


# Where --objective pmg / tga differ from the papers' code (named in every record; README lists them too).
PMG_DEVIATIONS = (
    "logits are logit_scale x cosine (as --objective tecoa); the paper's code normalises its scaled text "
    "embedding again, so its logits are plain cosine",
    "each KL term is per image and averaged over the batch like the cross-entropy; the code's KLDivLoss("
    "reduction='sum') sums it over the batch, weighting it batch-size times more than the mean cross-entropy",
    "optimizer and adversary are clipguard's (AdamW, warm-up + cosine, --steps / --alpha / --eps; any --method); "
    "the paper's code fine-tunes the whole image tower with SGD (lr 5e-5, momentum 0.9) on PGD-5 examples at "
    "2/255, step 1/255 (its defaults as read)",
)
TGA_DEVIATIONS = (
    "min-max normalisation of the attention map has a 1e-12 floor on its denominator (the code divides as is)",
    "the attention map is upsampled to the model's input size (the code: --image_size, 224 for its ViT-B/32)",
    "optimizer and adversary are clipguard's (AdamW, warm-up + cosine, --steps / --alpha / --eps; any --method); "
    "the paper's code fine-tunes the whole image tower with SGD (lr 1e-4, momentum 0.9) on PGD-2 examples at "
    "1/255, step 1/255",
)

OBJECTIVES: Registry[Objective] = Registry("--objective")
for _o in [
    Objective("tecoa", _tecoa, False, "cross-entropy over logit_scale x cosine to the class text embeddings"),
    Objective("ce", _ce, False, "cross-entropy over plain cosine logits (no temperature)"),
    Objective("fare", _fare, True, "unsupervised: squared L2 to the frozen encoder's clean features"),
    Objective("noise", _noise, False, "tecoa's cross-entropy under Gaussian noise of std --sigma (Cohen et al.)",
              options=("sigma",)),
    Objective("pmg", _pmg, False, "PMG-AFT: tecoa's CE + KL to the frozen model's and own clean outputs",
              options=("pmg_general_weight", "pmg_clean_weight"), guide=True, adversary_loss=_tecoa,
              deviations=PMG_DEVIATIONS),
    Objective("tga", _tga, False, "TGA-ZSR: tecoa's CE + text-guided attention refinement and constraint (ViT)",
              options=("tga_refine_weight", "tga_constraint_weight"), guide=True, adversary_loss=_tecoa,
              check=check_vit, deviations=TGA_DEVIATIONS),
]:
    OBJECTIVES.register(_o.name, _o)
