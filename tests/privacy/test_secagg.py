"""Secure aggregation: Shamir sharing, the fixed-point ring, and the protocol's sum, dropout,
abort, privacy and message-validation invariants."""

from __future__ import annotations

import base64
import inspect
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from medfed.core.errors import RoundError
from medfed.privacy.secagg import (
    RING,
    FixedPoint,
    SecAggError,
    ServerSession,
    SiteSession,
    add_masks,
    check_threshold,
    default_threshold,
    prg,
    remove_masks,
    run_round,
    shamir,
)

FAST = settings(max_examples=30, deadline=None)


def ring_vec(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, RING, (length,), generator=torch.Generator().manual_seed(seed))


# --- Shamir ---------------------------------------------------------------------------------


@FAST
@given(
    secret=st.binary(min_size=0, max_size=shamir.MAX_SECRET_BYTES),
    n=st.integers(2, 9),
    data=st.data(),
    seed=st.integers(0, 2**64),
)
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(secret, n, data, seed):
    t = data.draw(st.integers(2, n))
    # a real PRNG: hypothesis' own randoms may draw all-zero coefficients, the one case
    # (probability 2^-521 per coefficient) where t - 1 shares do give the secret away
    shares = shamir.share(secret, n, t, random.Random(seed))
    assert [x for x, _ in shares] == list(range(1, n + 1))
    subset = data.draw(st.permutations(shares)).copy()
    assert shamir.reconstruct(subset[:t], t, len(secret)) == secret
    assert shamir.reconstruct(subset, t, len(secret)) == secret  # more than t is fine
    try:
        got = shamir.reconstruct(subset[: t - 1], t - 1, len(secret))
    except ValueError:
        got = None  # the interpolated value does not even fit: as good as random
    assert got != secret


def test_shamir_refuses_duplicate_x_and_too_few_shares():
    shares = shamir.share(b"k" * 32, 5, 3, random.Random(0))
    with pytest.raises(ValueError, match="appears twice"):
        shamir.reconstruct([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(ValueError, match="2 shares cannot reconstruct a secret shared with threshold 3"):
        shamir.reconstruct(shares[:2], 3)
    with pytest.raises(ValueError, match="at most 65 bytes"):
        shamir.share(bytes(66), 3, 2)


def test_shamir_default_randomness_gives_fresh_shares():
    a, b = shamir.share(bytes(32), 3, 2), shamir.share(bytes(32), 3, 2)
    assert a != b
    assert shamir.reconstruct(a[1:], 2) == shamir.reconstruct(b[:2], 2) == bytes(32)


# --- fixed point and PRG ------------------------------------------------------------------------


@FAST
@given(
    clip=st.floats(1e-3, 1e3),
    max_sites=st.integers(1, 64),
    data=st.data(),
    seed=st.integers(0, 2**31),
)
def test_fixed_point_sum_within_m_steps(clip, max_sites, data, seed):
    fp = FixedPoint(clip, max_sites)
    f = fp.frac_bits
    assert max_sites * clip * 2.0**f < 2**31 <= max_sites * math.ceil(clip * 2.0 ** (f + 1))
    assert fp.step == 2.0**-f
    m = data.draw(st.integers(1, max_sites))
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.rand(7, generator=g, dtype=torch.float64) * 3 - 1.5) * clip for _ in range(m)]
    ring = sum(fp.encode(x, g) for x in xs) % RING
    want = sum(x.clamp(-clip, clip) for x in xs)
    assert (fp.decode_sum(ring) - want).abs().max() <= m * fp.step * (1 + 1e-9)


@FAST
@given(clip=st.floats(1e-3, 1e3), max_sites=st.integers(1, 64))
def test_fixed_point_never_wraps_at_the_clip_range(clip, max_sites):
    fp = FixedPoint(clip, max_sites)
    g = torch.Generator().manual_seed(0)
    for sign in (1.0, -1.0):
        x = torch.full((5,), sign * clip * 10, dtype=torch.float64)  # clipped to ±clip
        ring = sum(fp.encode(x, g) for _ in range(max_sites)) % RING
        got = fp.decode_sum(ring)
        assert torch.all(got * sign > 0)
        assert (got - sign * clip * max_sites).abs().max() <= max_sites * fp.step


