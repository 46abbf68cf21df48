"""The job's ``generalization`` section: training for hospitals that did not take part.

``method: feddg``: FedDG's continuous frequency-space interpolation (Liu, Chen, Qin, Dou
and Heng, CVPR 2021). Each training site shares the low-frequency amplitude spectra of
some of its training images; every site then augments its training images by mixing their
amplitude, in that band, with one drawn from the bank, keeping their phase (the
structure), so that each site trains on its own images in the other sites' "styles".
Amplitude spectra are information that leaves a site: the job must say so
(``share_amplitudes: true``), and the combination with secure aggregation or DP is
refused (both would promise what the shared spectra do not keep).

HarmoFL (``algorithm: {name: harmofl}``, algorithms/harmofl.py) is a federated algorithm,
since half of it changes the local training step; what it refuses in the rest of the job
is checked here (:func:`harmofl_problem`), next to FedDG's rules.
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Literal

from pydantic import Field, model_validator

from medfed.core.schema import Count, Frozen, Real


class GeneralizationConfig(Frozen):
    """``method: feddg``. ``share_amplitudes``: must be true, the job's statement that each
    site sends the server (which passes them to every site) the amplitude spectra of
    ``bank_per_site`` of its training images, in the central band of ``ratio`` of each
    side (a (2b+1) x (2b+1) square per channel, b = floor(ratio * side / 2)).
    ``probability``: the chance that a training image is mixed, each time it is drawn;
    the mixing weight is drawn uniformly in [0, ``strength``]."""

    method: Literal["feddg"]
    share_amplitudes: bool = False
    ratio: Real = Field(0.1, gt=0, le=1)
    bank_per_site: Count = Field(16, ge=1, le=1024)
    probability: Real = Field(0.5, ge=0, le=1)
    strength: Real = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _said(self) -> "GeneralizationConfig":
        if not self.share_amplitudes:
            raise ValueError(
                "share_amplitudes: feddg sends the amplitude spectra of each site's images to the server and every "
                "other site; set share_amplitudes: true to state that this leaves the sites (docs/privacy.md)"
            )
        return self


def harmofl_problem(
    algorithm: str, data_dims: int | None, task_kind: str, patch: bool, topology: str, generalization: bool,
) -> str | None:
    """Why ``algorithm: harmofl`` does not fit the rest of the job (None: it fits), from the
    job's ``algorithm.name``, its images' spatial dims (None: not known before reading),
    ``task.kind``, whether it trains on patches, ``topology.kind`` and whether it has a
    ``generalization`` section. HarmoFL's amplitude normalization works on 2D spectra of
    whole images at sites that train under a server; DP-SGD and the bundle's trainer are
    refused by the general checks of algorithms that change the gradient."""
    if algorithm != "harmofl":
        return None
    if data_dims == 3:
        return ("algorithm.name: harmofl normalizes the 2D amplitude spectra of images; this job's images are 3D "
                "volumes (use 2D images or slices, or another algorithm)")
    if task_kind == "reconstruction":
        return ("algorithm.name: harmofl normalizes the amplitude of the images a classifier or segmenter reads; "
                "task.kind: reconstruction learns from k-space, whose amplitude is the signal; use another algorithm")
    if patch:
        return ("transforms.patch: harmofl normalizes whole images toward the site's average amplitude of whole "
                "images; patch training feeds crops of another size; leave transforms.patch out")
    if topology != "server":
        return (f"topology.kind: harmofl is built for a server that averages the sites' models each round; "
                f"{topology} is not; use topology.kind: server")
    if generalization:
        return ("generalization: feddg shares the sites' amplitude spectra and mixes them into the images, while "
                "harmofl normalizes each site's images toward its own amplitude and keeps it at the site; choose one")
    return None
