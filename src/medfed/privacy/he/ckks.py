"""CKKS with TenSEAL, as homomorphic aggregation uses it: the consortium's context, its
fingerprint, and ciphertexts as bytes of a checked size (never pickle).

Parameters (from ``privacy.he``): ring dimension N = ``poly_modulus_degree``, so N/2 values
per ciphertext; coefficient modulus ``[60, 60]`` bits: one 60-bit prime holds the data and
one is the special prime of key switching (unused: aggregation only adds). 120 bits is
within the 128-bit-security limit of every allowed N (218 bits at N = 8192). Scale
2^``scale_bits``. A fresh ciphertext is 2 polynomials of N 64-bit coefficients: 16 N bytes
(plus TenSEAL's header) for N/2 values, 32 bytes per value whatever N.

The values encrypted are sums of example-weighted changes. CKKS needs
``|value| * 2^scale_bits`` below the data prime (2^59), with a margin of 2^2 for the
encoding: :func:`headroom` is what the *sum* of a round may reach.

TenSEAL is the ``he`` extra: importing this module without it raises a ConfigError that
says how to install it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfed.core.errors import ConfigError, RoundError

try:
    import tenseal as ts
except ImportError as e:  # pragma: no cover - the extra is installed in CI
    raise ConfigError('privacy.he: needs TenSEAL, the "he" extra: pip install -e ".[he]"') from e

if TYPE_CHECKING:
    from medfed.privacy.settings import HomomorphicEncryption

COEFF_BITS = (60, 60)  # data prime, special prime
DATA_BITS = COEFF_BITS[0]
_PUBLIC = dict(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


class HEError(RoundError):
    """A ciphertext, context or reply that homomorphic aggregation cannot use, or too few
    sites left for a round to finish; ``site`` names the site concerned, where known."""

    def __init__(self, message: str, site: str | None = None):
        super().__init__(message)
        self.site = site


def new_context(settings: HomomorphicEncryption) -> ts.Context:
    """A fresh context with a secret key (key generation from the OS's randomness)."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=settings.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(COEFF_BITS))
    ctx.global_scale = 2.0 ** settings.scale_bits
    return ctx


def public_bytes(ctx: ts.Context) -> bytes:
    """The context without its secret key (parameters, scale, public key), serialized."""
    return ctx.serialize(**_PUBLIC)


def secret_bytes(ctx: ts.Context) -> bytes:
    if not ctx.is_private():
        raise HEError("this context holds no secret key")
    return ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)


def public_copy(ctx: ts.Context) -> ts.Context:
    """A separate context object that never held the secret key."""
    return ts.context_from(public_bytes(ctx))


def fingerprint(ctx: ts.Context) -> str:
    """SHA-256 (first 16 hex digits) of the public part: the same for a site's secret context
    and the server's public one when they belong together."""
    return hashlib.sha256(public_bytes(ctx)).hexdigest()[:16]


def load_context(data: bytes, what: str, settings: HomomorphicEncryption, private: bool) -> ts.Context:
    """A context from ``data`` (``what``: where it came from, for errors), checked to hold a
    secret key when ``private`` (a site) and none otherwise (the server), and to have the
    job's parameters."""
    try:
        ctx = ts.context_from(data)
    except Exception as e:
        raise HEError(f"{what}: not a TenSEAL context ({e})") from e
    if ctx.is_private() != private:
        need = "a secret key (the sites' context)" if private else "no secret key (the server's public context)"
        raise HEError(f"{what}: must hold {need}; use the other file write_keys wrote")
    if ctx.global_scale != 2.0 ** settings.scale_bits or _degree(ctx) != settings.poly_modulus_degree:
        raise HEError(f"{what}: its parameters (N={_degree(ctx)}, scale 2^{np.log2(ctx.global_scale):g}) are not "
                      f"the job's privacy.he (N={settings.poly_modulus_degree}, scale 2^{settings.scale_bits})")
    return ctx


def _degree(ctx: ts.Context) -> int:
    return int(ctx.seal_context().data.key_context_data().parms().poly_modulus_degree())


def slots(settings: HomomorphicEncryption) -> int:
    """Values per ciphertext: N/2."""
    return settings.poly_modulus_degree // 2


