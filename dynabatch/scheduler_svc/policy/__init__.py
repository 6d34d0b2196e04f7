"""The batching policy: pure functions, state and budget in, a decision out.

No I/O, no clock reads, no randomness: time is always the `now` argument. One implementation
(BatchingPolicy) behind every name in POLICY_NAMES; make_policy(name, config) builds one.
"""
from .config import POLICY_NAMES, PRESETS, PolicyConfig
from .policies import BatchingPolicy, make_policy
from .predict import HistoryPredictor, LengthPredictor
from .sla import SlaController
from .types import Admission, Assigned, Decision, Policy, Waiting, WorkerView

__all__ = [
    "Admission", "Assigned", "BatchingPolicy", "Decision", "HistoryPredictor", "LengthPredictor",
    "POLICY_NAMES", "PRESETS", "Policy", "PolicyConfig", "SlaController", "Waiting", "WorkerView",
    "make_policy",
]
