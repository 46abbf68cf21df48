"""What a job with ``privacy.he`` (homomorphic aggregation, privacy/he/) may not combine,
checked when the job loads (config/job.py); each refusal names the field and says what to
do. Needs no TenSEAL."""

from typing import Any


def he_problem(job: Any) -> str | None:
    """Why ``job``'s ``privacy.he`` does not fit the rest of the job, or None."""
    he, p, a = job.privacy.he, job.privacy, job.algorithm
    if he is None:
        return None
    if p.secure_aggregation is not None:
        return ("privacy.he: homomorphic encryption and privacy.secure_aggregation both hide each update inside "
                "the sum; choose one")
    if not a.uses_mean:
        from medfed.config.algorithms import mean_algorithm_names

        return (f"algorithm.name: homomorphic aggregation reveals only the weighted sum of the updates; "
                f"'{a.name}' {a.beyond_mean}. Use one of {mean_algorithm_names()}")
    if job.robust is not None:
        return "robust: a robust rule needs each site's update, which homomorphic encryption hides"
    if p.dp is not None and p.dp.noise == "central":
        return ("privacy.dp.noise: central noise is added by the server to a mean it does not hold under "
                "homomorphic encryption (the decrypting sites do); use noise: local or remove privacy.he")
    if job.compression is not None:
        return "compression: homomorphic encryption sends CKKS ciphertexts of the full change; remove compression"
    kind = job.topology.kind
    if kind != "server":
        return (f"privacy.he: the server adds the sites' ciphertexts, but topology.kind: {kind} has no server "
                "that aggregates; use topology.kind: server")
    if job.generalization is not None:
        return ("generalization: feddg sends each site's amplitude spectra outside the encrypted sum, which would "
                "break privacy.he's promise (the server sees only the sum); choose one")
    if job.contribution is not None:
        return ("contribution: needs each site's own update, but privacy.he shows the server only their sum; "
                "remove one of the two sections")
    k = job.sites_per_round
    if k < 2:
        return f"privacy.he: needs at least 2 sites per round (the sum of one site is its update), the job has {k}"
    if he.decryptors > k:
        return f"privacy.he.decryptors: is {he.decryptors} but only {k} sites train in a round"
    if job.min_sites is not None and job.min_sites < 2:
        return "min_sites: homomorphic aggregation decrypts sums of 2 or more sites; set min_sites: 2 or more"
    return None
