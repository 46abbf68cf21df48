"""What signed key advertisements cost (privacy/secagg/signing.py): time per site per round
and bytes on the wire, against the unsigned advertisements of a simulation.

Usage: python benchmarks/secagg_signing.py [--sites 3,10,30,100] [--repeats 3]

For each consortium size n it provisions real kits (``medfed.transport.pki.provision``) in a
temporary folder, then times, for one site: signing its advertisement, and checking all n
advertisements of a roster (certificate against the CA, validity, usages, names, the
signature), the work each site adds per round; medians of ``--repeats``. Bytes: one
advertisement as JSON, unsigned and signed, and the roster each site receives (n of them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from medfed.privacy.secagg import ServerSession, SiteSession
from medfed.privacy.secagg.messages import Advertisement
from medfed.privacy.secagg.signing import Credentials
from medfed.transport.pki import load_kit, provision


def kits(folder: Path, n: int) -> dict[str, Credentials]:
    sites = [f"site{i:03d}" for i in range(n)]
    cons = folder / "consortium.yaml"
    cons.write_text(yaml.safe_dump({"name": "bench", "server": {"host": "127.0.0.1", "port": 50051}, "sites": sites}))
    provision(cons, folder / "kits")
    return {s: Credentials.from_kit(load_kit(folder / "kits" / s, role="site")) for s in sites}


def measure(n: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        creds = kits(Path(tmp), n)
    server = ServerSession("job", 1, 2, 4)
    sessions = {s: SiteSession(s, "job", 1, c) for s, c in creds.items()}
    for s, session in sessions.items():
        server.receive_advertisement(s, session.advertise())
    roster = server.roster()
    parsed = {s: Advertisement.parse(ad, "bench") for s, ad in roster.items()}
    me = next(iter(creds.values()))
    ad = parsed[me.site]
    sign, check = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        me.sign(Advertisement(ad.c_pk, ad.s_pk), "job", 1)
        sign.append(time.perf_counter() - t)
        t = time.perf_counter()
        for s, a in parsed.items():
            me.check(s, a, "job", 1)
        check.append(time.perf_counter() - t)
    unsigned = len(json.dumps(Advertisement(ad.c_pk, ad.s_pk).to_wire()))
    return {"sites": n, "sign_ms": 1e3 * statistics.median(sign), "check_all_ms": 1e3 * statistics.median(check),
            "ad_bytes_unsigned": unsigned, "ad_bytes_signed": len(json.dumps(roster[me.site])),
            "roster_bytes_signed": len(json.dumps(roster)),
            "roster_bytes_unsigned": len(json.dumps({s: Advertisement(a.c_pk, a.s_pk).to_wire() for s, a in parsed.items()}))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="3,10,30,100")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| sites | sign (ms) | check all n (ms) | advertisement (B), unsigned / signed | roster (B), unsigned / signed |")
    print("| --- | --- | --- | --- | --- |")
    for n in (int(x) for x in args.sites.split(",")):
        r = measure(n, args.repeats)
        print(f"| {n} | {r['sign_ms']:.2f} | {r['check_all_ms']:.1f} | {r['ad_bytes_unsigned']} / {r['ad_bytes_signed']} "
              f"| {r['roster_bytes_unsigned']:,} / {r['roster_bytes_signed']:,} |")


if __name__ == "__main__":
    main()
