"""Builds the faust.App from Settings; no logic."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust

from inference.settings import KafkaSettings, Settings
from streams.service.rebalance import REVOKE_COMMIT_MARGIN_S


def create_app(settings: Settings) -> faust.App:
    kafka, worker, topics = settings.kafka, settings.worker, settings.topics
    return faust.App(
        kafka.consumer_group,
        broker=";".join(f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")),
        broker_credentials=_credentials(kafka),
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        # the group waits this long for members to rejoin: above the wait for batches in flight
        # before a revoke (streams.service.rebalance), so a member finishing them is not evicted
        broker_rebalance_timeout=max(60.0, worker.shutdown_grace_s + REVOKE_COMMIT_MARGIN_S),
        processing_guarantee="at_least_once",  # exactly_once needs transactions, which not every broker has
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_request_timeout=kafka.delivery_timeout_s,
        # Events taken but not yet in a batch stay unacknowledged at a stop (consumed again);
        # StreamService.drain finishes the batches in flight. Faust would wait for the rest forever.
        stream_wait_empty=False,  # Faust's default would block a publish for 20 min
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=topics.partitions,
        topic_replication_factor=topics.replication_factor,
        topic_allow_declare=False,  # the service creates its topics itself, before starting
        datadir=str(Path(worker.data_dir).resolve()),
        web_enabled=True,
        web_bind=worker.web_host,
        web_host=worker.web_host,
        web_port=worker.web_port,
        autodiscover=False,
        # Faust's leader election needs a topic of its own that nothing here uses; with broker
        # auto-creation off (production Kafka, the compose stack) it would log errors forever
        topic_disable_leader=True,
    )


def _credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    context = ssl.create_default_context(cafile=kafka.ssl_cafile) if kafka.security_protocol in ("SSL", "SASL_SSL") else None
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