def test_fixed_point_rounding_is_unbiased_and_seeded():
    fp = FixedPoint(1.0, 2**20)  # a coarse step, so rounding matters
    x = torch.full((200_000,), 0.3 * fp.step + 0.5, dtype=torch.float64)
    a = fp.encode(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, fp.encode(x, torch.Generator().manual_seed(7)))
    mean = float(fp.decode_sum(a).mean())
    assert abs(mean - float(x[0])) < 5 * fp.step * 0.5 / math.sqrt(len(x))
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="clip_range"):
        FixedPoint(0.0, 3)


def test_prg_is_deterministic_uniform_ring_values():
    a = prg(b"\x01" * 32, 100_000)
    assert a.dtype == torch.int64 and a.shape == (100_000,)
    assert torch.equal(a, prg(b"\x01" * 32, 100_000))
    assert torch.equal(a[:10], prg(b"\x01" * 32, 10))  # a prefix of the same stream
    assert not torch.equal(a, prg(b"\x02" * 32, 100_000))
    assert int(a.min()) >= 0 and int(a.max()) < RING and int(a.max()) > RING - RING // 1000
    x = ring_vec(1000, 0)
    masks = [(b"\x03" * 32, 1), (b"\x04" * 32, -1)]
    assert torch.equal(remove_masks(add_masks(x, masks), masks), x)


# --- the protocol's sum -----------------------------------------------------------------------------


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 8))
    names = draw(st.lists(st.text("abcxyz_0", min_size=1, max_size=5), min_size=n, max_size=n, unique=True))
    t = draw(st.integers(2, n))
    before = draw(st.sets(st.sampled_from(names), max_size=n - t))
    left = sorted(set(names) - before)
    after = draw(st.sets(st.sampled_from(left), max_size=len(left) - t))
    return names, t, sorted(before), sorted(after), draw(st.integers(1, 12)), draw(st.integers(0, 2**31))


@FAST
@given(rounds())
def test_unmasked_sum_equals_plain_sum(case):
    names, t, before, after, length, seed = case
    fp = FixedPoint(2.0, len(names))
    g = torch.Generator().manual_seed(seed)
    floats = {v: torch.randn(length, generator=g, dtype=torch.float64) for v in names}
    ring = {v: fp.encode(x, g) for v, x in floats.items()}
    got = run_round(ring, t, drop_before_masking=before, drop_after_masking=after, job_id="j", rnd=seed % 7)
    counted = [v for v in names if v not in before]
    assert torch.equal(got, sum(ring[v] for v in counted) % RING)
    want = sum(floats[v].clamp(-2.0, 2.0) for v in counted)
    assert (fp.decode_sum(got) - want).abs().max() <= len(counted) * fp.step


def test_site_dropping_before_masking_is_left_out():
    x = {v: ring_vec(50, i) for i, v in enumerate("abcde")}
    got = run_round(x, 3, drop_before_masking=["c"])
    assert torch.equal(got, (x["a"] + x["b"] + x["d"] + x["e"]) % RING)
    got = run_round(x, 2, drop_before_sharing=["a"], drop_before_masking=["e"], drop_after_masking=["b"])
    assert torch.equal(got, (x["b"] + x["c"] + x["d"]) % RING)


def test_too_few_survivors_abort_the_round():
    x = {v: ring_vec(8, i) for i, v in enumerate("abcd")}
    with pytest.raises(SecAggError, match=r"only 2 sites answered the unmasking, the threshold is 3; the round is aborted"):
        run_round(x, 3, drop_after_masking=["a", "b"])
    with pytest.raises(SecAggError, match=r"only 2 sites sent their masked input, the threshold is 3; the round is aborted"):
        run_round(x, 3, drop_before_masking=["c", "d"])
    with pytest.raises(RoundError, match=r"only 1 sites shared their keys, the threshold is 2"):
        run_round(x, 2, drop_before_sharing=["a", "b", "c"])


