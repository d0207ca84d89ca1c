"""clipguard: measure and improve the adversarial robustness of CLIP zero-shot classifiers."""

__version__ = "0.1.0"
