"""The durable consumers on JetStream: created when missing, kept as planned, restarted on request."""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from listeners.inbox import inbox_forget_consumer
from listeners.plan import ConsumerPlan

logger = logging.getLogger("listeners.runner")

#: Consumer settings the listener brings back to the planned value on an existing durable.
EDITABLE = ("ack_wait", "max_deliver", "max_ack_pending")


def consumer_config(plan: ConsumerPlan, *, batch: int) -> ConsumerConfig:
    """The durable's configuration for ``plan``, fetching up to ``batch`` messages at a time."""
    config = ConsumerConfig(
        durable_name=plan.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=plan.ack_wait,
        # Unlimited on the server: the listener counts deliveries and dead-letters the message
        # itself. A server-side limit drops a message *silently* when its last delivery lands
        # on a process that dies before acking (each SIGKILL spends a delivery).
        max_deliver=-1,
        max_ack_pending=max(1000, batch * 4),
    )
    if plan.filter_subjects and len(plan.filter_subjects) == 1:
        config.filter_subject = plan.filter_subjects[0]
    elif plan.filter_subjects:
        config.filter_subjects = plan.filter_subjects
    return config


async def consumer_ensure(js: JetStreamContext, plan: ConsumerPlan, *, batch: int) -> None:
    """Create the durable, or bring its editable settings (ack wait, deliveries, pending) up to date."""
    config = consumer_config(plan, batch=batch)
    try:
        info = await js.consumer_info(plan.stream, plan.durable)
    except NotFoundError:
        await js.add_consumer(plan.stream, config)
        logger.info("listener.consumer_created stream=%s durable=%s", plan.stream, plan.durable)
        return
    current = info.config
    drift = {
        name: (getattr(current, name), getattr(config, name))
        for name in EDITABLE
        if abs((getattr(current, name) or 0) - (getattr(config, name) or 0)) > 0.001
    }
    if drift:
        # The same create call updates a durable's editable fields; filter and policy stay as they are.
        updated = current.evolve(**{name: new for name, (_, new) in drift.items()})
        await js.add_consumer(plan.stream, updated)
        logger.info("listener.consumer_updated stream=%s durable=%s drift=%s", plan.stream, plan.durable, drift)


async def consumer_start_over(js: JetStreamContext, plan: ConsumerPlan, *, reset: bool) -> None:
    """``--from-start``: delete the durable and forget its inbox (with ``reset``, its listeners' models too).

    Only when the process starts — never again on a reconnect. :func:`consumer_ensure`
    then creates the durable afresh, delivering the stream from its start.
    """
    try:
        await js.delete_consumer(plan.stream, plan.durable)
    except NotFoundError:
        pass
    forget = sync_to_async(inbox_forget_consumer, thread_sensitive=True)
    await forget(consumer=plan.durable, reset=plan.listeners.values() if reset else ())
    logger.warning("listener.from_start stream=%s durable=%s reset=%s", plan.stream, plan.durable, reset)
