"""The reference for the overhead benchmark: FedAvg as a plain PyTorch loop.

It does the same work as ``medfed run`` on the benchmark job: the same synthetic data
(medfed's generator), the same model and initialisation, the same per-site seeds, batch
order, optimizer and example-weighted averaging, and one final evaluation of accuracy on
every site's val and test splits. It prints one JSON line: the wall-clock time at which
round 1 started, seconds per round, and final test accuracy per site.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import yaml

from medfed.config import parse_job  # only to read the same job file
from medfed.data.synthetic import make_synthetic_sites
from medfed.models import SmallCNN


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    args = ap.parse_args()
    with open(args.job) as f:
        job = parse_job(yaml.safe_load(f))
    torch.set_num_threads(job.num_threads)
    sites = make_synthetic_sites(job.data, job.seed)
    tr = job.train

    torch.manual_seed(job.seed)
    model = SmallCNN(1, 1, job.model.width)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t_start = time.time()
    round_times = []
    for rnd in range(1, job.rounds + 1):
        t = time.perf_counter()
        states, weights = [], []
        for i, site in enumerate(sites):
            model.load_state_dict(global_state)
            seed = int(np.random.SeedSequence([job.seed, 0, rnd, i]).generate_state(1)[0] & 0x7FFFFFFF)
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.SGD(model.parameters(), lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay)
            model.train()
            x_all, y_all = site.train.images, site.train.labels
            n = len(y_all)
            for _ in range(tr.local_epochs):
                perm = torch.randperm(n, generator=gen)
                for s in range(0, n, tr.batch_size):
                    idx = perm[s : s + tr.batch_size]
                    if len(idx) == 1 and n > 1:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x_all[idx])[:, 0], y_all[idx].float())
                    loss.backward()
                    opt.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(n)
        total = float(sum(weights))
        new_state = {}
        for k, ref in states[0].items():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for st, w in zip(states, weights):
                acc += st[k].to(torch.float64) * (w / total)
            new_state[k] = acc.to(ref.dtype) if ref.is_floating_point() else acc.round().to(ref.dtype)
        global_state = new_state
        round_times.append(time.perf_counter() - t)

    model.load_state_dict(global_state)
    model.eval()
    acc = {}
    with torch.no_grad():
        for site in sites:
            for split in ("val", "test"):
                d = site.split(split)
                correct = 0
                for s in range(0, len(d), 256):
                    p = torch.sigmoid(model(d.images[s : s + 256])[:, 0])
                    correct += int(((p >= 0.5).long() == d.labels[s : s + 256]).sum())
                acc[f"{site.name}/{split}"] = correct / len(d)
    print(json.dumps({"round1_at": t_start, "round_s": round_times, "accuracy": acc}))


if __name__ == "__main__":
    main()
