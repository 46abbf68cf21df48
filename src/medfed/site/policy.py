"""A site's policy checked against a job (``medfed site --policy``), before its data is read.

:func:`refusals` names every rule the job breaks, each as ``policy.<field>: what the site
allows; what the job does``, e.g. ``policy.algorithms: this site allows fedavg, fedprox; the
job runs scaffold``. The rule on epsilon's value (``privacy.max_epsilon``) needs the size of
the site's training split, and is checked with ``--max-epsilon``'s check once the site
knows it (site/remote.py); here, only that the job has DP at all.

:func:`model_name` gives the job's model in the policy's terms (config/policy.py).
:class:`Gate` applies the rules, then the operator's approval (``approve: manual``), and
writes each decision to the site's audit log.

Manual approval waits inside the site's setup of the job, between its join and its ready
message: the server keeps waiting for sites (its join timeout, by default the job's
round_timeout) and takes a site that becomes ready later into the rounds that follow; the
site waits up to ``--approval-timeout`` (default: the job's round_timeout), then declines
the job and stops. Approvals are remembered per job hash, so a site started again after
its operator approved runs the job at once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from medfed.config import BundleModelConfig, ImportLossConfig, ImportModelConfig, Job, MonaiModelConfig
from medfed.config.policy import Approve, Disclose, SitePolicy
from medfed.core.errors import ConfigError
from medfed.site.approvals import Approval, ApprovalStore, AuditLog, Decision, Status, write_job_settings

log = logging.getLogger("medfed")


def model_name(model: Any) -> str:
    """The job's model as a policy names it: ``unet``, ``monai:SwinUNETR``,
    ``import:pkg.mod:factory`` or ``bundle``."""
    if isinstance(model, MonaiModelConfig):
        return f"monai:{model.monai}"
    if isinstance(model, ImportModelConfig):
        return f"import:{model.factory}"
    if isinstance(model, BundleModelConfig):
        return "bundle"
    return model.name


def _model_allowed(allowed: list[str], model: Any) -> bool:
    name = model_name(model)
    for rule in allowed:
        if rule == name or (rule == "monai:*" and name.startswith("monai:")):
            return True
        if rule.startswith("import:") and isinstance(model, ImportModelConfig):
            module, prefix = model.factory.split(":", 1)[0], rule.removeprefix("import:")
            if module == prefix or module.startswith(prefix + "."):
                return True
    return False


def imports(job: Job) -> dict[str, str]:
    """The user's code a job runs: ``{field path: "package.module:factory"}``."""
    found = {}
    if isinstance(job.model, ImportModelConfig):
        found["model.import"] = job.model.factory
    loss = getattr(job.task, "loss", None)
    if isinstance(loss, ImportLossConfig):
        found["task.loss.import"] = loss.factory
    return found


def _listed(values: list[str]) -> str:
    return ", ".join(values)