def test_threshold_rule():
    assert [default_threshold(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    check_threshold(3, 5)
    for bad, n in ((1, 5), (6, 5), (True, 5), (2.0, 5)):
        with pytest.raises(SecAggError, match="threshold"):
            check_threshold(bad, n)
    with pytest.raises(SecAggError, match="threshold"):
        ServerSession("job", 1, 1, 10)


# --- privacy ---------------------------------------------------------------------------------------


def masked_vectors(inputs: dict[str, torch.Tensor], t: int = 2) -> dict[str, torch.Tensor]:
    """What reaches the server's receive_masked in one honest round."""
    server, sites = ServerSession("job", 1, t, len(next(iter(inputs.values())))), {}
    for v in inputs:
        sites[v] = SiteSession(v, "job", 1)
        server.receive_advertisement(v, sites[v].advertise())
    roster = server.roster()
    for v, s in sites.items():
        server.receive_shares(v, s.share_keys(roster, t))
    out = {}
    for v, s in sites.items():
        out[v] = s.mask(inputs[v], server.ciphertexts_for(v))
        server.receive_masked(v, out[v])
    return out


def test_one_masked_update_is_independent_of_its_input():
    n = 50_000
    critical = stats.chi2.isf(1e-6, 15)
    for x in (torch.zeros(n, dtype=torch.int64), torch.full((n,), 2**31 + 12345, dtype=torch.int64)):
        y = masked_vectors({"a": x, "b": ring_vec(n, 1), "c": ring_vec(n, 2)})["a"]
        counts = torch.bincount(y >> 28, minlength=16).double()
        chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
        assert chi2 < critical, f"masked values are not uniform on [0, 2^32): chi2={chi2:.1f}"
    x = ring_vec(n, 3)
    y = masked_vectors({"a": x, "b": ring_vec(n, 4), "c": ring_vec(n, 5)})["a"]
    r = float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])
    assert abs(r) < 0.03


def test_server_has_no_api_taking_a_plain_input():
    public = {k for k in dir(ServerSession) if not k.startswith("_")}
    assert public == {
        "receive_advertisement", "roster", "receive_shares", "ciphertexts_for", "receive_masked",
        "survivors", "dropped", "unmask_request", "receive_unmask", "result",
        "roster_for", "unmask_request_for",  # SecAgg+: each site's part (graph.py)
    }  # fmt: skip
    for k in public:
        member = getattr(ServerSession, k)
        if callable(member):
            assert set(inspect.signature(member).parameters) <= {"self", "site", "msg", "masked"}, k
    x = {v: ring_vec(1000, i) for i, v in enumerate("abc")}
    for v, y in masked_vectors(x).items():
        assert float((y == x[v]).double().mean()) < 0.01


# --- messages ----------------------------------------------------------------------------------------


def staged(n: int = 3, t: int = 2, length: int = 4):
    """A server and sites up to the point where each site has its ciphertexts."""
    names = [chr(ord("a") + i) for i in range(n)]
    server, sites = ServerSession("job", 1, t, length), {v: SiteSession(v, "job", 1) for v in names}
    msgs = {"advertise": {}, "shares": {}, "ciphertexts": {}}
    for v, s in sites.items():
        msgs["advertise"][v] = s.advertise()
        server.receive_advertisement(v, msgs["advertise"][v])
    msgs["roster"] = server.roster()
    for v, s in sites.items():
        msgs["shares"][v] = s.share_keys(msgs["roster"], t)
        server.receive_shares(v, msgs["shares"][v])
    for v in names:
        msgs["ciphertexts"][v] = server.ciphertexts_for(v)
    return server, sites, msgs


def test_messages_are_json_and_round_trip():
    server, sites, msgs = staged()
    for v, s in sites.items():
        server.receive_masked(v, s.mask(ring_vec(4, 0), msgs["ciphertexts"][v]))
    msgs["request"] = server.unmask_request()
    msgs["answer"] = sites["a"].unmask(**msgs["request"])
    for msg in msgs.values():
        assert json.loads(json.dumps(msg)) == msg
    assert msgs["request"] == {"survivors": ["a", "b", "c"], "dropped": []}
    assert set(msgs["answer"]) == {"b_shares", "s_shares"} and set(msgs["answer"]["b_shares"]) == {"a", "b", "c"}


def flip(b64: str) -> str:
    data = bytearray(base64.b64decode(b64))
    data[-3] ^= 1
    return base64.b64encode(bytes(data)).decode()


