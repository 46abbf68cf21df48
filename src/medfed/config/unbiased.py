"""What a job with ``sampling: {method: unbiased}`` (server/unbiased.py) may not combine,
checked when the job loads (config/job.py); each refusal names the fields and says what
to do."""

from typing import Any


def unbiased_problem(job: Any) -> str | None:
    """Why ``job``'s ``sampling.method: unbiased`` does not fit the rest of the job, or
    None. (``job`` is a :class:`~medfed.config.job.Job`, which imports this module, as the
    other ``*_problem`` checks take it.)"""
    if job.sampling.method != "unbiased":
        return None
    a, p = job.algorithm, job.privacy
    if not a.uses_mean:
        from medfed.config.algorithms import mean_algorithm_names

        return (f"sampling.method: unbiased weighs each site's update by the draw and its local steps, in place "
                f"of the server's weighted mean of models; algorithm.name '{a.name}' {a.beyond_mean}. Use one of "
                f"{mean_algorithm_names()}, or another sampling.method")
    if p.dp is not None:
        return ("sampling.method: DP accounting assumes every site is equally likely to be drawn; privacy.dp needs "
                "sampling.method: uniform")
    if p.secure_aggregation is not None:
        return ("sampling.method: unbiased rescales each site's update, but privacy.secure_aggregation shows the "
                "server only their sum; choose one")
    if p.he is not None:
        return ("sampling.method: unbiased rescales each site's update, but privacy.he shows the server only their "
                "sum; choose one")
    if job.robust is not None:
        return "sampling.method: unbiased and robust both replace the weighted mean of the updates; choose one"
    if job.topology.kind != "server":
        return (f"sampling.method: unbiased weighs the updates a server combines, but topology.kind: "
                f"{job.topology.kind} has no such server step; use topology.kind: server or another sampling.method")
    return None
