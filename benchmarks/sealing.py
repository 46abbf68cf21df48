"""What sealing a relayed model costs (topology cyclic and swarm in a deployment):
transport/pki/sealing.py against the plain encoding of the same model.

Usage: python benchmarks/sealing.py [--sizes 1,10,100] [--recipients 3] [--repeats 5]

For models of each size (MB of float32), measured side by side in one process, medians
over the repeats: the time to encode the model (codec.encode_model, what any message
costs), to seal it for the recipients (encryption, key wrapping per recipient, signature)
and to open it at one recipient (certificate checks, signature, decryption), the size of
the sealed message on the wire (JSON, base64) against the encoded model, and the ratios.
Kits come from a consortium provisioned in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from deploy_kits import make_kits  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from medfed.core import codec  # noqa: E402
from medfed.transport.pki import load_kit  # noqa: E402
from medfed.transport.pki.sealing import Envelope, Label, Sealer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,100", help="model sizes in MB, comma-separated")
    ap.add_argument("--recipients", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    names = [f"site{i}" for i in range(args.recipients + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        kits, _ = make_kits(Path(tmp), sites=names)
        loaded = {n: load_kit(kits / n, role="site") for n in names}
    sealers = {n: Sealer(n, k.key_pem, k.cert_pem, k.ca_pem) for n, k in loaded.items()}
    der = {n: x509.load_pem_x509_certificate(k.cert_pem).public_bytes(serialization.Encoding.DER)
           for n, k in loaded.items()}
    sender, receivers = names[0], names[1:]
    print(f"| model MB | encode ms | seal ms ({args.recipients} recipients) | open ms | seal / encode | "
          "open / encode | wire MB (sealed, JSON) | wire / encoded |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mb in (float(x) for x in args.sizes.split(",")):
        n = int(mb * 1e6 / 4)
        params = {"w": torch.randn(n, generator=torch.Generator().manual_seed(0))}
        label = Label("bench", 1, "trained", sender, 100)
        enc, seal, opn = [], [], []
        wire = encoded = 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            blob = bytes(codec.encode_model(params, {}))
            t1 = time.perf_counter()
            env = sealers[sender].seal(blob, label, {r: der[r] for r in receivers})
            t2 = time.perf_counter()
            out = sealers[receivers[0]].open(Envelope.parse(env.to_wire(), "bench", 2 * len(blob)), label)
            t3 = time.perf_counter()
            assert out == blob
            enc.append(t1 - t0)
            seal.append(t2 - t1)
            opn.append(t3 - t2)
            encoded = len(blob)
            wire = len(json.dumps(env.to_wire()))
        e, s, o = (statistics.median(v) * 1e3 for v in (enc, seal, opn))
        print(f"| {mb:g} | {e:.1f} | {s:.1f} | {o:.1f} | {s / e:.1f}x | {o / e:.1f}x | {wire / 1e6:.1f} | "
              f"{wire / encoded:.2f}x |")


if __name__ == "__main__":
    main()