def test_tampered_or_misaddressed_ciphertexts_are_refused():
    _, sites, msgs = staged()
    received = dict(msgs["ciphertexts"]["c"])
    with pytest.raises(SecAggError, match=r"site 'c', field 'received.a': the key shares from site 'a' do not decrypt"):
        sites["c"].mask(ring_vec(4, 0), {**received, "a": flip(received["a"])})
    misaddressed = msgs["ciphertexts"]["b"]["a"]  # a -> b, handed to c as if a -> c
    with pytest.raises(SecAggError, match=r"site 'c', field 'received.a'.*addressed to another site"):
        sites["c"].mask(ring_vec(4, 0), {**received, "a": misaddressed})
    with pytest.raises(SecAggError, match=r"site 'c', field 'received.b'.*do not decrypt"):
        sites["c"].mask(ring_vec(4, 0), {"a": received["a"], "b": received["a"]})  # a's box relabelled as b's
    with pytest.raises(SecAggError, match=r"site 'c', field 'received.z': site 'z' is not in this round's roster"):
        sites["c"].mask(ring_vec(4, 0), {**received, "z": received["a"]})
    with pytest.raises(SecAggError, match=r"site 'c', field 'received.a': not valid base64"):
        sites["c"].mask(ring_vec(4, 0), {**received, "a": "%%%notbase64%%%"})
    sites["c"].mask(ring_vec(4, 0), received)  # the untouched ones still work


@pytest.mark.parametrize(
    "msg, pattern",
    [
        ({"c_pk": 5, "s_pk": "AA=="}, r"site 'x', field 'advertisement.c_pk': expected a base64 string, got int"),
        ({"c_pk": "not base64!", "s_pk": "AA=="}, r"site 'x', field 'advertisement.c_pk': not valid base64"),
        ({"c_pk": base64.b64encode(bytes(31)).decode(), "s_pk": "AA=="}, r"field 'advertisement.c_pk': expected 32 bytes, got 31"),
        ({"c_pk": "AA=="}, r"site 'x', field 'advertisement': missing \['s_pk'\]"),
        ("c_pk", r"site 'x', field 'advertisement': expected an object"),
    ],
)
def test_server_refuses_bad_advertisements(msg, pattern):
    with pytest.raises(SecAggError, match=pattern):
        ServerSession("job", 1, 2, 4).receive_advertisement("x", msg)


def test_server_refuses_bad_shares_and_masked_inputs():
    names = "abc"
    server, sites = ServerSession("job", 1, 2, 4), {v: SiteSession(v, "job", 1) for v in names}
    for v, s in sites.items():
        server.receive_advertisement(v, s.advertise())
    roster = server.roster()
    with pytest.raises(SecAggError, match=r"site 'z': sent key shares but is not in this round's roster"):
        server.receive_shares("z", {"shares": {}})
    good = sites["a"].share_keys(roster, 2)
    with pytest.raises(SecAggError, match=r"site 'a', field 'shares': missing \['c'\], unexpected \['z'\]"):
        server.receive_shares("a", {"shares": {"b": good["shares"]["b"], "z": good["shares"]["c"]}})
    with pytest.raises(SecAggError, match=r"site 'a', field 'shares.b': expected 30 to 8192 bytes, got 3"):
        server.receive_shares("a", {"shares": {**good["shares"], "b": "AAAA"}})
    server.receive_shares("a", good)
    with pytest.raises(SecAggError, match=r"site 'a': sent key shares twice"):
        server.receive_shares("a", good)
    server.receive_shares("b", sites["b"].share_keys(roster, 2))
    with pytest.raises(SecAggError, match=r"site 'c': did not share its keys in time"):
        server.ciphertexts_for("c")
    with pytest.raises(SecAggError, match=r"site 'c': its key shares came after that stage closed"):
        server.receive_shares("c", sites["c"].share_keys(roster, 2))
    for bad, pattern in [
        (torch.zeros(4, dtype=torch.int32), "expected dtype torch.int64"),
        (torch.zeros(5, dtype=torch.int64), r"expected shape \(4,\), got \(5,\)"),
        (torch.full((4,), RING, dtype=torch.int64), r"values must lie in \[0, 2\^32\)"),
        (torch.full((4,), -1, dtype=torch.int64), r"values must lie in \[0, 2\^32\)"),
        ([0, 0, 0, 0], "expected a torch.Tensor"),
    ]:
        with pytest.raises(SecAggError, match=rf"site 'a': masked input: {pattern}"):
            server.receive_masked("a", bad)
    with pytest.raises(SecAggError, match=r"site 'c': sent a masked input but did not share keys"):
        server.receive_masked("c", torch.zeros(4, dtype=torch.int64))