def refusals(policy: SitePolicy, job: Job, site: str) -> list[str]:
    """Every rule of ``policy`` that ``job`` breaks, for site ``site``; empty: allowed."""
    out: list[str] = []
    if policy.tasks is not None and job.task.kind not in policy.tasks:
        out.append(f"policy.tasks: this site allows {_listed(policy.tasks)}; the job's task is {job.task.kind}")
    if policy.models is not None and not _model_allowed(policy.models, job.model):
        out.append(f"policy.models: this site allows {_listed(policy.models)}; the job's model is "
                   f"{model_name(job.model)}")
    if policy.algorithms is not None and job.algorithm.name not in policy.algorithms:
        out.append(f"policy.algorithms: this site allows {_listed(policy.algorithms)}; the job runs "
                   f"{job.algorithm.name}")
    if policy.topologies is not None and job.topology.kind not in policy.topologies:
        out.append(f"policy.topologies: this site allows {_listed(policy.topologies)}; the job's topology is "
                   f"{job.topology.kind}")
    if (policy.disclose is Disclose.SIZES and job.topology.kind == "split"
            and not getattr(job.topology, "u_shaped", True)):
        out.append("policy.disclose: this site discloses split sizes only; the job's split learning without the U "
                   "(topology.u_shaped: false) sends every training label to the server")
    if policy.max_rounds is not None and job.rounds > policy.max_rounds:
        out.append(f"policy.max_rounds: this site allows at most {policy.max_rounds} rounds; the job runs "
                   f"{job.rounds}")
    out += _privacy(policy, job)
    if policy.peers is not None:
        strangers = [s for s in job.site_names if s != site and s not in policy.peers]
        if strangers:
            out.append(f"policy.peers: this site accepts {_listed(policy.peers)} as peers; the job also has "
                       f"{_listed(strangers)}")
    if policy.allowed_imports is not None:
        for where, factory in imports(job).items():
            package = factory.split(":", 1)[0].split(".", 1)[0]
            if package not in policy.allowed_imports:
                allows = (f"code from {_listed(policy.allowed_imports)} only" if policy.allowed_imports
                          else "no imported code")
                out.append(f"policy.allowed_imports: this site allows {allows}; the job's {where} is "
                           f"'{factory}' (package '{package}')")
    if not policy.allow_bundles and isinstance(job.model, BundleModelConfig):
        out.append(f"policy.allow_bundles: this site runs no MONAI Bundle; the job's model is a bundle (SHA-256 "
                   f"{job.model.bundle_sha256})")
    return out


def _privacy(policy: SitePolicy, job: Job) -> list[str]:
    rules, p = policy.privacy, job.privacy
    has_dp = p.dp is not None or p.dp_sgd is not None
    out = []
    if rules.require_dp and not has_dp:
        out.append("policy.privacy.require_dp: this site requires differential privacy; the job has none "
                   "(privacy.dp or privacy.dp_sgd)")
    elif rules.max_epsilon is not None and not has_dp:
        out.append(f"policy.privacy.max_epsilon: this site allows epsilon <= {rules.max_epsilon:g}; the job has no "
                   "differential privacy (privacy.dp or privacy.dp_sgd)")
    if rules.require_secure_aggregation and p.secure_aggregation is None:
        out.append("policy.privacy.require_secure_aggregation: this site requires secure aggregation; the job has "
                   "none (privacy.secure_aggregation)")
    return out


def disclosed(summary: dict[str, Any], policy: SitePolicy | None) -> dict[str, Any]:
    """What of a site's data summary (``SiteSummary.for_the_server()``) goes to the server:
    all of it, or under ``disclose: sizes`` all but the class counts."""
    if policy is None or policy.disclose is Disclose.COUNTS:
        return summary
    return {k: v for k, v in summary.items() if k != "class_counts"}


class PolicyRefusal(ConfigError):
    """The site's policy or its operator refused the job (already in the site's audit log)."""


