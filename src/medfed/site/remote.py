"""A site in a deployment (``medfed site``): its own data, the server's tasks.

The job arrives from the server as configuration only, with every file path replaced by
``<site-local>``; the site reads its data from the paths of its own data file, so paths
never travel. Nor does code: a job naming a model, algorithm or reader this site cannot
build (one this medfed does not have, or the module of ``model: {import: ...}`` when it is
not installed here) is refused, naming what is missing. A site started with ``--policy``
checks the job against its own rules, and under ``approve: manual`` waits for its
operator's decision, before it reads any data (site/policy.py); its refusal is declined like
any other. The site reports, with its data summary, a description of the model it built
(entry names, shapes and dtypes and their fingerprint, core/modelspec.py); the server
leaves the site out before round 1 when it differs from the server's own model.

The data file (YAML) restates the job's ``data`` section with this site's local paths::

    data:
      source: pairs
      mask_values: [0, 255]
      sites:
        - name: hospital_a          # must be this site's name (its certificate's)
          images: /srv/prostate/images
          masks: /srv/prostate/masks

A job with generated data (``synthetic``, ``synthetic_segmentation``) needs no data file.
The data file is read and checked when the site starts, before it connects: it must exist,
parse as YAML, fit the schema and name this site.

What the site accepts from the server is bounded by what it knows: a model task may hold at
most :func:`model_limit` bytes of its own model (the server declares the size first; a
larger one is refused before any memory is set aside for it). Under secure aggregation the
site signs its keys with its kit's key and checks every other site's against the kit's CA
(privacy/secagg/signing.py); a protocol message naming another job is refused. DP noise
comes from a cryptographic generator (privacy/noise.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from medfed.config import (
    BundleModelConfig,
    DataConfig,
    Job,
    checked_bundle_digest,
    format_validation_error,
    map_paths,
    parse_job,
    read_yaml,
    resolve_paths,
    without_reading,
)
from medfed.core import codec
from medfed.core.buffers import BufferPool
from medfed.core.errors import ConfigError, DataError, MedfedError
from medfed.core.modelspec import ModelSpec
from medfed.core.types import Arm, Split
from medfed.core.schema import Frozen
from medfed.site.state import StateFile, site_state_path
from medfed.transport.base import describe_exception
from medfed.transport.grpc import wire
from medfed.transport.grpc.hub import SITE_LOCAL

if TYPE_CHECKING:
    import grpc

    from medfed.core.types import Params, RoundPlan, Update
    from medfed.site.policy import Gate
    from medfed.transport.pki import Kit

log = logging.getLogger("medfed")


MODEL_MARGIN = 1 << 20  # bytes: room in a model task besides the tensors (the header's JSON, rounding)


class SiteDataFile(Frozen):
    data: DataConfig


def load_site_data(path: Path, site: str) -> Any:
    """The ``data`` section of a site's data file, paths resolved against its folder.

    Raises ConfigError naming the file and the field: the file is missing or not YAML, a
    field breaks the schema, or ``data.sites`` does not name ``site``. (Whether its
    folders hold readable data is found when the data is read, for the job.)"""
    raw = read_yaml(path, "site data file")
    try:
        parsed = SiteDataFile.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"site data file '{path}'").replace(
            ": invalid job", " is invalid:", 1)) from None
    if site not in parsed.data.site_names:
        raise ConfigError(
            f"site data file '{path}': data.sites names {parsed.data.site_names}, but this site is '{site}'"
        )
    return resolve_paths(parsed.data, path.parent.resolve())


def model_limit(params: dict[str, Any]) -> int:
    """The most bytes a model task may have for a site whose model holds ``params`` (its
    state dict): the tensors twice (the global model, and extras of the algorithm as large
    as it, e.g. SCAFFOLD's control variate), a header entry for each (name, dtype, shape,
    offsets), and ``MODEL_MARGIN``."""
    per_copy = sum(t.numel() * t.element_size() + len(k) + 128 + 24 * t.dim() for k, t in params.items())
    return 2 * per_copy + MODEL_MARGIN


def _uses_files(job: Job) -> bool:
    found = []
    map_paths(job.data, lambda p: found.append(p) or p)
    return any(p == SITE_LOCAL for p in found)


def _settings(data: Any, site: str) -> dict[str, Any]:
    """A data config without its paths (and without the other sites' entries): what a
    site's data file must agree on with the job."""
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            kept = {k: strip(x) for k, x in v.items()}
            return {k: x for k, x in kept.items() if x is not None and x != {}}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return None if v == str(SITE_LOCAL) else v

    d = without_reading(map_paths(data, lambda _p: SITE_LOCAL).model_dump(mode="json"))
    if isinstance(d.get("sites"), list):
        d["sites"] = [x for x in d["sites"] if isinstance(x, dict) and x.get("name") == site]
    return strip(d)


def _differences(job_data: Any, local: Any, site: str) -> list[str]:
    a, b = _settings(job_data, site), _settings(local, site)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class RemoteSite:
    """What ``medfed site`` runs: sets up the job the server names, answers its tasks."""

    def __init__(self, name: str, data_file: Path | None, max_epsilon: float | None = None, kit: Kit | None = None,
                 bundle: Path | None = None, gate: Gate | None = None, he_context: Path | None = None):
        """Checks ``data_file`` and ``bundle`` at once (see :func:`load_site_data`): a site
        with a broken data file or bundle stops before it connects. ``kit``: the site's
        startup kit (:class:`~medfed.transport.pki.Kit`), whose key signs its
        secure-aggregation keys. ``bundle``: the MONAI Bundle folder this site's operator
        lets jobs run (``--bundle``); a bundle's configs are code, so the server never
        names one for the site. ``he_context``: the consortium's secret CKKS context file
        (``--he-context``, from ``medfed he-keys``), for jobs with ``privacy.he``."""
        self.name = name
        self.he_context = he_context
        if he_context is not None and not Path(he_context).is_file():
            raise ConfigError(f"--he-context '{he_context}': no such file; give the he-secret.ctx of the consortium")
        self.kit = kit
        self.data_file = data_file
        self.local_data = load_site_data(data_file, name) if data_file is not None else None
        self.bundle = bundle.resolve() if bundle is not None else None
        self.bundle_sha256 = checked_bundle_digest(self.bundle, "--bundle") if self.bundle is not None else None
        self.max_epsilon = max_epsilon  # this site's own privacy limit, whatever the job says
        # its policy (--policy): checked before any data is read, each decision in its audit log
        self.gate = gate
        self.epsilon_rule = ""  # what sets max_epsilon, when it is the policy
        policy_eps = gate.policy.privacy.max_epsilon if gate is not None else None
        if policy_eps is not None and (max_epsilon is None or policy_eps < max_epsilon):
            self.max_epsilon, self.epsilon_rule = policy_eps, "policy.privacy.max_epsilon: "
        self.max_model: int | None = None  # bytes a model task may have: set by setup, from this site's model
        self.max_exchange: int | None = None  # bytes a protocol message may have: set by setup (None: the default)
        self.app = None
        self.job: Job | None = None
        self.job_id = ""
        self._encoded = BufferPool(keep=1)  # the update being sent
        self._decoded = BufferPool(keep=1)  # the model received, as tensors
        # split learning: the connection's Split call (gRPC's callable; set by medfed site)
        self.split_call: grpc.StreamStreamMultiCallable | None = None
        # added to the job id in the site-state file's name: a queue server's run ("-run0003"), so
        # that the same job submitted again starts from no state while a resumed run finds its own
        self.state_tag = ""

    def setup(self, job_dict: dict[str, Any], job_id: str) -> tuple[dict[str, Any], float]:
        """:meth:`_setup`; with a policy, a refusal for any other reason than its rules goes
        into the site's audit log too."""
        from medfed.site.approvals import Decision
        from medfed.site.policy import PolicyRefusal

        try:
            return self._setup(job_dict, job_id)
        except MedfedError as e:
            if self.gate is not None and not isinstance(e, PolicyRefusal):
                self.gate.audit.record(Decision.REFUSED, "site", str(e), job_id=job_id)
            raise

    def _setup(self, job_dict: dict[str, Any], job_id: str) -> tuple[dict[str, Any], float]:
        """Validate the job, read this site's data, build the model; return the summary to
        report (with the description of the model built, under ``"model"``) and the job's
        round timeout. A ConfigError names what the job needs that this site lacks, e.g. the
        module of ``model: {import: ...}`` when it is not installed here: code never travels."""
        from medfed.data.reading import user_cache_root
        from medfed.data.sites import build_sites, describe_sites
        from medfed.models import check_input_size
        from medfed.site.app import SiteApp
        from medfed.site.policy import disclosed
        from medfed.site.device import resolve_device, set_threads

        job = parse_job(job_dict, source=f"job {job_id} from the server")
        if self.name not in job.site_names:
            raise ConfigError(f"job {job_id} has no site '{self.name}' (its sites: {job.site_names})")
        if self.gate is not None:  # the site's policy and its operator: before any data is read
            self.gate.admit(job, job_id)
        job = self._with_own_bundle(job, job_id)
        he_key = self._he_key(job)  # before any data is read
        data_job = job
        if self.local_data is not None:
            local = self.local_data  # read and checked when the site started
            if local.source != job.data.source:
                raise ConfigError(
                    f"site data file '{self.data_file}': data.source is '{local.source}' but the job reads "
                    f"'{job.data.source}'"
                )
            differ = _differences(job.data, local, self.name)
            if differ:
                raise ConfigError(
                    f"site data file '{self.data_file}': data.{differ[0]} differs from the job's; only file paths "
                    f"may differ (fields that differ: {', '.join(differ)})"
                )
            data_job = job.model_copy(update={"data": local})
        elif _uses_files(job):
            raise ConfigError(
                f"job {job_id} reads files (data.source '{job.data.source}'): give this site's paths "
                "with --data SITE_DATA.yaml"
            )
        set_threads(job.num_threads)
        device = resolve_device(job.device)
        mine = [s for s in build_sites(data_job, order=job.site_names, cache_root=user_cache_root()) if s.name == self.name]
        if not mine:
            raise DataError(f"site '{self.name}': the data file defines no data for this site")
        data = mine[0]
        self._check_privacy(job, len(data.train))
        patch = tuple(job.transforms.patch) if job.transforms.patch is not None else None
        check_input_size(job.model, data.train.shape[1:], patch)
        credentials = None
        if self.kit is not None and job.privacy.secure_aggregation is not None:
            from medfed.privacy.secagg.signing import Credentials

            credentials = Credentials.from_kit(self.kit)
            log.info("site '%s': secure aggregation: signs its keys with its kit key and checks every other site's "
                     "against the consortium CA", self.name)
        self.app = SiteApp(data, job, device, secure=True, credentials=credentials, he_context=he_key)
        if self.kit is not None:  # the algorithm's state, kept across a restart of this process
            self.app.keep_state_in(StateFile(site_state_path(self.kit.path, job.job_id + self.state_tag),
                                             job.job_hash(), self.name))
        self.job, self.job_id = job, job_id
        self.max_model = model_limit(self.app.model.state_dict())
        if job.privacy.he is not None:  # the encrypted sum a decryptor receives: about 11 bytes per model byte
            from medfed.transport.grpc.client import EXCHANGE_LIMIT

            self.max_exchange = max(EXCHANGE_LIMIT, 6 * self.max_model)
        if job.topology.kind in ("cyclic", "swarm"):  # this site holds models and seals what it sends
            self._take_peer_role(job)
        summary = describe_sites([data], job.task, job.held_out)[0]
        if data.skipped:
            log.warning("site '%s': %d unreadable file(s) skipped: %s", self.name, len(data.skipped),
                        "; ".join(f"{f} ({why})" for f, why in data.skipped))
        log.info("site '%s': data ready: %d train, %d val, %d test", self.name, summary.train, summary.val,
                 summary.test)
        # file names stay at the site; the model it built goes along, described (no values),
        # for the server to compare with its own before round 1
        model = ModelSpec.of(self.app.model.state_dict())
        told = disclosed(summary.for_the_server(), self.gate.policy if self.gate is not None else None)
        return {**told, "model": model.to_wire()}, job.round_timeout

    def _take_peer_role(self, job: Job) -> None:
        """A relayed topology (site/peers.py): models pass between sites sealed with their
        kits (the server relays them unread); a message may carry a sealed model of every
        site of the job (the consensus of a swarm)."""
        from medfed.site.peers import PeerRole
        from medfed.transport.grpc.client import EXCHANGE_LIMIT
        from medfed.transport.pki.sealing import Sealer

        if self.kit is None:
            raise ConfigError(f"topology.kind: {job.topology.kind}: the models that pass between sites are sealed "
                              "with each site's kit; start this site with its kit")
        sealer = Sealer(self.kit.name, self.kit.key_pem, self.kit.cert_pem, self.kit.ca_pem)
        self.app.peers = PeerRole(self.app, job, sealer)
        self.max_exchange = max(EXCHANGE_LIMIT, (len(job.site_names) + 2) * 2 * self.max_model)
        log.info("site '%s': %s: holds its models here and seals every model it sends to the sites it is for",
                 self.name, job.topology.label)

    def _he_key(self, job: Job):
        """The consortium's secret CKKS context for a job with ``privacy.he`` (None
        otherwise); ConfigError when this site was not given one, or one that does not fit."""
        if job.privacy.he is None:
            return None
        if self.he_context is None:
            raise ConfigError(
                "the job aggregates under homomorphic encryption (privacy.he): start this site with --he-context "
                "he-secret.ctx, the consortium's secret context (written by medfed he-keys, never given to the server)"
            )
        from medfed.privacy.he.ckks import read_key_file

        ctx = read_key_file(self.he_context, job.privacy.he, private=True)
        log.info("site '%s': homomorphic aggregation with the consortium context %s", self.name, self.he_context)
        return ctx

    def _with_own_bundle(self, job: Job, job_id: str) -> Job:
        """``job`` with its MONAI Bundle read from this site's own copy (``--bundle``),
        which must have the digest the job carries; a job without a bundle as it is.
        ConfigError when the site has no bundle or another version of it."""
        m = job.model
        if not isinstance(m, BundleModelConfig):
            return job
        if self.bundle is None:
            raise ConfigError(
                f"job {job_id} runs a MONAI Bundle (model.bundle, SHA-256 {m.bundle_sha256}); a bundle runs the code "
                "its configs name, so a site runs only the bundle its operator gives: start this site with "
                "--bundle FOLDER"
            )
        if self.bundle_sha256 != m.bundle_sha256:
            raise ConfigError(
                f"--bundle '{self.bundle}': its SHA-256 (of configs/ and scripts/) is {self.bundle_sha256}, but job "
                f"{job_id} runs the bundle {m.bundle_sha256}; install the consortium's version of the bundle here"
            )
        return job.model_copy(update={"model": m.model_copy(update={"bundle": self.bundle})})

    def _check_privacy(self, job: Job, train_size: int) -> None:
        """Refuse a job that would spend more privacy than this site allows."""
        if self.max_epsilon is None:
            return
        from medfed.server.update_path import ledger_for

        ledger = ledger_for(job, {self.name: train_size})
        if ledger is None:
            raise ConfigError(
                f"{self.epsilon_rule}site '{self.name}' allows epsilon <= {self.max_epsilon:g}, but the job has no "
                "differential privacy (privacy.dp or privacy.dp_sgd); refused"
            )
        eps = ledger.epsilon(ledger.last_round)
        if eps > self.max_epsilon:
            raise ConfigError(
                f"{self.epsilon_rule}site '{self.name}' allows epsilon <= {self.max_epsilon:g}, but the job reaches "
                f"{eps:.3g} at delta {ledger.delta:g} after round {ledger.last_round} ({ledger.what}); refused"
            )
        log.info("site '%s': the job spends epsilon %.3g of this site's %g", self.name, eps, self.max_epsilon)

    def answer(self, hdr: dict[str, Any], blob: bytes) -> tuple[str, bytes]:
        """Run one task; a failure becomes an ``error`` answer naming the cause."""
        try:
            if hdr.get("kind") == "exchange":  # a protocol message of the update path (JSON both ways)
                body = wire.decode_json_object(blob, "exchange task")
                if "job_id" in body and body["job_id"] != self.job_id:
                    raise DataError(f"a protocol message for job {body['job_id']!r}, this site runs job {self.job_id}")
                reply = self.app.exchange(str(hdr.get("topic")), int(hdr.get("round")), body)
                return "exchange", json.dumps(reply).encode()
            params, extras = codec.decode_model(blob, self._decoded)
            if hdr.get("kind") == "fit":
                plan = codec.plan_from_dict(hdr.get("plan"), extras)
                if plan.job_id != self.job_id or plan.round != hdr.get("round"):
                    raise DataError(f"task plan for job {plan.job_id} round {plan.round} does not match its header")
                log.info("site '%s': %s round %d: training", self.name, plan.arm.value, plan.round)
                if self.job.topology.kind == "split":
                    return "fit", codec.encode_update(self._split_turn(params, plan, hdr), self._encoded)
                return "fit", codec.encode_update(self.app.fit(params, plan), self._encoded)
            splits = tuple(Split(s) for s in hdr.get("splits", []))
            results = self.app.evaluate(params, splits, Arm(hdr.get("arm")))
            return "evaluate", codec.encode_eval_results(results)
        except Exception as e:  # reported to the server with the cause; the site keeps serving
            log.warning("site '%s': task of round %s failed: %s", self.name, hdr.get("round"), describe_exception(e))
            return "error", self.redact(describe_exception(e)).encode()

    def _split_turn(self, params: Params, plan: RoundPlan, hdr: dict[str, Any]) -> Update:
        """Split learning: train this site's parts ``params`` against the server's middle over
        one Split call for the task (transport/grpc/split_client.py); the trained parts."""
        from medfed.site.split import fit_split
        from medfed.transport.grpc.split_client import GrpcSplitChannel

        topology = self.job.topology
        if self.split_call is None:
            raise ConfigError("topology.kind: split needs the connection's Split call; run the site with medfed site")
        with GrpcSplitChannel(self.split_call, self.name, self.job_id, str(hdr.get("task_id")),
                              self.job.round_timeout) as channel:
            if not topology.u_shaped:
                log.warning("site '%s': split round %d without the U (topology.u_shaped: false): this site's training "
                            "labels go to the server with its activations, batch by batch", self.name, plan.round)
            update = fit_split(self.app, params, plan, channel, topology.cut, topology.head, u_shaped=topology.u_shaped)
        rtt = sorted(channel.round_trips)
        log.info("site '%s': split round %d: %d exchanges with the server, %d bytes sent, %d received, median round "
                 "trip %.2f ms", self.name, plan.round, len(rtt), channel.sent, channel.received,
                 1000 * rtt[len(rtt) // 2] if rtt else 0.0)
        return update

    def finish(self) -> None:
        """The server said the job is done: its saved site state is no longer needed."""
        if self.app is not None and self.app.states is not None and self.app.states.file is not None:
            self.app.states.file.remove()

    def local_folders(self) -> list[str]:
        """The folders of this site's own files: its data file's and every path in it, its
        bundle's, its HE context's, and the user's disk cache (longest first)."""
        from medfed.data.reading import user_cache_root

        found: list[Path] = [user_cache_root()]
        if self.bundle is not None:
            found.append(self.bundle)
        if self.he_context is not None:
            found.append(Path(self.he_context).resolve().parent)
        if self.data_file is not None:
            found.append(Path(self.data_file).resolve().parent)
        if self.local_data is not None:
            map_paths(self.local_data, lambda p: found.append(p) or p)
        folders = {str(p if p.is_dir() or not p.suffix else p.parent) for p in found}
        return sorted((f for f in folders if len(f) > 1), key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` as the server may read it: this site's folders replaced by
        ``<site-local>`` (a file's name under them is kept, to say which one). The full
        text stays in this site's own log."""
        for folder in self.local_folders():
            text = text.replace(folder, str(SITE_LOCAL))
        return text
