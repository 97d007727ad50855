"""The worker's hot path: `behaviors` -> micro-batches -> states, straight on aiokafka.

Faust hosts the worker (lifecycle, signals, web server, sensors), but records do not go
through Faust streams: their per-message path (fetcher, conductor, channel, ack) costs more
than everything else together and capped a worker at about 4,500 events/s on 2 cores
(docs/performance.md). This service polls whole fetches with ``getmany`` and works per batch.

Order of work per micro-batch, what makes at-least-once delivery safe (design/pipeline.md):

1. process: decode, encode, fold into copies of the users' states, in a thread, while the
   event loop sends the previous batch's states and takes Kafka's acknowledgements;
2. wait until Kafka has acknowledged the previous batch;
3. hand the states and processed offset to the partitions' write-behind caches
   (streams/state_cache.py), so that the next batch folds on top of them;
4. publish the changed states (co-partitioned, as whole producer batches) and the dead
   letters, without waiting: the acknowledgements bring the changelog offsets to the caches;
5. every ``commit_interval_s`` for each partition, one partition at a time and spread over
   the interval (and all of them before partitions leave, on shutdown and when the caches
   outgrow their budget): wait for the publication in flight, write what the partition's
   cache holds in one RocksDB WriteBatch, then commit its input offset. A failed
   publication stops the worker before any of this: the caches then hold states Kafka
   lacks, and are never written.

A crash anywhere redelivers what came after the last flush; per-user applied offsets make
the second application a no-op. A partition assigned to this worker is paused and first brought up to date
from its changelog, the states topic (streams/changelog.py), so that it arrives with its state
from whichever worker or host owned it before; it is resumed only once that restore has
succeeded (streams/recovery.py: broker errors are retried, anything else stops the worker). Standby replicas: every ``standby_interval_s`` the
worker catches up its local copies of the partitions it does not own, so that taking one
over reads only the last few seconds of the changelog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from vql.streams.changelog import restore_partition
from vql.streams.dead_letters import fit, letter_producer, topic_limit
from vql.streams.fencing import FencedPublisher, state_batches, without_partitions
from vql.streams.kafka_security import aiokafka_security
from vql.streams.deletion import TombstoneWatch, publish_tombstones
from vql.streams.layout import PARTITION_PROCEDURE, LayoutRefused, state_headers
from vql.streams.processor import BatchProcessor, BatchResult, DeadLetter
from vql.streams.recovery import PartitionRecovery, RestoreFailed, off_loop
from vql.streams.settings import Settings
from vql.streams.standby import catch_up_round
from vql.streams.state_limits import state_batch_bytes, states_limit
from vql.streams.state_store import CorruptStoreError, StoreError

log = logging.getLogger("vql.worker")

MAX_DETAIL_BYTES = 1024  # a dead letter's `detail` header, at most


def dead_letter(letter: DeadLetter, source_topic: str, max_bytes: int
                ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The DLQ contract: the original key, value and headers with a machine-readable reason
    and where the original record came from, as (key, value, headers). A letter larger than
    ``max_bytes`` as a record batch is cut to fit (streams/dead_letters.py; the headers say
    so), so that no record can make the dead-letter publish itself fail."""
    headers = [
        ("reason", letter.rejection.reason.value.encode()),
        ("detail", letter.rejection.detail.encode("utf-8", "replace")[:MAX_DETAIL_BYTES]),
        ("source_topic", source_topic.encode()),
        ("source_partition", str(letter.record.partition).encode()),
        ("source_offset", str(letter.record.offset).encode()),
    ]
    return fit(letter.record.key, letter.record.value, headers, max_bytes)


