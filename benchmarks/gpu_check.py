"""The GPU checks, one command: medfed's CUDA paths against its CPU paths.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--out gpu_check.md] [--root DIR] [--sections 1,2,3,4,5]

Five independent sections (a failure in one is printed and the others still run; exit
status 1 if any failed), printed as Markdown tables and written with the environment to
``--out``:

1. throughput: images per second of ``train_local`` (the step every site runs) for 2D
   classification and 3D segmentation with patches, CPU (torch threads = all cores) against
   the device (CUDA: float16 autocast with a GradScaler, as medfed trains there);
2. same metrics: a short classification job and a tiny 3D segmentation job (sliding-window
   evaluation) run with ``device: cpu`` and on the device, every metric compared within a
   stated tolerance; the device job twice, for repeatability;
3. DP-SGD (Opacus) on the device: epsilon equal to the CPU run's;
4. mixed precision: the dtype of a conv layer's output during ``train_local``, the
   GradScaler's steps, a finite loss;
5. ``transport: ray`` with fractional GPUs (``gpus_per_site: 0.25``): metrics of the
   classification job as in-process.

``--device cpu`` runs every section CPU against CPU (a smoke run without a GPU; Ray with
``gpus_per_site: 0``). ``--quick``: tiny sizes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Tolerance between a CPU run (float32) and a CUDA run (float16 autocast, other kernels) of
# the same 2-round job. Autocast rounds activations to 11 significant bits (relative 5e-4),
# and a few dozen SGD steps carry that into the weights at about 1e-3 relative: a handful of
# test predictions near the threshold flip. Scores in [0, 1] (accuracy, AUC, Dice) may then
# differ by SCORE_TOL absolute (4 flips of 200 test images); losses and other unbounded
# figures by REL_TOL relative; HD95 also by one voxel (surface distances are voxel-quantized).
# Counts (bytes, selections) and epsilon must be equal.
SCORE_TOL, REL_TOL, HD95_VOXEL = 0.02, 0.05, 1.0
SCORES = {"accuracy", "auc", "dice", "ssim", "unclipped_fraction", "clipped_fraction"}
EXACT = {"model_bytes", "bytes_sent", "selected", "epsilon"}
REPEATS = 3  # timed epochs per throughput figure (the median is reported)


def tolerance(metric: str) -> tuple[str, Callable[[float, float], bool]]:
    """How two values of ``metric`` may differ: its description and the test."""
    base = metric.partition("_class_")[0]
    if base in EXACT:
        return "equal (1e-9 rel)", lambda a, b: abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
    if base in SCORES:
        return f"{SCORE_TOL} abs", lambda a, b: abs(a - b) <= SCORE_TOL
    if base == "hd95":
        return f"{REL_TOL:.0%} rel or {HD95_VOXEL:g} voxel", \
            lambda a, b: abs(a - b) <= max(REL_TOL * max(abs(a), abs(b)), HD95_VOXEL)
    return f"{REL_TOL:.0%} rel", lambda a, b: abs(a - b) <= REL_TOL * max(abs(a), abs(b)) + 1e-12


@dataclass
class Ctx:
    device: torch.device
    quick: bool
    root: Path
    threads: int
    lines: list[str] = field(default_factory=list)
    runs: dict[str, Path] = field(default_factory=dict)  # run folders by name, shared between sections

    def emit(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# ---------------------------------------------------------------- jobs

def cls_body(ctx: Ctx, device: str, name: str, sites: int = 4) -> dict:
    """Synthetic binary classification: ``sites`` hospitals, small CNN, 2 rounds."""
    q = ctx.quick
    n_train, n_test = (48, 40) if q else (256, 200)
    return {
        "name": name, "seed": 0, "output": str(ctx.root / name), "rounds": 2, "device": device, "threads": ctx.threads,
        "data": {"source": "synthetic", "image_size": 16 if q else 32, "sites": [
            {"name": f"h{i}", "n_train": n_train, "n_val": 20 if q else 64, "n_test": n_test,
             "prevalence": 0.3 + 0.1 * i} for i in range(sites)]},
        "model": {"name": "small_cnn", "width": 16},
        "task": {"labels": "binary", "monitor": "auc"},
        "train": {"local_epochs": 1, "batch_size": 16 if q else 32, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9},
        "compare": ["local"],
    }


def seg_body(ctx: Ctx, device: str, name: str) -> dict:
    """Synthetic 3D segmentation: 2 hospitals, UNet trained on patches, sliding-window evaluation."""
    q = ctx.quick
    return {
        "name": name, "seed": 0, "output": str(ctx.root / name), "rounds": 2, "device": device, "threads": ctx.threads,
        "data": {"source": "synthetic_segmentation", "dims": 3, "image_size": 24 if q else 48, "sites": [
            {"name": f"h{i}", "n_train": 4 if q else 16, "n_val": 2 if q else 4, "n_test": 2 if q else 8,
             "prevalence": 0.5} for i in range(2)]},
        "transforms": {"patch": [16] * 3 if q else [32] * 3, "augment": [{"name": "flip"}]},
        "model": {"name": "unet", "width": 8},
        "task": {"kind": "segmentation", "num_classes": 2},
        "train": {"local_epochs": 1, "batch_size": 2 if q else 4, "lr": 0.003, "optimizer": "adam"},
        "compare": [],
    }


def dp_body(ctx: Ctx, device: str, name: str) -> dict:
    body = cls_body(ctx, device, name, sites=2)
    body["model"] = {"name": "small_cnn", "width": 16, "norm": "group"}  # DP-SGD: no batch norm
    body["privacy"] = {"dp_sgd": {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}}
    body["compare"] = []
    return body


def run(ctx: Ctx, body: dict) -> tuple[Path, float]:
    """Run the job of ``body`` (cached by name for later sections); its folder and seconds."""
    from medfed.config import parse_job
    from medfed.server.runner import run_job

    if body["name"] in ctx.runs:
        return ctx.runs[body["name"]], float("nan")
    t = time.perf_counter()
    out = run_job(parse_job(body), overwrite=True).run_dir
    ctx.runs[body["name"]] = out
    return out, time.perf_counter() - t


def metrics_of(run_dir: Path) -> dict[tuple, float | None]:
    from medfed.tracking.metrics import read_metrics

    return {(r["round"], r["arm"], r["site"], r["split"], r["metric"]): r["value"]
            for r in read_metrics(run_dir / "metrics.jsonl")}


def compare(ctx: Ctx, a: dict, b: dict, what: str) -> bool:
    """Every metric of two runs, grouped by name: records, max abs and rel difference, PASS."""
    ctx.emit(f"\n{what}\n")
    ctx.emit("| metric | records | max abs diff | max rel diff | tolerance | result |")
    ctx.emit("|---|---:|---:|---:|---|---|")
    ok_all = True
    missing = sorted(set(a) ^ set(b))
    if missing:
        ctx.emit(f"| (records in one run only) | {len(missing)} | | | equal sets | FAIL: e.g. {missing[0]} |")
        ok_all = False
    for metric in sorted({k[4] for k in a.keys() & b.keys()}):
        desc, within = tolerance(metric)
        keys = [k for k in a.keys() & b.keys() if k[4] == metric]
        abs_d = rel_d = 0.0
        bad = 0
        for k in keys:
            x, y = a[k], b[k]
            if x is None or y is None:
                bad += (x is None) != (y is None)  # undefined in one run only
                continue
            abs_d = max(abs_d, abs(x - y))
            rel_d = max(rel_d, abs(x - y) / max(abs(x), abs(y), 1e-12))
            bad += not within(x, y)
        ok_all &= bad == 0
        verdict = "PASS" if bad == 0 else f"FAIL ({bad} of {len(keys)})"
        ctx.emit(f"| {metric} | {len(keys)} | {abs_d:.3g} | {rel_d:.3g} | {desc} | {verdict} |")
    identical = not missing and all(a[k] == b[k] for k in a)
    ctx.emit(f"\nbitwise identical: {'yes' if identical else 'no'}")
    return ok_all


# ---------------------------------------------------------------- sections

def images_per_second(ctx: Ctx, body: dict, device: torch.device, n: int) -> float:
    """Images (patches, for segmentation) per second of one ``train_local`` epoch over ``n``
    training examples of the job's first site, after a one-batch warm-up: the median of
    REPEATS epochs."""
    from medfed.algorithms.base import SiteHook
    from medfed.config import parse_job
    from medfed.core.types import Arm
    from medfed.data.sites import build_sites
    from medfed.server.loop import make_plan
    from medfed.site.app import build_site_augment, model_for
    from medfed.site.train import train_local
    from medfed.tasks import build_task

    body = {**body, "data": {**body["data"], "sites": [{**body["data"]["sites"][0], "n_train": n, "n_val": 1, "n_test": 1}]}}
    job = parse_job(body)
    site = build_sites(job)[0]
    torch.manual_seed(0)  # the same initial weights whatever ran before
    model = model_for(job, site).to(device)
    task, augment = build_task(job), build_site_augment(job, site.train.spatial_dims)
    settings = make_plan(job, "gpu-check", Arm.FEDERATED, 1, 0).train
    warm = site.train.subset(torch.arange(min(settings.batch_size, n)))
    train_local(model, warm, task, settings, SiteHook(), device, augment=augment)
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats = train_local(model, site.train, task, settings, SiteHook(), device, augment=augment)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if not math.isfinite(stats.mean_loss):
            raise RuntimeError(f"{body['name']} on {device}: training loss {stats.mean_loss}")
    return (n - (n % settings.batch_size == 1)) / sorted(times)[len(times) // 2]  # a trailing batch of one is dropped


def s1_throughput(ctx: Ctx) -> bool:
    from medfed.site.device import set_threads

    q = ctx.quick
    two_d = {**cls_body(ctx, "cpu", "tp-2d", 1), "train": {"batch_size": 32, "lr": 0.01, "momentum": 0.9},
             "data": {"source": "synthetic", "image_size": 64, "sites": [{"name": "h0", "n_train": 1, "n_test": 1}]}}
    side, patch, width = (32, 16, 8) if q else (64, 48, 16)
    three_d = {**seg_body(ctx, "cpu", "tp-3d"), "model": {"name": "unet", "width": width},
               "data": {**seg_body(ctx, "cpu", "tp-3d")["data"], "image_size": side},
               "transforms": {"patch": [patch] * 3}, "train": {"batch_size": 4, "lr": 0.003, "optimizer": "adam"}}
    cases = [  # (what, body, examples on CPU, examples on the device)
        ("2D classification, small_cnn, 1x64x64, batch 32", two_d, 64 if q else 256, 64 if q else 2048),
        (f"3D segmentation, unet width {width}, 1x{side}x{side}x{side} volumes, patches {patch}^3, batch 4",
         three_d, 4 if q else 16, 8 if q else 128),
    ]
    if not q:
        cases.insert(1, ("2D classification, densenet121, 1x64x64, batch 32",
                         {**two_d, "model": {"name": "densenet121"}}, 64, 1024))
    ctx.emit(f"\n| training step (train_local) | images/s CPU ({os.cpu_count()} threads) | images/s {ctx.device.type}"
             f"{' (float16 autocast)' if ctx.device.type == 'cuda' else ''} | ratio |")
    ctx.emit("|---|---:|---:|---:|")
    for what, body, n_cpu, n_dev in cases:
        set_threads(os.cpu_count() or 1)
        cpu = images_per_second(ctx, body, torch.device("cpu"), n_cpu)
        dev = images_per_second(ctx, body, ctx.device, n_dev)
        ctx.emit(f"| {what} | {cpu:.1f} | {dev:.1f} | {dev / cpu:.2f}x |")
    return True


def s2_same_metrics(ctx: Ctx) -> bool:
    dev, ok = ctx.device.type, True
    for kind, make in (("classification (4 sites, 2 rounds, small_cnn, baseline local)", cls_body),
                       ("3D segmentation (2 sites, 2 rounds, unet, patches, sliding-window evaluation)", seg_body)):
        tag = "cls" if make is cls_body else "seg"
        cpu, t_cpu = run(ctx, make(ctx, "cpu", f"{tag}-cpu"))
        d1, t_d1 = run(ctx, make(ctx, dev, f"{tag}-{dev}-1"))
        d2, t_d2 = run(ctx, make(ctx, dev, f"{tag}-{dev}-2"))
        ctx.emit(f"\n#### {kind}: seconds cpu {t_cpu:.1f}, {dev} {t_d1:.1f} and {t_d2:.1f}")
        ok &= compare(ctx, metrics_of(cpu), metrics_of(d1), f"cpu against {dev}:")
        ok &= compare(ctx, metrics_of(d1), metrics_of(d2), f"{dev} against {dev} (repeatability):")
    return ok


def s3_dp_sgd(ctx: Ctx) -> bool:
    dev = ctx.device.type
    cpu, _ = run(ctx, dp_body(ctx, "cpu", "dp-cpu"))
    on_dev, _ = run(ctx, dp_body(ctx, dev, f"dp-{dev}"))
    a, b = metrics_of(cpu), metrics_of(on_dev)
    ctx.emit("\n| round | epsilon cpu | epsilon " + dev + " | equal | mean test AUC cpu | mean test AUC " + dev + " |")
    ctx.emit("|---:|---:|---:|---|---:|---:|")
    ok = True
    rounds = sorted({k[0] for k in a if k[4] == "epsilon"})
    for r in rounds:
        ea, eb = a.get((r, "federated", "all", "train", "epsilon")), b.get((r, "federated", "all", "train", "epsilon"))
        same = ea is not None and eb is not None and tolerance("epsilon")[1](ea, eb)
        ok &= same
        auc = [m.get((r, "federated", "all", "test", "auc")) for m in (a, b)]
        ctx.emit(f"| {r} | {ea} | {eb} | {'PASS' if same else 'FAIL'} | "
                 + " | ".join("-" if v is None else f"{v:.3f}" for v in auc) + " |")
    if not rounds:
        ctx.emit("no epsilon recorded: FAIL")
    return ok and bool(rounds)


def s4_autocast(ctx: Ctx) -> bool:
    """The dtype of the first conv layer's output while ``train_local`` runs on the device,
    the GradScaler's steps (a recording subclass stands in for torch.amp.GradScaler), and
    the training loss."""
    from medfed.algorithms.base import SiteHook
    from medfed.config import parse_job
    from medfed.core.types import Arm
    from medfed.data.sites import build_sites
    from medfed.server.loop import make_plan
    from medfed.site.app import model_for
    from medfed.site.train import train_local
    from medfed.tasks import build_task

    job = parse_job(cls_body(ctx, ctx.device.type, "amp"))
    site = build_sites(job)[0]
    torch.manual_seed(0)  # the same initial weights whatever ran before
    model = model_for(job, site).to(ctx.device)
    conv = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    dtypes: set[torch.dtype] = set()
    handle = conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    scalers: list = []
    original = torch.amp.GradScaler

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = 0
            scalers.append(self)

        def step(self, *args, **kwargs):
            self.steps += 1
            return super().step(*args, **kwargs)

    torch.amp.GradScaler = Recording
    try:
        stats = train_local(model, site.train, build_task(job), make_plan(job, "gpu-check", Arm.FEDERATED, 1, 0).train,
                            SiteHook(), ctx.device)
    finally:
        torch.amp.GradScaler = original
        handle.remove()
    cuda = ctx.device.type == "cuda"
    want = {torch.float16} if cuda else {torch.float32}
    steps = sum(s.steps for s in scalers)
    scale = scalers[0].get_scale() if scalers else None
    checks = [
        (f"conv output dtype during train_local ({type(conv).__name__})", ", ".join(sorted(map(str, dtypes))),
         dtypes == want),
        ("GradScaler steps / training steps", f"{steps} / {stats.num_steps}",
         steps == stats.num_steps if cuda else not scalers),
        ("GradScaler scale after training", "-" if scale is None else f"{scale:g}",
         (scale is not None and math.isfinite(scale) and scale > 0) if cuda else scale is None),
        ("mean training loss", f"{stats.mean_loss:.4f}", math.isfinite(stats.mean_loss)),
    ]
    ctx.emit(f"\n| check on {ctx.device.type} | seen | expected | result |")
    ctx.emit("|---|---|---|---|")
    expected = ["torch.float16" if cuda else "torch.float32", "equal" if cuda else "no GradScaler (not CUDA)",
                "finite, > 0" if cuda else "-", "finite"]
    for (what, seen, good), exp in zip(checks, expected):
        ctx.emit(f"| {what} | {seen} | {exp} | {'PASS' if good else 'FAIL'} |")
    return all(good for _, _, good in checks)


def s5_ray(ctx: Ctx) -> bool | None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        ctx.emit("\nray is not installed: section skipped")
        return None
    dev = ctx.device.type
    share = 0.25 if dev == "cuda" else 0.0
    inproc, _ = run(ctx, cls_body(ctx, dev, f"cls-{dev}-1"))
    body = {**cls_body(ctx, dev, f"cls-{dev}-ray"), "transport": "ray",
            "ray": {"gpus_per_site": share, "cpus_per_site": 1}}
    seen: list[str] = []  # the transport's "transport ray: N site actor(s) ..." line, logged before run.log opens
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("medfed").addHandler(handler)
    try:
        on_ray, t_ray = run(ctx, body)
    finally:
        logging.getLogger("medfed").removeHandler(handler)
    actors = next((m.split("transport ray: ", 1)[1] for m in seen if m.startswith("transport ray:")), "not logged")
    ctx.emit(f"\nray: gpus_per_site {share:g}, cpus_per_site 1, Ray instance of {ctx.threads} CPUs; "
             f"actors: {actors}; seconds: ray {t_ray:.1f}")
    return compare(ctx, metrics_of(inproc), metrics_of(on_ray), f"in-process {dev} against ray {dev}:")


SECTIONS = [("1. Throughput", s1_throughput), ("2. Same metrics", s2_same_metrics), ("3. DP-SGD", s3_dp_sgd),
            ("4. Mixed precision (autocast, GradScaler)", s4_autocast), ("5. Ray with fractional GPUs", s5_ray)]


def environment(ctx: Ctx) -> None:
    import medfed

    ctx.emit("| environment | |")
    ctx.emit("|---|---|")
    rows = [("python", platform.python_version()), ("torch", torch.__version__), ("medfed", getattr(medfed, "__version__", "?")),
            ("CPU cores", str(os.cpu_count())), ("device checked", str(ctx.device)), ("sizes", "quick" if ctx.quick else "full")]
    if ctx.device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            driver = f"unknown ({e})"
        rows += [("CUDA (torch)", str(torch.version.cuda)), ("GPU", torch.cuda.get_device_name()), ("driver", driver)]
    for mod in ("monai", "opacus", "ray"):
        try:
            rows.append((mod, __import__(mod).__version__))
        except ImportError:
            rows.append((mod, "not installed"))
    for k, v in rows:
        ctx.emit(f"| {k} | {v} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    ap.add_argument("--root", type=Path, default=None, help="where the runs are written (default: a new temp folder)")
    ap.add_argument("--sections", default="1,2,3,4,5", help="which sections to run, e.g. 2,5 (default: all)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False); "
                 "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu for a smoke run")
    root = args.root or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Ctx(torch.device(args.device), args.quick, root, os.cpu_count() or 1)
    started = time.perf_counter()
    ctx.emit(f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')}): python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}\n")
    environment(ctx)
    results = {}
    chosen = {int(k) for k in args.sections.split(",") if k.strip()}
    for title, section in (sec for i, sec in enumerate(SECTIONS, 1) if i in chosen):
        ctx.emit(f"\n### {title}")
        t = time.perf_counter()
        try:
            results[title] = section(ctx)
        except Exception as e:  # a failed section is reported; the others still run
            tail = "".join(traceback.format_exception(e)).rstrip().splitlines()[-8:]
            ctx.emit("\n```\n" + "\n".join(tail) + "\n```")
            results[title] = False
        ctx.emit(f"\n({title}: {time.perf_counter() - t:.0f} s)")
    ctx.emit("\n### Summary\n\n| section | result |\n|---|---|")
    for title, ok in results.items():
        ctx.emit(f"| {title} | {'skipped' if ok is None else 'PASS' if ok else 'FAIL'} |")
    ctx.emit(f"\ntotal {time.perf_counter() - started:.0f} s; runs in {root}")
    args.out.write_text("\n".join(ctx.lines) + "\n")
    print(f"written to {args.out}")
    return 1 if any(ok is False for ok in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
