"""clipguard: measure and improve the adversarial robustness of CLIP zero-shot classifiers.

The public Python API, for notebooks and for scripts that compare clipguard with other tools (everything
else may move between releases):

- :func:`load_classifier` -- a CLIP zero-shot classifier as an ``nn.Module``: [0, 1] images at the model's
  input size in, (N, C) logits out. Attack it with any library that takes [0, 1] images (torchattacks,
  AutoAttack): eps is then in pixel units.
- :func:`load_images` -- a dataset's uint8 images and labels exactly as the commands see them.
- :func:`evaluate` -- ``clipguard eval`` as a call: options in, the JSON record (a dict) out.

Example:
    >>> import clipguard
    >>> clf = clipguard.load_classifier("toy", dataset="toy", device="cpu")
    >>> data = clipguard.load_images("toy", split="test", limit=100, model=clf)
    >>> logits = clf(clipguard.to_model_input(clf, data.images))
    >>> rec = clipguard.evaluate(model="toy", dataset="toy", limit=100, attack="pgd", eps="4/255")
    >>> rec["metrics"]["acc1"], rec["metrics"]["robust_acc"]

Importing clipguard does not import torch; each function does when called.
"""

from __future__ import annotations

__all__ = ["ClipguardError", "RunOptions", "evaluate", "load_classifier", "load_images", "to_model_input",
           "__version__"]

from clipguard.errors import ClipguardError
from clipguard.run_options import RunOptions
from clipguard.version import __version__


def load_classifier(model: str = "toy", *, classnames: list[str] | None = None, templates: list[str] | None = None,
                    dataset: str | None = None, template_set: str = "seed", prompts: str | None = None,
                    adapter: str | None = None, base_adapter: str | None = None, device: str = "auto"):
    """A CLIP zero-shot classifier as an ``nn.Module`` (eval mode, frozen, fp32 weights).

    Args:
        model: model spec (``ViT-B-32:openai``, ``ARCH:/path/weights.safetensors``, ``hf-hub:ORG/NAME``, ``toy``).
        classnames: the classes, e.g. ``["cat", "dog"]``; or give ``dataset`` to use ``prompts/<dataset>.json``.
        templates: prompt templates with ``{c}`` (default ``["a photo of a {c}."]``) when ``classnames`` is given.
        dataset: a dataset spec whose class names and template set ``template_set`` (or ``prompts`` file) to use.
        adapter: an adapter directory made by ``clipguard finetune``.
        base_adapter: the image-tower adapter a prompt ``adapter`` was trained on (``--base-adapter``; the prompt
            adapter checks it is that one).
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Returns:
        A ``ZeroShotClassifier``: ``(N, 3, H, W)`` floats in [0, 1] -> ``(N, C)`` logits. It resizes inputs of
        another size itself; to reproduce the commands exactly, feed :func:`to_model_input` of uint8 images.

    Raises:
        ClipguardError: bad spec, neither or both of ``classnames`` and ``dataset``, adapter for another model.
    """
    from clipguard.data.prompts import load_prompts
    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.models.loader import load_clip
    from clipguard.models.text_embeddings import get_text_embeddings
    from clipguard.run_options import RunOptions
    from clipguard.specs import parse_dataset_spec
    from clipguard.tasks.setup import adapted

    if (classnames is None) == (dataset is None):
        raise ClipguardError("load_classifier needs exactly one of classnames=[...] or dataset='...'")
    if dataset is not None:
        p = load_prompts(parse_dataset_spec(dataset).name, prompts_file=prompts, templates=template_set)
        classnames, templates = p.classnames, p.templates
    clip = load_clip(model, device=device, precision="fp32")
    visual, text = (None, None)
    if adapter or base_adapter:  # an image-tower adapter, or a prompt adapter (its class embeddings replace the
        # templates'), possibly on the image-tower adapter it was trained on
        visual, text = adapted(RunOptions(adapter=str(adapter) if adapter else None,
                                          base_adapter=str(base_adapter) if base_adapter else None),
                               clip, list(classnames))
    if text is None:
        text = get_text_embeddings(clip, list(classnames), list(templates or ["a photo of a {c}."]))
    return ZeroShotClassifier.from_clip(clip, text.embeddings, visual=visual).eval()


def load_images(dataset: str = "toy", *, split: str = "test", limit: int | None = None, seed: int = 0,
                size: int | tuple[int, int] | None = None, image_column: str | None = None,
                label_column: str | None = None, model=None):
    """A dataset as the commands load it: an ``ImageSet`` with ``.images`` (uint8 (N, 3, H, W)), ``.labels``
    (int64 (N,)) and ``.classnames``; ``limit`` keeps a seeded, class-stratified subset.

    Args:
        model: the model the images are for: exactly the uint8 images ``--resolution model`` feeds it (its input
            size and its own open_clip eval transform: resize mode, interpolation, order). A model spec string
            (``ViT-B-16-SigLIP:webli``: only its config is read, no weights, no tokenizer), a classifier from
            :func:`load_classifier`, or a ``LoadedClip``.
        size: a bare input size instead (an int or (H, W)): OpenAI CLIP's geometry at that size (shorter side
            bicubic, centre crop). Neither: each image keeps its own size (native), which needs a set whose images
            share one size.

    Raises:
        ClipguardError: both ``model`` and ``size``; a bad spec.

    Example:
        >>> data = clipguard.load_images("imagefolder:photos", model="ViT-B-16-SigLIP:webli")  # squashed to 224
    """
    from clipguard.data.registry import load_dataset

    geometry = None
    if model is not None:
        if size is not None:
            raise ClipguardError("load_images takes model=... (its own size and geometry) or size=..., not both")
        size, geometry = _model_geometry(model)
    return load_dataset(dataset, split=split, limit=limit, seed=seed, size=size, image_column=image_column,
                        label_column=label_column, geometry=geometry)


def _model_geometry(model):
    """(input size, Geometry) of a model spec string (its config only), a classifier or a LoadedClip."""
    if isinstance(model, str):
        from clipguard.models.loader import model_preprocess

        pp = model_preprocess(model)
        return pp.input_size, pp.geometry
    size = getattr(model, "input_size", None)
    if size is None:
        raise ClipguardError(f"load_images(model=...) takes a model spec string, a classifier or a LoadedClip, "
                             f"not a {type(model).__name__}")
    return tuple(size), getattr(model, "geometry", None)


def to_model_input(classifier, images):
    """uint8 (or [0, 1] float) images -> [0, 1] floats on the classifier's device at its input size: what the
    commands feed the classifier and perturb (``--resolution model``)."""
    from clipguard.models.inference import attack_inputs

    return attack_inputs(classifier, images, "model")


def evaluate(*, progress: bool = False, **options) -> dict:
    """``clipguard eval`` as a call: the same options (``model``, ``dataset``, ``split``, ``limit``, ``attack``,
    ``eps``, ``steps``, ``adapter``, ``device``, ...; ``eps`` as text such as ``"8/255"``) in, the
    ``clipguard.result/1`` record out."""
    from clipguard.tasks.eval import eval_config, run_eval

    return run_eval(eval_config(**options), progress=progress)
