"""Certified robustness by randomized smoothing (Cohen et al. 2019): not an attack, so not in ``attacks/``.

``core``: CERTIFY, the Clopper-Pearson bounds, SmoothAdv's L2 PGD and the check that it never beats a certificate.
"""
