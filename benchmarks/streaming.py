"""Hospital-scale 2D data, streamed: memory, time to the first batch and throughput of a
site that trains on a folder of PNG files with ``data.cache: none`` (or ``disk``,
``memory``), against a plain MONAI ``Dataset`` + ``DataLoader`` reading the same files
with the same transforms and workers. Each measured run is a child process; the parent
samples the memory (PSS and RSS) of the child and all its loader workers every 0.1 s.

    python benchmarks/streaming.py gen --root /tmp/stream2d --n 20000        # ~20 GB as float32
    python benchmarks/streaming.py first --root /tmp/stream2d --sizes 2000 20000
    python benchmarks/streaming.py epoch --root /tmp/stream2d --n 20000 --repeats 1
    python benchmarks/streaming.py modes --root /tmp/stream2d --n 2000

``gen`` writes ``<root>/<n>/`` (grey 512x512 PNGs, or ``<root>/<n>x<side>/`` with ``--side``; a smooth body with or without a brighter
lesion, label = lesion present, and ``labels.csv``; never inside the repository). Every
run preprocesses with a ``resize`` to 128x128 and trains one epoch of ``small_cnn``
(batch 32, SGD), with 2 loader workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

T0 = time.perf_counter()
SIDE, RESIZED, BATCH, WORKERS = 512, 128, 32, 2


# --------------------------------------------------------------------------- data


def data_folder(root: Path, n: int, side: int) -> Path:
    return root / (str(n) if side == SIDE else f"{n}x{side}")


def generate(root: Path, n: int, side: int = SIDE) -> Path:
    import numpy as np
    from PIL import Image

    folder = data_folder(root, n, side)
    csv = folder / "labels.csv"
    if csv.is_file() and len(csv.read_text().splitlines()) == n + 1:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rows = ["file,label"]
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        body = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / 0.08)) * 150 + 30
        label = int(i % 2)
        if label:
            lx, ly = rng.uniform(0.35, 0.65, 2)
            body += 60 * np.exp(-(((xx - lx) ** 2 + (yy - ly) ** 2) / max(0.002, 2.0 / side**2)))
        body += rng.normal(0, 3, body.shape)
        name = f"img{i:06d}.png"
        Image.fromarray(np.clip(body, 0, 255).astype(np.uint8)).save(folder / name, compress_level=1)
        rows.append(f"{name},{label}")
        if (i + 1) % 2000 == 0:
            print(f"  {i + 1}/{n} images written", flush=True)
    csv.write_text("\n".join(rows) + "\n")
    return folder


def job(folder: Path, cache: str, cache_dir: Path | None = None):
    """One site of ``folder``'s images; resized to 128x128 when larger."""
    from medfed.config import parse_job
    from PIL import Image

    with Image.open(folder / "img000000.png") as im:
        side = im.size[0]
    preprocess = [{"name": "resize", "size": [RESIZED, RESIZED]}] if side > RESIZED else []

    data = {"source": "folder", "cache": cache, "loader": {"workers": WORKERS, "prefetch": 2},
            "label_columns": ["label"], "sites": [{"name": "h", "images": str(folder), "csv": str(folder / "labels.csv")}]}
    if cache_dir is not None:
        data["cache_dir"] = str(cache_dir)
    return parse_job({
        "name": "stream", "output": str(folder.parent / "run"), "rounds": 1, "seed": 0,
        "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
        "train": {"local_epochs": 1, "batch_size": BATCH, "lr": 0.01, "optimizer": "sgd"},
        "transforms": {"preprocess": preprocess}, "data": data,
    })


# --------------------------------------------------------------------------- children


def child_medfed(folder: Path, cache: str, epochs: int, cache_dir: Path | None) -> dict:
    """medfed's own path: build the site (index), train ``epochs`` epochs with train_local."""
    import torch

    torch.set_num_threads(2)
    from medfed.algorithms.base import SiteHook
    from medfed.core.types import TrainSettings
    from medfed.data.sites import build_sites
    from medfed.models import build_model
    from medfed.site.train import train_local
    from medfed.tasks import build_task

    j = job(folder, cache, cache_dir)
    t_build = time.perf_counter()
    (site,) = build_sites(j)
    built = time.perf_counter()
    split = site.train
    first: list[float] = []
    real = type(split).batches

    def timed(self, plan, augment=None, pin=False):  # notes when the first batch reaches the loop
        for batch in real(self, plan, augment, pin):
            if not first:
                first.append(time.perf_counter())
            yield batch

    type(split).batches = timed  # type: ignore[method-assign]
    model = build_model(j.model, j.task, 1, spatial_dims=2)
    settings = TrainSettings(local_epochs=1, batch_size=BATCH, lr=0.01, optimizer="sgd", momentum=0.0,
                             weight_decay=0.0, seed=0)
    epochs_s = []
    for e in range(epochs):
        t = time.perf_counter()
        train_local(model, split, build_task(j), settings, SiteHook(), torch.device("cpu"))
        epochs_s.append(time.perf_counter() - t)
    return {"train": len(split), "build_s": built - t_build, "first_batch_s": first[0] - T0 if first else None,
            "epoch_s": epochs_s, "images_per_s": [len(split) / s for s in epochs_s]}