def test_site_refuses_a_roster_without_its_own_keys():
    a, b, c = (SiteSession(v, "job", 1) for v in "abc")
    roster = {"a": a.advertise(), "b": b.advertise(), "c": c.advertise()}
    with pytest.raises(SecAggError, match=r"site 'a', field 'roster.a': not the keys this site advertised"):
        a.share_keys({**roster, "a": roster["b"]}, 2)
    with pytest.raises(SecAggError, match=r"site 'b': threshold: must satisfy 2 <= threshold <= 3"):
        b.share_keys(roster, 4)
    with pytest.raises(SecAggError, match=r"site 'c': advertise\(\) called out of order"):
        c.advertise()


def test_site_refuses_unsafe_unmask_requests():
    _, sites, msgs = staged(n=4, t=3)
    for v, s in sites.items():
        s.mask(ring_vec(4, 0), msgs["ciphertexts"][v])
    a = sites["a"]
    with pytest.raises(SecAggError, match=r"site 'a': sites \['b'\] are listed as both survivors and dropped"):
        a.unmask(["a", "b", "c"], ["b", "d"])
    with pytest.raises(SecAggError, match=r"site 'a': only 2 survivors, the threshold is 3"):
        a.unmask(["a", "b"], ["c", "d"])
    with pytest.raises(SecAggError, match=r"site 'a': it holds no share of sites \['q'\]"):
        a.unmask(["a", "b", "c", "q"], ["d"])
    with pytest.raises(SecAggError, match=r"site 'a', field 'survivors': a site is listed twice"):
        a.unmask(["a", "b", "b"], ["c", "d"])
    answer = a.unmask(["a", "b", "c"], ["d"])
    assert set(answer["b_shares"]) == {"a", "b", "c"} and set(answer["s_shares"]) == {"d"}
    with pytest.raises(SecAggError, match=r"site 'a': unmask\(\) called out of order"):
        a.unmask(["a", "b", "d"], ["c"])  # a second answer could reveal c's b and s_sk shares


def test_server_refuses_bad_unmask_answers():
    server, sites, msgs = staged(n=3, t=2)
    for v in "ab":
        server.receive_masked(v, sites[v].mask(ring_vec(4, 0), msgs["ciphertexts"][v]))
    request = server.unmask_request()
    assert request == {"survivors": ["a", "b"], "dropped": ["c"]}
    answer = sites["a"].unmask(**request)
    with pytest.raises(SecAggError, match=r"site 'c': answered the unmasking but is not a survivor"):
        server.receive_unmask("c", answer)
    bad = {**answer, "s_shares": {"c": base64.b64encode(bytes(10)).decode()}}
    with pytest.raises(SecAggError, match=r"site 'a', field 's_shares.c': expected 66 bytes, got 10"):
        server.receive_unmask("a", bad)
    bad = {**answer, "b_shares": {"a": answer["b_shares"]["a"]}}
    with pytest.raises(SecAggError, match=r"site 'a', field 'b_shares': missing \['b'\]"):
        server.receive_unmask("a", bad)
    server.receive_unmask("a", answer)
    with pytest.raises(SecAggError, match=r"only 1 sites answered the unmasking"):
        server.result()
    with pytest.raises(SecAggError, match=r"this round was aborted: only 1 sites answered"):
        server.result()  # an aborted round stays aborted
    with pytest.raises(SecAggError, match=r"this round was aborted"):
        server.receive_unmask("b", sites["b"].unmask(**request))


def test_server_detects_shares_that_do_not_reconstruct_a_key():
    server, sites, msgs = staged(n=3, t=2)
    for v in "ab":
        server.receive_masked(v, sites[v].mask(ring_vec(4, 0), msgs["ciphertexts"][v]))
    request = server.unmask_request()
    server.receive_unmask("a", sites["a"].unmask(**request))
    answer = sites["b"].unmask(**request)
    wrong = base64.b64encode(shamir.y_to_bytes(12345)).decode()
    server.receive_unmask("b", {**answer, "s_shares": {"c": wrong}})
    with pytest.raises(SecAggError, match=r"site 'c': the shares of its mask key do not"):
        server.result()
