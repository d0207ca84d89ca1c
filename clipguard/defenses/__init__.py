"""Test-time defenses: a defense wraps the classifier and is a classifier too ([0, 1] pixels in, logits out).

``registry`` (DEFENSES, build_defense), ``ttc`` (Xing et al.'s test-time counterattacks), ``adaptive`` (how a
defended classifier is attacked: through the whole pipeline by default, EOT over its randomness; or non-adaptively,
the papers' weaker protocol, named in the record).
"""