class Publisher:
    """Publishes a batch's states and dead letters; knows nothing of consuming."""

    def __init__(self, producer: AIOKafkaProducer, settings: Settings,
                 letters: AIOKafkaProducer | None = None, letter_bytes: int | None = None,
                 states_partitions: int = 0) -> None:
        self.producer = producer
        self.settings = settings
        self.letters = letters or producer  # dead letters travel in batches the DLQ accepts
        self.letter_bytes = letter_bytes or settings.max_dead_letter_bytes
        # Each state records the partition count of its topic (streams/layout.py), so that
        # a worker started after a partition change can tell.
        self._state_headers = state_headers(states_partitions) if states_partitions else []
        # Told (partition, first offset, count) of every acknowledged publication: TombstoneWatch.wrote.
        self.written: Callable[[int, int, int], None] = lambda partition, first, count: None

    @classmethod
    async def start(cls, settings: Settings) -> "Publisher":
        """A publisher on started producers: one sized for whole state batches, one whose
        batches fit the DLQ topic's limit (streams/dead_letters.py)."""
        state_bytes = await asyncio.to_thread(states_limit, settings)
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
            max_batch_size=state_batch_bytes(state_bytes), max_request_size=16 * 1024 * 1024,
            **aiokafka_security(),
        )
        letter_bytes = await asyncio.to_thread(topic_limit, settings)
        letters = letter_producer(settings, letter_bytes)
        await producer.start()
        await letters.start()
        return cls(producer, settings, letters, letter_bytes,
                   len(await producer.partitions_for(settings.states_topic)))

    async def stop(self) -> None:
        await self.producer.stop()
        if self.letters is not self.producer:
            await self.letters.stop()

    async def publish(self, result: BatchResult) -> dict[int, int]:
        """Send everything and wait for Kafka's acknowledgements; returns, per partition, the
        last offset the states reached in the states topic (the changelog offset)."""
        deliveries: list[tuple[int, int, asyncio.Future]] = []
        timestamp_ms = int(time.time() * 1000)
        reached: dict[int, int] = {}
        for partition, offset in await publish_tombstones(self.producer, self.settings.states_topic, result):
            reached[partition] = max(reached.get(partition, -1), offset)
            self.written(partition, offset, 1)
        for (partition, states, _offset), values in zip(result.writes, result.encode_wire()):
            if states is None:
                continue
            for count, batch in self._batches(states.user_ids, values, timestamp_ms):
                future = await self.producer.send_batch(batch, self.settings.states_topic, partition=partition)
                deliveries.append((partition, count, future))
        letters = []
        for letter in result.dead_letters:
            key, value, headers = dead_letter(letter, self.settings.behaviors_topic, self.letter_bytes)
            letters.append(await self.letters.send(self.settings.dlq_topic, value, key=key, headers=headers))
        for (partition, count, _future), metadata in zip(deliveries, await asyncio.gather(*(d[2] for d in deliveries))):
            reached[partition] = max(reached.get(partition, -1), metadata.offset + count - 1)
            self.written(partition, metadata.offset, count)
        await asyncio.gather(*letters)
        return reached

    def _batches(self, user_ids: list[str], values: list[bytes], timestamp_ms: int):
        """Producer batches of encoded states, each as large as the producer allows."""
        return state_batches(self.producer, user_ids, values, timestamp_ms, self._state_headers)