def child_plain(folder: Path, epochs: int) -> dict:
    """A plain MONAI Dataset + DataLoader over the same training files (the ones medfed's
    split draw puts in train), the same decoding, resize, model, optimizer and workers."""
    import numpy as np
    import torch
    from monai.data import DataLoader, Dataset
    from monai.transforms import Resize
    from PIL import Image

    torch.set_num_threads(2)
    from medfed.data.sites import build_sites
    from medfed.models import build_model
    from medfed.tasks import build_task

    j = job(folder, "none")
    (site,) = build_sites(j)  # the same training files (index only)
    items = [{"path": str(e.path), "label": int(e.target)} for e in site.train.entries]
    resize = Resize((RESIZED, RESIZED), mode="area")

    def load(item):
        with Image.open(item["path"]) as im:
            x = np.asarray(im.convert("L"), dtype=np.float32)[None] / 255.0
        return torch.as_tensor(resize(x)).float(), torch.tensor(item["label"])

    loader = DataLoader(Dataset(items, transform=load), batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                        prefetch_factor=2, drop_last=False)
    model = build_model(j.model, j.task, 1, spatial_dims=2)
    task = build_task(j)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    epochs_s = []
    model.train()
    for e in range(epochs):
        t = time.perf_counter()
        for x, y in loader:
            opt.zero_grad()
            loss = task.loss(model(torch.as_tensor(x)), torch.as_tensor(y))
            loss.backward()
            opt.step()
        epochs_s.append(time.perf_counter() - t)
    return {"train": len(items), "epoch_s": epochs_s, "images_per_s": [len(items) / s for s in epochs_s]}


# --------------------------------------------------------------------------- memory of a process tree


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure_child(script: str, args: list[str]) -> dict:
    """Run ``SCRIPT child ARGS`` and sample its tree's memory; its JSON result (the last
    line it prints) with ``peak_pss_mib`` and ``peak_rss_mib`` (sums over the tree) added."""
    proc = subprocess.Popen([sys.executable, script, "child", *args], stdout=subprocess.PIPE, text=True)
    peak = {"Pss": 0, "Rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _tree(proc.pid)
            for field in peak:
                peak[field] = max(peak[field], sum(_kib(p, field) for p in pids))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed with {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_pss_mib=peak["Pss"] / 1024, peak_rss_mib=peak["Rss"] / 1024)
    return result


def measure(args: list[str]) -> dict:
    return measure_child(__file__, args)


# --------------------------------------------------------------------------- commands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["gen", "first", "epoch", "modes", "child"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/stream2d"))
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--sizes", type=int, nargs="*", default=[2000, 20000])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--which", default="medfed")
    ap.add_argument("--cache", default="none")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--side", type=int, default=SIDE, help="image side for gen and modes (default 512)")
    args = ap.parse_args()
    if args.command == "child":
        folder = data_folder(args.root, args.n, args.side)
        result = (child_plain(folder, args.epochs) if args.which == "plain"
                  else child_medfed(folder, args.cache, args.epochs, args.cache_dir))
        print(json.dumps(result))
        return
    if args.command == "gen":
        for n in sorted({args.n, *args.sizes}):
            generate(args.root, n, args.side)
        return
    common = ["--root", str(args.root), "--side", str(args.side)]
    if args.command == "first":
        print("| images | index build s | start to first batch s | peak PSS MiB (tree) |\n|---:|---:|---:|---:|")
        for n in args.sizes:
            r = measure([*common, "--n", str(n), "--which", "medfed", "--epochs", "1"])
            print(f"| {n} | {r['build_s']:.2f} | {r['first_batch_s']:.2f} | {r['peak_pss_mib']:.0f} |", flush=True)
    elif args.command == "epoch":
        print("| run | pipeline | train images | epoch s | images/s | peak PSS MiB | peak RSS MiB |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        ratios = []
        for k in range(args.repeats):
            row = {}
            for which in ("medfed", "plain"):
                r = measure([*common, "--n", str(args.n), "--which", which])
                row[which] = r
                print(f"| {k + 1} | {which} | {r['train']} | {r['epoch_s'][0]:.1f} | {r['images_per_s'][0]:.1f} | "
                      f"{r['peak_pss_mib']:.0f} | {r['peak_rss_mib']:.0f} |", flush=True)
            ratios.append(row["medfed"]["images_per_s"][0] / row["plain"]["images_per_s"][0])
        print("\nthroughput medfed / plain MONAI: " + ", ".join(f"{x:.3f}" for x in ratios))
    elif args.command == "modes":
        import tempfile

        print("| cache | train images | site built s | epoch 1 s | epoch 2 s | images/s (epoch 2) | peak PSS MiB |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            for cache in ("memory", "disk", "none"):
                r = measure([*common, "--n", str(args.n), "--cache", cache, "--epochs", "2", "--cache-dir", tmp])
                print(f"| {cache} | {r['train']} | {r['build_s']:.1f} | {r['epoch_s'][0]:.1f} | {r['epoch_s'][1]:.1f} | "
                      f"{r['images_per_s'][1]:.0f} | {r['peak_pss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
