"""The checks ``medfed validate`` runs past the schema: the model, the task's loss and the
algorithm built once (no data read). A queue server runs them on every job submitted."""

from __future__ import annotations

from medfed.config import Job


def check_model_and_algorithm(job: Job) -> None:
    """Build the model, the task's loss and the algorithm once: catches what needs them (a
    personal layer name that is not a layer of the model, an imported loss that cannot be
    imported), the tracking tools a job asks for and Ray for transport: ray. The data is not read here."""
    from medfed.algorithms import build_algorithm
    from medfed.models import build_model, check_input_size
    from medfed.tasks import build_task
    from medfed.tracking.external import check_tracking
    from medfed.transport.ray import check_ray

    check_tracking(job)
    check_ray(job)  # transport: ray with Ray installed
    build_task(job)

    model = build_model(job.model, job.task, getattr(job.data, "channels", 1), spatial_dims=job.data_dims or 2)
    if job.transforms.patch is not None:
        check_input_size(job.model, tuple(job.transforms.patch), tuple(job.transforms.patch))
    build_algorithm(job.algorithm, model, len(job.training_sites), job.train.momentum, lr=job.train.lr)
    if job.topology.kind == "split":  # the cut names a module of this network, one tensor crossing it
        from medfed.cut import cut_model

        cut_model(model, job.topology.cut, job.topology.head, job.topology.u_shaped)