class BehaviorConsumer(mode.Service, ConsumerRebalanceListener):
    """Consumes `behaviors` in the app's consumer group and applies it batch by batch."""

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        on_batch: Callable[[BatchResult, list, float, float], None],
        on_flush: Callable[[float], None] = lambda seconds: None,
        on_assigned: Callable[[list[int]], None] = lambda partitions: None,
        on_revoked: Callable[[list[int]], None] = lambda partitions: None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.processor = processor
        self.on_batch = on_batch
        self.on_flush = on_flush
        # Ownership for the per-partition metrics (streams/lag.py): assigned before the
        # restore, so that a partition's lag is exported while it restores; revoked after
        # the last batch's metrics, so that none outlives the partition.
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self._flushed_at: dict[int, float] = {}  # partition -> when its cache was last written
        self._last_flush = time.monotonic()  # of any partition
        self._assigned = False  # whether the group has given this worker partitions yet
        self._rebalancing = False  # between a revocation and the assignment that follows
        self._recovery = PartitionRecovery(self._restore, self._resume, self._fail_stop,
                                           settings.restore_retry_max_s, self._advice)
        self._lock = asyncio.Lock()  # held for a whole batch, and by rebalance callbacks
        self._standby_lock = asyncio.Lock()  # a standby catch-up holds its store open meanwhile
        self._consumer: AIOKafkaConsumer | None = None
        self._publisher: FencedPublisher | None = None
        self._fenced: set[int] = set()  # partitions whose publication was fenced: dropped until reassigned
        self._newly_fenced: set[int] = set()  # fenced by the publication in flight, not yet dropped
        self._processing: asyncio.Future | None = None  # the last batch's processing thread
        self._in_flight: asyncio.Future | None = None  # the last batch's publication
        self._failed: Exception | None = None  # why a publication failed: the worker must stop
        self._layout_failure: LayoutRefused | None = None  # the input's partition count changed
        self._tombstones = TombstoneWatch(settings.kafka_bootstrap, settings.states_topic, settings.behaviors_topic)

    # -- lifecycle ----------------------------------------------------------------------------

    async def on_start(self) -> None:
        s = self.settings
        self._publisher = await FencedPublisher.start(s)
        self._publisher.written = self._tombstones.wrote
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=s.app_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=s.batch_size,
            fetch_max_wait_ms=int(s.batch_window_s * 1000),
            max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, s.session_timeout_s / 3) * 1000),
            # How soon a partition-count change is seen (_check_partition_count); Kafka's default is 5 min.
            metadata_max_age_ms=30_000,
            **aiokafka_security(),
        )
        await self._consumer.start()
        self._consumer.subscribe([s.behaviors_topic], listener=self)

    async def on_stop(self) -> None:
        # Let the batch in progress finish and its publication be acknowledged (_settle), then
        # write and commit everything.
        await self._recovery.cancel()
        async with self._lock:
            try:
                if self._consumer is not None:
                    await self._flush_and_commit()
            finally:  # a failed publication raises above, and has dropped the caches: nothing to write
                if self._consumer is not None:
                    await self._consumer.stop()
                if self._publisher is not None:
                    await self._publisher.stop()
                self.processor.close()

    # -- rebalancing (aiokafka calls these between polls) -------------------------------------

    @property
    def status(self) -> str:
        """starting (no partition yet), recovering (rebalancing, or a partition not yet
        restored), ready, or failed (a restore that cannot succeed: the worker stops)."""
        return self.health()[0]

    def health(self) -> tuple[str, str]:
        """The status and, unless ready, why."""
        if self._recovery.failure is not None:
            return "failed", str(self._recovery.failure)
        if self._layout_failure is not None:
            return "failed", str(self._layout_failure)
        if not self._assigned:
            return "starting", "waiting for the consumer group to assign partitions"
        if self._rebalancing:
            return "recovering", "the consumer group is rebalancing"
        if self._recovery.restoring:
            return "recovering", self._recovery.reason()
        if self._fenced:
            return "recovering", f"partitions {sorted(self._fenced)} were taken over by another worker: rejoining"
        return "ready", ""

    async def on_partitions_revoked(self, revoked) -> None:
        self._rebalancing = True
        partitions = [tp.partition for tp in revoked]
        await self._recovery.cancel(partitions)  # before their stores close
        async with self._lock:  # the batch in flight is written and committed before the partitions go
            await self._flush_and_commit(partitions)
            self.processor.release(partitions)
            self._tombstones.revoked(partitions)
            self.on_revoked(partitions)
            await self._publisher.close(partitions)
            self._fenced.difference_update(partitions)

    async def on_partitions_assigned(self, assigned) -> None:
        """Pause the new partitions and restore them in tasks (aiokafka would swallow what
        this raises, so nothing here may fail): each is resumed once restored."""
        self.on_assigned([tp.partition for tp in assigned])
        self._consumer.pause(*assigned)
        self._assigned, self._rebalancing = True, False
        self._fenced.difference_update(tp.partition for tp in assigned)
        self._recovery.start(sorted(tp.partition for tp in assigned))

    async def _restore(self, partition: int) -> None:
        # The partition's producer first: registering its transactional id fences the previous
        # owner, so nothing it publishes later can land after the restore (streams/fencing.py).
        await self._publisher.open(partition)
        async with self._standby_lock:
            store = await self._open_owned(partition)
            tombstones: list = []
            await restore_partition(store, self.settings.kafka_bootstrap, self.settings.states_topic,
                                    partition, self.processor.model_version, tombstones=tombstones)
            # Bare tombstones the restore applied are answered with delete requests too.
            restored = store.changelog_offset()
            self._tombstones.assigned(partition, 0 if restored is None else restored + 1, tombstones)

    def _resume(self, partition: int) -> None:
        tp = TopicPartition(self.settings.behaviors_topic, partition)
        if tp in self._consumer.assignment():
            self._consumer.resume(tp)

    def _advice(self, partition: int, exc: BaseException) -> str:
        from vql.streams.state_store import partition_store_path

        path = partition_store_path(self.settings.data_dir, self.processor.model_version,
                                    self.settings.behaviors_topic, partition)
        if isinstance(exc, StoreError):
            return (f"Check the store at {path}: if it is held by another process, stop that process; "
                    f"if it is damaged, delete it and start the worker again, which restores it whole from "
                    f"{self.settings.states_topic} (docs/operations.md, 'When a restore fails').")
        return ("Read the error above, fix its cause, and start the worker again (docs/operations.md, "
                "'When a restore fails').")

    async def _fail_stop(self, failure: RestoreFailed) -> None:
        """Stop the worker without consuming the partition: /health says failed meanwhile, and
        the process exits with code 2 (streams/worker.py)."""
        log.error("%s", failure)
        await self.crash(failure)

    async def _open_owned(self, partition: int, patience_s: float = 30.0):
        """The partition's store; while the previous owner on this host (or its standby
        catch-up) still holds the files, wait for it rather than fail."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return self.processor.store(partition)
            except StoreError as exc:
                if isinstance(exc, CorruptStoreError) or time.monotonic() > deadline:
                    raise  # a corrupt store does not mend by waiting
                await asyncio.sleep(0.5)

    @property
    def kafka(self) -> AIOKafkaConsumer | None:
        """The group consumer, once started: its assignment and offsets, for the lag."""
        return self._consumer

    # -- standby replicas ---------------------------------------------------------------------

    @mode.Service.task
    async def _standby(self) -> None:
        interval = self.settings.standby_interval_s
        topic, states = self.settings.behaviors_topic, self.settings.states_topic
        while interval and not self.should_stop:
            await self.sleep(interval)
            try:
                partitions = sorted(self._consumer.partitions_for_topic(topic) or set())
                # One offsets request a round, so that a partition with nothing new costs no
                # restore consumer of its own.
                ends = await self._consumer.end_offsets([TopicPartition(states, p) for p in partitions])
            except Exception as exc:  # noqa: BLE001 - the next round asks again
                log.warning("standby round skipped, retried in %.0f s: %r", interval, exc)
                continue
            await catch_up_round(
                partitions, {p: ends[TopicPartition(states, p)] for p in partitions},
                owned=lambda p: TopicPartition(topic, p) in self._consumer.assignment(),
                open_store=self.processor.open_unowned,
                restore=lambda store, p: restore_partition(store, self.settings.kafka_bootstrap, states, p,
                                                           self.processor.model_version, "standby"),
                lock=self._standby_lock, stopping=lambda: self.should_stop,
            )

    # -- bare tombstones ------------------------------------------------------------------------

    @mode.Service.task
    async def _watch_tombstones(self) -> None:
        """Turn bare tombstones on owned partitions into delete requests (streams/deletion.py)."""
        interval = self.settings.tombstone_check_interval_s
        while interval and not self.should_stop:
            await self.sleep(interval)
            try:
                reads = self._tombstones.reads
                requested = await self._tombstones.check(self._publisher.producer)
                if self._tombstones.reads > reads:
                    log.info("tombstone check: read %d partition ranges that others wrote to",
                             self._tombstones.reads - reads)
                for user, partition in requested:
                    log.info("bare tombstone for %r on %s partition %d: delete request sent",
                             user, self.settings.states_topic, partition)
            except KafkaError as exc:
                log.warning("tombstone check failed, retried next round: %s", exc)

    # -- the loop -----------------------------------------------------------------------------

    @mode.Service.task
    async def _run(self) -> None:
        window_ms = int(self.settings.batch_window_s * 1000)
        while not self.should_stop:
            fetched = await self._consumer.getmany(timeout_ms=window_ms, max_records=self.settings.batch_size)
            if changed := self._partition_count_changed():
                self._layout_failure = changed  # not applied, not committed: /health says failed
                log.error("%s", changed)
                await self.crash(changed)
                return
            async with self._lock:
                if self.should_stop:
                    return  # not committed: the next owner gets these records again
                if fetched:
                    await self._apply(fetched)
                if self.processor.needs_flush():
                    await self._flush_and_commit()
                elif due := self._due_partitions():
                    await self._flush_and_commit(due)

    def _partition_count_changed(self) -> LayoutRefused | None:
        """Why to stop, when the input topic's partition count changed under the running
        worker: its users would move to partitions whose stores do not know them
        (streams/layout.py). The process exits with code 2, and a restart refuses."""
        count = len(self._consumer.partitions_for_topic(self.settings.behaviors_topic) or ())
        if self.processor.partitions and count and count != self.processor.partitions:
            return LayoutRefused(f"{self.settings.behaviors_topic} now has {count} partitions, this worker started "
                                 f"with {self.processor.partitions}: it stops; {PARTITION_PROCEDURE}")
        return None

    def _due_partitions(self) -> list[int]:
        """The partitions to write now: each unwritten one every ``commit_interval_s``, but
        one at a time, at least ``commit_interval_s / partitions owned`` apart. Why: a flush
        stops the loop (the RocksDB write holds the GIL), and writing every partition at once
        stopped it for 160-850 ms every interval, the worst of the freshness tail
        (docs/performance.md); a partition at a time makes it several short pauses. With an
        interval of 0, every partition after every batch."""
        now, interval = time.monotonic(), self.settings.commit_interval_s
        due = [p for p in self.processor.unflushed() if now - self._flushed_at.setdefault(p, now) >= interval]
        if not due or interval == 0:
            return due
        if now - self._last_flush < interval / max(1, len(self._consumer.assignment())):
            return []
        return [min(due, key=self._flushed_at.__getitem__)]

    async def _flush_and_commit(self, partitions: list[int] | None = None) -> None:
        """Write the caches of ``partitions`` (default: all) to RocksDB, then commit the
        input offsets they reached: never the other way round."""
        await self._settle()
        started = time.perf_counter()
        # In a thread: RocksDB writes of a whole partition's cache, while the loop heartbeats.
        durable = await off_loop(self.processor.flush, partitions)
        flushed = time.perf_counter()
        self._last_flush = time.monotonic()
        for partition in durable if partitions is None else partitions:
            self._flushed_at[partition] = self._last_flush
        offsets = {TopicPartition(self.settings.behaviors_topic, p): o + 1 for p, o in durable.items()}
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # The group moved on (a rebalance): the records come again to their new owner,
                # whose applied offsets make them no-ops. Nothing is lost.
                log.warning("offset commit failed, the records since will be redelivered: %s", exc)
        self.on_flush(flushed - started)
        log.info("flush: %d partitions written in %.0f ms, committed in %.0f ms", len(durable),
                  (flushed - started) * 1e3, (time.perf_counter() - flushed) * 1e3)

    async def _apply(self, fetched: dict) -> None:
        owned = self._consumer.assignment()
        restoring = set(self._recovery.restoring) | self._fenced
        # A partition revoked while we waited for the lock: the new owner has its records. One
        # not yet restored is paused before its first fetch (aiokafka drops what a paused
        # partition fetched); records of it here are from before the rebalance: its position
        # restarts at the committed offset, so they come again once it is restored.
        records = [m for tp, messages in fetched.items() if tp in owned and tp.partition not in restoring
                   for m in messages]
        if not records:
            return
        timestamps = [m.timestamp for m in records]
        started = time.perf_counter()
        # In a thread: the event loop meanwhile sends the previous batch's states and takes
        # Kafka's acknowledgements (and heartbeats), on the core the processing leaves free.
        self._processing = asyncio.ensure_future(asyncio.to_thread(self.processor.process, records))
        result = await asyncio.shield(self._processing)  # cancelled, the thread still finishes: _settle waits
        processed = time.perf_counter()
        await self._settle()
        # Processed on top of a partition fenced meanwhile: none of it may be kept or published.
        result = without_partitions(result, self._fenced)
        # Into the caches before publication, so that the next batch folds on top of these
        # states while they travel: safe because nothing reaches RocksDB before every
        # publication in flight is acknowledged (_flush_and_commit settles first), and a
        # failed publication stops the worker without a flush (_settle).
        self.processor.commit(result)
        self._in_flight = asyncio.ensure_future(self._publish(result, timestamps, processed - started))

    async def _publish(self, result: BatchResult, timestamps: list[int], process_s: float) -> None:
        started = time.perf_counter()
        changelog, fenced = await self._publisher.publish(result)
        if fenced:
            self._newly_fenced |= fenced
            changelog = {p: o for p, o in changelog.items() if p not in fenced}
        published = time.perf_counter()
        self.processor.reached(changelog)
        self.on_batch(result, timestamps, process_s, published - started)
        log.info(
            "batch: %d records, %d applied, %d duplicates, %d dead letters, %d states published; "
            "process %.0f ms (encode %.0f), publish %.0f ms%s",
            len(timestamps), result.applied, result.duplicates, len(result.dead_letters), result.state_count,
            process_s * 1e3, result.encode_s * 1e3, (published - started) * 1e3,
            f" (fenced, not visible: partitions {sorted(fenced)})" if fenced else "",
        )

    async def _settle(self) -> None:
        """Wait for the publication in flight. If it failed, the caches hold states Kafka
        does not have: they are dropped unwritten, and this raises now and at every later
        call, so that the worker stops instead of consuming on (the records since the last
        flush come again, to whoever owns their partitions next)."""
        if self._processing is not None and not self._processing.done():
            await asyncio.wait([self._processing])  # a cancelled batch's thread: it touches the caches
        if self._failed is not None:
            raise RuntimeError("a publication failed: this worker stops; the records since its last "
                               "flush will be redelivered") from self._failed
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        try:
            await in_flight
        except Exception as exc:
            self._failed = exc
            self.processor.discard()
            raise
        self._drop_fenced()

    def _drop_fenced(self) -> None:
        """Partitions whose publication was fenced belong to another worker now (this one was
        dropped from the group without knowing it): forget their caches unwritten (the fenced
        transaction's states never became visible), take no more of their records, and ask
        the group for a rejoin, which revokes them here. Not a crash: the other partitions
        may well still be this worker's."""
        fenced, self._newly_fenced = self._newly_fenced, set()
        if not fenced:
            return
        self._fenced |= fenced
        self.processor.forget(sorted(fenced))
        owned = [tp for tp in self._consumer.assignment() if tp.partition in fenced]
        if owned:
            self._consumer.pause(*owned)
        log.warning("publication to partitions %s fenced: another worker has taken them over; their "
                    "unpublished states are dropped and this worker rejoins the group", sorted(fenced))
        # aiokafka has no public call for it; without one, the next heartbeat finds out.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None:
            coordinator.request_rejoin()
