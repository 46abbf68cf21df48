"""Cost of homomorphic aggregation (privacy.he, CKKS with TenSEAL) against secure
aggregation and the plain weighted mean, per round, on this machine.

    python benchmarks/he.py [--sites 3,10] [--models small_cnn,unet] [--repeats 3]

For each model (medfed's ``small_cnn`` classifier and 2D ``unet`` segmenter, default
widths; their floating-point entries, flattened) and number of sites n, every site's
change is a random N(0, 0.01^2) vector and its weight a training-set size drawn from
[20, 200]. One round is timed, side by side in one process, methods alternating:

* plain: the example-weighted mean of the n changes in float64 (the server, no protection);
* secagg: one whole secure-aggregation round in memory (privacy/secagg/protocol.py's
  ``run_round``: keys, Shamir shares, fixed-point encoding and masking of ``w_i * change``,
  the masked sum, unmasking), every party's work added up; clip range 1, no dropouts;
* he: privacy/he/ckks.py as the round uses it: every site encrypts ``n_i * change``
  (reported per site), the server deserializes and adds the n ciphertext sets, one
  decryptor deserializes the sum and decrypts it, the server divides.

Bytes per site: what a site sends for its update (plain and secagg: 4 bytes per value,
float32 or the int32 ring; he: the ciphertexts' exact bytes); secure aggregation's key
exchange messages are not counted. Precision: max abs error of the method's weighted mean
against the plain one. Times are medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from medfed.config import parse_job
from medfed.models import build_model
from medfed.privacy.he import ckks
from medfed.privacy.secagg.masking import FixedPoint
from medfed.privacy.secagg.protocol import default_threshold, run_round
from medfed.privacy.settings import HomomorphicEncryption

SITES = [{"name": "a", "n_train": 4, "n_test": 2}, {"name": "b", "n_train": 4, "n_test": 2}]
MODELS = {
    "small_cnn": ({"name": "small_cnn"}, {"labels": "binary"}, "synthetic"),
    "unet": ({"name": "unet"}, {"kind": "segmentation", "num_classes": 2}, "synthetic_segmentation"),
}


def model_values(name: str) -> int:
    model, task, source = MODELS[name]
    job = parse_job({"name": "b", "output": "o", "rounds": 1, "data": {"source": source, "sites": SITES},
                     "model": model, "task": task})
    net = build_model(job.model, job.task, 1, 2)
    return sum(t.numel() for t in net.state_dict().values() if t.is_floating_point())


def plain(changes: list[np.ndarray], sizes: list[int]) -> tuple[np.ndarray, dict]:
    t0 = time.perf_counter()
    acc = np.zeros_like(changes[0])
    for c, n in zip(changes, sizes):
        acc += n * c
    mean = acc / sum(sizes)
    return mean, {"server": time.perf_counter() - t0}


def secagg(changes: list[np.ndarray], sizes: list[int]) -> tuple[np.ndarray, dict]:
    n, total = len(changes), sum(sizes)
    codec = FixedPoint(1.0, n)
    names = [f"site{i:02d}" for i in range(n)]
    t0 = time.perf_counter()
    ring = {s: codec.encode(torch.from_numpy(c * (k / total)), torch.Generator().manual_seed(i))
            for i, (s, c, k) in enumerate(zip(names, changes, sizes))}
    mean = codec.decode_sum(run_round(ring, default_threshold(n))).numpy()
    return mean, {"round": time.perf_counter() - t0}


def he(changes: list[np.ndarray], sizes: list[int], ctx, public, settings) -> tuple[np.ndarray, dict]:
    n_values = changes[0].size
    k = ckks.chunks(n_values, settings)
    t0 = time.perf_counter()
    rows = [ckks.encrypt(ctx, c * n, settings) for c, n in zip(changes, sizes)]
    t1 = time.perf_counter()
    total = None
    for r in rows:
        total = ckks.add_into(total, ckks.read_ciphertexts(public, r, k, settings))
    wire = np.stack([np.frombuffer(v.serialize(), dtype=np.uint8) for v in total])
    t2 = time.perf_counter()
    plain_sum = ckks.decrypt(ctx, ckks.read_ciphertexts(ctx, wire, k, settings), n_values)
    t3 = time.perf_counter()
    mean = plain_sum / sum(sizes)
    return mean, {"encrypt_per_site": (t1 - t0) / len(changes), "add": t2 - t1, "decrypt": t3 - t2,
                  "round": time.perf_counter() - t0, "bytes": rows[0].nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="3,10")
    ap.add_argument("--models", default="small_cnn,unet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale-bits", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = HomomorphicEncryption(scale_bits=args.scale_bits)
    ctx = ckks.new_context(settings)
    public = ckks.public_copy(ctx)
    rows = []
    for name in args.models.split(","):
        p = model_values(name)
        for n in (int(x) for x in args.sites.split(",")):
            rng = np.random.default_rng(0)
            changes = [rng.normal(0, 0.01, p) for _ in range(n)]
            sizes = [int(x) for x in rng.integers(20, 201, n)]
            methods = {"plain": lambda: plain(changes, sizes), "secagg": lambda: secagg(changes, sizes),
                       "he": lambda: he(changes, sizes, ctx, public, settings)}
            times: dict[str, list[dict]] = {m: [] for m in methods}
            errors: dict[str, float] = {}
            reference = plain(changes, sizes)[0]
            order = list(methods)
            for r in range(args.repeats):
                for m in order[r % 3:] + order[: r % 3]:  # alternate which method goes first
                    mean, t = methods[m]()
                    times[m].append(t)
                    errors[m] = max(errors.get(m, 0.0), float(np.abs(mean - reference).max()))

            def med(m: str, key: str) -> float:
                return statistics.median(t[key] for t in times[m])

            row = {
                "model": name, "values": p, "sites": n,
                "plain_s": med("plain", "server"), "secagg_s": med("secagg", "round"),
                "he_s": med("he", "round"), "he_encrypt_s": med("he", "encrypt_per_site"),
                "he_add_s": med("he", "add"), "he_decrypt_s": med("he", "decrypt"),
                "plain_bytes": 4 * p, "he_bytes": times["he"][0]["bytes"],
                "secagg_err": errors["secagg"], "he_err": errors["he"],
            }
            rows.append(row)
            print(f"{name} P={p:,} n={n}: plain {row['plain_s']:.4f} s, secagg {row['secagg_s']:.3f} s, "
                  f"he {row['he_s']:.3f} s (encrypt/site {row['he_encrypt_s']:.3f}, add {row['he_add_s']:.3f}, "
                  f"decrypt {row['he_decrypt_s']:.3f}), he bytes/site {row['he_bytes']:,}, "
                  f"err secagg {row['secagg_err']:.2e} he {row['he_err']:.2e}", flush=True)
    print()
    print("| model | values | sites | plain mean (s) | secagg round (s) | HE round (s) | HE encrypt per site (s) "
          "| HE server add (s) | HE decrypt (s) | bytes/site plain, secagg | bytes/site HE | max abs error secagg "
          "| max abs error HE |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['values']:,} | {r['sites']} | {r['plain_s']:.4f} | {r['secagg_s']:.3f} | "
              f"{r['he_s']:.3f} | {r['he_encrypt_s']:.3f} | {r['he_add_s']:.3f} | {r['he_decrypt_s']:.3f} | "
              f"{r['plain_bytes'] / 1e6:.2f} MB | {r['he_bytes'] / 1e6:.2f} MB ({r['he_bytes'] / r['plain_bytes']:.1f}x) "
              f"| {r['secagg_err']:.1e} | {r['he_err']:.1e} |")


if __name__ == "__main__":
    main()
