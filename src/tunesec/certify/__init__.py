"""Certification of fine-tuned models: policy, verdict, trigger scan, weight forensics, certificate, report.

``certify(base, tuned, policy=...)`` evaluates both models on the policy's suite and returns PASS, FAIL or
INCONCLUSIVE with every number that decided it (:mod:`tunesec.certify.runner`). Importing this package does not
import torch.
"""

from tunesec.certify.certificate import Certificate, check_compatible, model_sha256
from tunesec.certify.policy import MetricCheck, Policy, default_policy_path, load_policy
from tunesec.certify.runner import CertifyResult, certify
from tunesec.certify.triggers import Candidate, TriggerScan, mine_candidates, scan_triggers
from tunesec.certify.verdict import CheckResult, Verdict

__all__ = [
    "Candidate",
    "Certificate",
    "CertifyResult",
    "CheckResult",
    "MetricCheck",
    "Policy",
    "TriggerScan",
    "Verdict",
    "certify",
    "check_compatible",
    "default_policy_path",
    "load_policy",
    "mine_candidates",
    "model_sha256",
    "scan_triggers",
]