def chunks(n_values: int, settings: HomomorphicEncryption) -> int:
    """Ciphertexts that hold ``n_values`` values."""
    return max(1, -(-n_values // slots(settings)))


@lru_cache(maxsize=8)
def _ciphertext_bytes(degree: int, scale_bits: int) -> int:
    from medfed.privacy.settings import HomomorphicEncryption

    settings = HomomorphicEncryption(poly_modulus_degree=degree, scale_bits=scale_bits)
    ctx = new_context(settings)
    return len(ts.ckks_vector(ctx, np.zeros(slots(settings))).serialize())


def ciphertext_bytes(settings: HomomorphicEncryption) -> int:
    """The exact size of one serialized ciphertext of N/2 values (every chunk is padded to
    N/2 values, so every ciphertext of a job has this size; measured once per process)."""
    return _ciphertext_bytes(settings.poly_modulus_degree, settings.scale_bits)


def headroom(settings: HomomorphicEncryption) -> float:
    """The largest magnitude a summed value may reach: 2^(DATA_BITS - 1 - scale_bits - 2)."""
    return 2.0 ** (DATA_BITS - 3 - settings.scale_bits)


def encrypt(ctx: ts.Context, flat: np.ndarray, settings: HomomorphicEncryption) -> np.ndarray:
    """``flat`` (float64, 1D) as ciphertexts: uint8 array (chunks, ciphertext_bytes)."""
    n, k = slots(settings), chunks(flat.size, settings)
    padded = np.zeros(k * n)
    padded[: flat.size] = flat
    out = np.empty((k, ciphertext_bytes(settings)), dtype=np.uint8)
    for i in range(k):
        blob = ts.ckks_vector(ctx, padded[i * n: (i + 1) * n]).serialize()
        if len(blob) != out.shape[1]:
            raise HEError(f"a ciphertext serialized to {len(blob)} bytes, expected {out.shape[1]} "
                          "(a different TenSEAL version?)")
        out[i] = np.frombuffer(blob, dtype=np.uint8)
    return out


def read_ciphertexts(ctx: ts.Context, rows: np.ndarray, n_chunks: int, settings: HomomorphicEncryption,
                     site: str | None = None) -> list:
    """Deserialize ``rows`` (uint8, (chunks, bytes)) after checking their shape against what
    ``n_chunks`` ciphertexts of this job must be, so no oversized input reaches TenSEAL."""
    expected = (n_chunks, ciphertext_bytes(settings))
    if rows.dtype != np.uint8 or rows.shape != expected:
        raise HEError(f"ciphertexts are {rows.dtype} {tuple(rows.shape)}, expected uint8 {expected}", site)
    out = []
    for i in range(n_chunks):
        try:
            v = ts.ckks_vector_from(ctx, rows[i].tobytes())
        except Exception as e:
            raise HEError(f"ciphertext {i} does not deserialize as CKKS under this job's context ({e})", site) from e
        if v.size() != slots(settings):
            raise HEError(f"ciphertext {i} holds {v.size()} values, expected {slots(settings)}", site)
        out.append(v)
    return out


def add_into(total: list | None, addend: list, site: str | None = None) -> list:
    """``total + addend`` chunk by chunk (a new list: ``total`` is unchanged when it fails)."""
    if total is None:
        return [v.copy() for v in addend]
    try:
        return [a + b for a, b in zip(total, addend)]
    except Exception as e:  # e.g. a scale or parameter mismatch
        raise HEError(f"ciphertexts do not add to the others ({e})", site) from e


def decrypt(ctx: ts.Context, vectors: list, n_values: int) -> np.ndarray:
    """The plaintext of ``vectors`` (needs the secret key), first ``n_values`` values."""
    return np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])[:n_values]


# --------------------------------------------------------------------------- key files


def write_keys(out: Path, settings: HomomorphicEncryption) -> tuple[Path, Path, str]:
    """Generate a consortium context; write ``he-secret.ctx`` (for the sites, out of band)
    and ``he-public.ctx`` (for the server) in ``out``, mode 0600. Returns both paths and the
    fingerprint. Refuses to overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    secret, public = out / "he-secret.ctx", out / "he-public.ctx"
    for p in (secret, public):
        if p.exists():
            raise ConfigError(f"{p}: exists; remove it or choose another folder (keys are never overwritten)")
    ctx = new_context(settings)
    for p, data in ((secret, secret_bytes(ctx)), (public, public_bytes(ctx))):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return secret, public, fingerprint(ctx)


def read_key_file(path: Path, settings: HomomorphicEncryption, private: bool) -> ts.Context:
    """A context file that :func:`write_keys` wrote, checked (see :func:`load_context`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the HE context ({e.strerror}); give a file write_keys wrote") from e
    try:
        return load_context(data, str(path), settings, private)
    except HEError as e:
        raise ConfigError(str(e)) from e


# --------------------------------------------------------------------------- simulation


_SIMULATED: dict[str, ts.Context] = {}
_LOCK = threading.Lock()


def simulation_context(job_key: str, settings: HomomorphicEncryption) -> ts.Context:
    """The secret context every simulated site of one job shares (``job_key``: the job's
    hash and seed). Generated by the first site that needs it and kept, mode 0600, in a
    private folder of this machine's temporary directory, so that process-pool workers
    load the same one; the server's code never calls this (it gets
    :func:`simulation_public`)."""
    with _LOCK:
        if job_key in _SIMULATED:
            return _SIMULATED[job_key]
        folder = Path(tempfile.gettempdir()) / f"medfed-he-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()  # made by this user, for this user only: not someone else's folder or link
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise HEError(f"'{folder}' must be a folder of this user that only this user may open; remove it")
        path = folder / f"{job_key}.ctx"
        if not path.exists():
            tmp = folder / f"{job_key}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret_bytes(new_context(settings)))
            try:
                os.link(tmp, path)  # atomic: the first process to get here wins, the others load its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        ctx = load_context(path.read_bytes(), str(path), settings, private=True)
        _SIMULATED[job_key] = ctx
        return ctx


def simulation_public(job_key: str, settings: HomomorphicEncryption) -> ts.Context:
    """The public context of :func:`simulation_context`'s key (a separate object without
    the secret key), for the simulated server."""
    return public_copy(simulation_context(job_key, settings))
