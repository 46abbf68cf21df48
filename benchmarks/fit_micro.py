"""One site's local training step: medfed's SiteApp.fit against the same plain PyTorch
code (load parameters, one epoch of SGD on 200 synthetic 1x28x28 images, copy the
parameters out), 40 repetitions each after 5 warm-up calls, 2 threads.

Usage: python benchmarks/fit_micro.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import job_body  # noqa: E402  (the overhead benchmark's job, 3 sites of 200)

from medfed.config import parse_job  # noqa: E402
from medfed.core.types import Arm  # noqa: E402
from medfed.data.sites import build_sites  # noqa: E402
from medfed.models import SmallCNN, get_params  # noqa: E402
from medfed.server.loop import make_plan  # noqa: E402
from medfed.site.app import build_site_apps  # noqa: E402

REPS = 40


def main() -> None:
    torch.set_num_threads(2)
    job = parse_job(job_body(3, 200, Path("unused")))
    sites = build_sites(job)
    app = build_site_apps(job, sites, torch.device("cpu"))[sites[0].name]
    torch.manual_seed(0)
    init = get_params(SmallCNN(1, 1, 16))
    plan = make_plan(job, "bench", Arm.FEDERATED, 1, 0)
    for _ in range(5):
        app.fit(init, plan)
    t = time.perf_counter()
    for _ in range(REPS):
        app.fit(init, plan)
    medfed_ms = (time.perf_counter() - t) / REPS * 1000

    model, loss_fn = SmallCNN(1, 1, 16), torch.nn.BCEWithLogitsLoss()
    x_all, y_all, tr = sites[0].train.images, sites[0].train.labels, plan.train
    t = time.perf_counter()
    for _ in range(REPS):
        model.load_state_dict(init)
        torch.manual_seed(tr.seed)
        gen = torch.Generator().manual_seed(tr.seed)
        opt = torch.optim.SGD(model.parameters(), lr=tr.lr, momentum=tr.momentum)
        model.train()
        perm = torch.randperm(len(y_all), generator=gen)
        for s in range(0, len(y_all), tr.batch_size):
            idx = perm[s : s + tr.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_all[idx])[:, 0], y_all[idx].float()).backward()
            opt.step()
        {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain_ms = (time.perf_counter() - t) / REPS * 1000
    print(f"SiteApp.fit {medfed_ms:.1f} ms, plain {plain_ms:.1f} ms, ratio {medfed_ms / plain_ms:.3f}")


if __name__ == "__main__":
    main()
