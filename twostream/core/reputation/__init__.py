"""Algorithm 2 (SPEC 3): the per-source reputation ledger ("Real or Fake"), its one home.

Per source a counter ``CC`` in ``[0, cap]`` and a blacklisted flag. For each scored image of
the source, in ``(timestamp, image_id)`` order:

1. ``CC = min(CC + step_up, cap)`` if the image was rejected, else ``max(CC - step_down, 0)``.
2. Blacklisted: ``CC == 0`` takes the source off the list and the response is the image's
   verdict; otherwise the response is ``blocked``.
3. Not blacklisted: ``CC >= threshold`` puts it on the list and the response is ``blocked``;
   otherwise the response is the verdict (a CIFAR-10 label or ``adversarial``).

Images that could not be decoded are not Algorithm-2 events: they leave the state unchanged.
Algorithm 2's only input per image is "rejected or not" (a caller that adds a reason to reject,
such as the query detector's ``query_attack``, changes what it passes as ``rejected``, not the rules).

The implementations, each checked against the reference on the same generated streams
(tests/core/test_reputation_implementations.py):

* :mod:`.ledger` - the sequential reference: :class:`ReputationLedger` (one image at a time, the
  online order) and :func:`replay` (a finite set sorted first, the batch order);
* :mod:`.vector` - NumPy: :func:`advance` (one image for each of many sources, the simulation) and
  :func:`scan` (all events of many sources at once, the batch job's reduce);
* ``observe.lua`` (:data:`OBSERVE_SCRIPT`, in :mod:`.lua`) - one image in Redis, atomically (the endpoint);
* :mod:`.keys` - :func:`reputation_key` (and :func:`identity_key`, the same as a function of the id), which source ids share a counter (``reputation.group_by_prefix``).

``reputation.forget_default`` bounds the state: a source back at the default standing (CC 0, not
listed) keeps no entry; the responses are the same either way.
"""

from twostream.core.reputation.keys import identity_key, reputation_key, reputation_keys
from twostream.core.reputation.ledger import BLOCKED, Outcome, ReputationLedger, SourceState, Upload, replay
from twostream.core.reputation.lua import OBSERVE_SCRIPT
from twostream.core.reputation.vector import advance, scan

__all__ = [
    "BLOCKED", "OBSERVE_SCRIPT", "Outcome", "ReputationLedger", "SourceState", "Upload", "advance", "identity_key", "replay",
    "reputation_key", "reputation_keys", "scan",
]