class Gate:
    """Where a deployed site decides whether a job runs on its data: the policy's rules,
    then, under ``approve: manual``, its operator's approval, each decision in the audit
    log (site/approvals.py). ``state``: the site's state folder; ``kit``: its kit folder, to
    name in the command the operator runs; ``approval_timeout``: seconds to wait for the
    operator (default: the job's round_timeout, the server's default wait for sites);
    ``poll_s``: how often the approvals file is read meanwhile."""

    def __init__(self, policy: SitePolicy, state: Path, site: str, kit: Path | None = None,
                 approval_timeout: float | None = None, poll_s: float = 1.0):
        self.policy = policy
        self.site = site
        self.state = Path(state)
        self.kit = kit
        self.approval_timeout = approval_timeout
        self.poll_s = poll_s
        self.store = ApprovalStore(self.state)
        self.audit = AuditLog(self.state, site)

    def _refuse(self, decision: Decision, by: str, reason: str, job: Job, job_hash: str, job_id: str) -> PolicyRefusal:
        self.audit.record(decision, by, reason, job_hash, job_id, job.name)  # (the site's terminal: cli.py logs it)
        return PolicyRefusal(reason)

    def admit(self, job: Job, job_id: str) -> None:
        """Return when the job may run here; else raise :class:`PolicyRefusal` saying why.
        Touches no data: the job's settings only."""
        h = job.job_hash()
        broken = refusals(self.policy, job, self.site)
        if broken:
            raise self._refuse(Decision.REFUSED, "policy", f"site '{self.site}' refuses the job by its policy: "
                               + "; ".join(broken), job, h, job_id)
        if self.policy.approve is Approve.AUTO:
            self.audit.record(Decision.ACCEPTED, "policy", "the policy allows the job (approve: auto)", h, job_id,
                              job.name)
            return
        on_record = self.store.get(h)
        if on_record is None or on_record.status is Status.PENDING:
            self._show(job, h, job_id)
            on_record = self._wait(job, h, job_id)
        if on_record.status is Status.REJECTED:
            why = f" ({on_record.reason})" if on_record.reason else ""
            raise self._refuse(Decision.REFUSED, "operator", f"site '{self.site}': its operator rejected the job "
                               f"(hash {h[:16]}) on {on_record.decided}{why}", job, h, job_id)
        self.audit.record(Decision.ACCEPTED, "operator", f"approved by the operator on {on_record.decided}", h,
                          job_id, job.name)
        log.info("site '%s': job %s approved by this site's operator on %s", self.site, job_id, on_record.decided)

    def command(self, verb: str, h: str) -> str:
        kit = f' --kit "{self.kit}"' if self.kit is not None else ""
        return f"medfed site {verb} {h}{kit}"

    def _show(self, job: Job, h: str, job_id: str) -> None:
        self.store.show(h, job_id, job.name)
        text = job.to_yaml()
        saved = write_job_settings(self.state, h, text)
        self.audit.record(Decision.SHOWN, "policy", "waiting for the operator (approve: manual)", h, job_id, job.name)
        log.info("site '%s': job %s ('%s') waits for this site's operator (policy: approve: manual); its settings "
                 "(also in %s):", self.site, job_id, job.name, saved)
        for line in text.splitlines():
            log.info("  %s", line)
        log.info("site '%s': job hash %s", self.site, h)
        log.info("site '%s': to let it run: %s   to refuse it: %s --reason TEXT", self.site,
                 self.command("approve", h), self.command("reject", h))

    def _wait(self, job: Job, h: str, job_id: str) -> Approval:
        timeout = self.approval_timeout if self.approval_timeout is not None else job.round_timeout
        deadline = time.monotonic() + timeout
        while True:
            rec = self.store.get(h)
            if rec is not None and rec.status is not Status.PENDING:
                return rec
            if time.monotonic() >= deadline:
                break
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        raise self._refuse(
            Decision.TIMED_OUT, "policy",
            f"site '{self.site}': its operator did not approve the job (hash {h[:16]}) within {timeout:g} s "
            f"(policy: approve: manual); the site stops: once it is approved there ({self.command('approve', h)}), "
            "start the site again and it joins the run", job, h, job_id)


def gate_for(policy_file: Path, kit: Path, site: str, approval_timeout: float | None = None) -> Gate:
    """The gate of ``medfed site --policy``: the policy read and checked (ConfigError naming
    the file and field, also written to the audit log), the state kept in ``kit``/state."""
    from medfed.config.policy import load_policy
    from medfed.site.approvals import state_folder

    state = state_folder(kit)
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        writable = os.access(state, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise ConfigError(f"the site's state folder '{state}' cannot be written: its approvals and audit log are kept "
                          "there; make the kit folder writable by this site's user")
    try:
        policy = load_policy(policy_file)
    except ConfigError as e:
        AuditLog(state, site).record(Decision.INVALID, "policy", str(e))
        raise
    log.info("site '%s': policy '%s' (approve: %s); decisions in %s", site, policy_file, policy.approve.value,
             state / "audit.jsonl")
    return Gate(policy, state, site, kit=kit, approval_timeout=approval_timeout)
