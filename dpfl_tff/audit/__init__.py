"""Empirical privacy audit by canary clients (Andrew et al., ICLR 2024, arXiv:2302.03098).

`estimate`: the estimator (pure NumPy/SciPy). `canaries`: the canaries' directions
(TensorFlow). `auditor`: the round loop's observer that measures the cosines and
writes audit.json.
"""
