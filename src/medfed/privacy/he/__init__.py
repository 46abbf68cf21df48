"""Homomorphic aggregation with CKKS (the ``he`` extra, TenSEAL): the server adds the
sites' encrypted updates without a secret key; sites decrypt only the sum.

* ckks.py: contexts, fingerprints, ciphertexts as bytes of a checked size, key files;
* integration.py: the protocol on the update path (site filter, server combiner);
* commands.py: ``medfed he-keys``, the consortium's key files for a deployment.

What a job with ``privacy.he`` may not combine is checked by config/he.py (no TenSEAL
needed); the modules here need the extra (ckks.py raises a ConfigError naming it).
"""
