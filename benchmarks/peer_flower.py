"""Flower's side of benchmarks/peer.py: the benchmark's FedAvg workload in Flower's
Simulation Engine (``flwr.simulation.run_simulation`` with a ``ServerApp`` and a
``ClientApp`` of the Message API, Ray backend).

Run with the Python of the benchmark's Flower virtual environment, never medfed's: this
file imports no medfed.

    FLWR_PYTHON benchmarks/peer_flower.py --data SITES.npz --out RESULT.json

``SITES.npz`` (written by peer.py from medfed's synthetic generator) holds every site's
train, val and test arrays, concatenated in site order with offsets, the site names and
the initial weights of medfed's ``SmallCNN``. The model here has the same layers and is
built from the same seed; the server refuses to start if its weights differ from those.
Each site trains as ``benchmarks/plain_loop.py`` does: the same per-round, per-site seed,
batch order, SGD settings and loss; FedAvg weights the updates by training examples
(Flower's ``FedAvg``, which sums in float32 in the order replies arrive, where the plain
loop sums in float64 in site order). After the last round the server sends the final
model to every site, which answers its val and test accuracy. The result file holds those
accuracies and the wall-clock time at which the first site began round 1.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

SPLITS = ("train", "val", "test")


class SmallCNN(nn.Module):
    """medfed's ``SmallCNN`` (2D, batch norm, one output): three conv-BN-ReLU-maxpool
    blocks of width w, 2w, 4w, a global average pool and a linear head. Same module
    names, so the same state-dict keys and, from the same seed, the same weights."""

    def __init__(self, width: int):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------- the sites (in Ray actors)

_CACHE: dict[str, object] = {}  # per actor process: the arrays of every site, and the model


def _site(path: str, i: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 and labels (N,) of site ``i``'s ``split``."""
    if _CACHE.get("path") != path:
        with np.load(path) as z:
            _CACHE.update(path=path, **{k: torch.from_numpy(z[k]) for k in z.files if k.startswith(("x_", "y_", "off_"))})
    off = _CACHE[f"off_{split}"]
    a, b = int(off[i]), int(off[i + 1])
    return _CACHE[f"x_{split}"][a:b], _CACHE[f"y_{split}"][a:b]


def _model(cfg: ConfigRecord, arrays: ArrayRecord) -> SmallCNN:
    torch.set_num_threads(int(cfg["threads"]))
    if _CACHE.get("width") != cfg["width"]:
        _CACHE.update(width=cfg["width"], model=SmallCNN(int(cfg["width"])))
    model = _CACHE["model"]
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One local epoch (or ``epochs``) of SGD on this site's training split."""
    started = time.time()
    i = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    x_all, y_all = _site(str(cfg["data"]), i, "train")
    model = _model(cfg, msg.content["arrays"])
    seed = int(np.random.SeedSequence([int(cfg["seed"]), 0, int(cfg["server-round"]), i]).generate_state(1)[0]
               & 0x7FFFFFFF)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                          weight_decay=float(cfg["weight-decay"]))
    loss_fn = nn.BCEWithLogitsLoss()
    batch, n = int(cfg["batch"]), len(y_all)
    model.train()
    for _ in range(int(cfg["epochs"])):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            if len(idx) == 1 and n > 1:
                break
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_all[idx])[:, 0], y_all[idx].float()).backward()
            opt.step()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": n, "started": started})})
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Correct predictions (sigmoid >= 0.5) and examples of this site's val and test splits."""
    i = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    model = _model(cfg, msg.content["arrays"])
    model.eval()
    out: dict[str, int] = {"site": i}
    with torch.no_grad():
        for split in ("val", "test"):
            x, y = _site(str(cfg["data"]), i, split)
            correct = 0
            for s in range(0, len(y), 256):
                p = torch.sigmoid(model(x[s : s + 256])[:, 0])
                correct += int(((p >= 0.5).long() == y[s : s + 256]).sum())
            out[f"{split}-correct"], out[f"{split}-n"] = correct, len(y)
    return Message(RecordDict({"metrics": MetricRecord(out)}), reply_to=msg)


# ---------------------------------------------------------------- the server (this process)

SETTINGS: dict = {}  # filled by main() before the simulation starts
RESULT: dict = {}


def _first_start(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """The round's train metrics: when its first site began (wall clock, seconds)."""
    return MetricRecord({"first-started": min(float(next(iter(r.metric_records.values()))["started"])
                                              for r in replies)})


server_app = ServerApp()


@server_app.main()
def server(grid: Grid, context: Context) -> None:
    s = SETTINGS
    torch.manual_seed(s["seed"])
    state = SmallCNN(s["width"]).state_dict()
    with np.load(s["data"]) as z:
        names = [str(v) for v in z["names"]]
        for k, v in state.items():
            if not np.array_equal(v.numpy(), z[f"init/{k}"]):
                raise SystemExit(f"initial weights differ from medfed's SmallCNN at '{k}'")
    n = len(names)
    config = ConfigRecord({"data": s["data"], "seed": s["seed"], "width": s["width"], "threads": s["threads"],
                           "lr": s["lr"], "momentum": s["momentum"], "weight-decay": s["weight_decay"],
                           "batch": s["batch"], "epochs": s["epochs"]})
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
                      train_metrics_aggr_fn=_first_start)
    result = strategy.start(grid, ArrayRecord(state), num_rounds=s["rounds"], train_config=config)

    # every site's val and test accuracy of the final model, once
    content = RecordDict({"arrays": result.arrays, "config": config})
    replies = list(grid.send_and_receive([Message(content, node, MessageType.EVALUATE) for node in grid.get_node_ids()]))
    accuracy = {}
    for r in replies:
        if r.has_error():
            raise SystemExit(f"evaluation failed at a site: {r.error.reason}")
        m = r.content["metrics"]
        for split in ("val", "test"):
            accuracy[f"{names[int(m['site'])]}/{split}"] = m[f"{split}-correct"] / m[f"{split}-n"]
    if len(accuracy) != 2 * n:
        raise SystemExit(f"{len(accuracy) // 2} of {n} sites answered the final evaluation")
    RESULT.update(round1_at=float(result.train_metrics_clientapp[1]["first-started"]), accuracy=accuracy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the sites' arrays and initial weights (.npz, from peer.py)")
    ap.add_argument("--out", required=True, help="where to write the result (JSON)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the simulation (Ray's num_cpus)")
    ap.add_argument("--cpus-per-client", type=int, default=2, help="CPUs (and torch threads) of each ClientApp actor")
    args = ap.parse_args()
    with np.load(args.data) as z:
        sites = len(z["names"])
    SETTINGS.update(data=args.data, rounds=args.rounds, seed=args.seed, width=args.width, lr=args.lr,
                    momentum=args.momentum, weight_decay=args.weight_decay, batch=args.batch, epochs=args.epochs,
                    threads=args.cpus_per_client)
    torch.set_num_threads(args.cpus_per_client)
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"num_cpus": args.cpus}},
    )
    if "accuracy" not in RESULT:
        raise SystemExit("the Flower simulation ended without a result (see its log above)")
    with open(args.out, "w") as f:
        json.dump(RESULT, f)


if __name__ == "__main__":
    # run from the module of this name, so that Ray's workers import the ClientApp's
    # functions (and keep their per-process cache) instead of unpickling copies of __main__
    import peer_flower

    peer_flower.main()
