"""Progress events: the driver publishes one plain-data summary per iteration on the scheduler.

``Client.log_event(TOPIC, payload)`` stores the payload in the scheduler's event log; the live
dashboard pages (:mod:`dask_refine.ui.dashboard`) read it with ``scheduler.get_events(TOPIC)``.
Payloads hold only numbers, strings and (nested) lists, so any scheduler can keep them, with or
without our pages loaded. The scheduler keeps the last ``distributed.admin.low-level-log-length``
events of a topic.
"""

from __future__ import annotations

import logging

TOPIC = "dask-refine"

logger = logging.getLogger(__name__)


def publish(client, payload: dict) -> None:
    """Log ``payload`` under :data:`TOPIC` on ``client``'s scheduler (no-op without a client).

    A failure to publish (e.g. a scheduler that went away) is logged, never raised: progress
    reporting must not end a refinement."""
    if client is None:
        return
    try:
        client.log_event(TOPIC, payload)
    except Exception as err:  # noqa: BLE001 - reporting is best effort by design
        logger.warning("could not publish a progress event: %s", err)
