"""The load runner: sends a workload's jobs to a target under a load shape and records every stream.

    arrivals (rate, burstiness) ──► wait for a concurrency slot (if limited) ──► job task
        job task: turn 1 ──► turn 2 ──► ...   each turn one streamed request → one RequestRecord

Load shapes (LoadSpec), as `vllm bench serve` combines them:
    --request-rate R [--burstiness B]       open loop: arrivals at R/s whatever the server does
    --max-concurrency N                     closed loop when the rate is inf: N jobs in flight, the
                                            next sent as one finishes; with a rate, a cap on top
A run is limited by a number of jobs (num_prompts) or by a duration of sending. Warm-up jobs are
marked and left out of the metrics, in one of two ways:
    --warmup N           the first N jobs are sent under the load shape and finish before the
                         measured ones start (as `vllm bench serve --num-warmups`); the arrival
                         clock then restarts, so a burst of num_prompts measures exactly those jobs
                         against a warm server, not num_prompts + N sharing it
    --warmup-seconds S   the jobs sent in the first S seconds run under the same load as the ones
                         after them, so the measured window sees a warm server in steady state

Every request has a gRPC deadline (request_timeout), so nothing waits forever. A duration-limited
run stops sending when its window closes (conversations start no new turns), lets in-flight
requests finish for drain_timeout, then cancels the rest (status CANCELLED). `stop()` (Ctrl-C)
cancels everything at once; the records so far are kept and the outcome says it was interrupted.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import numpy as np

from protos.tandem.v1 import common_pb2

from .arrivals import ArrivalProcess
from .timeline import CANCELLED, INCOMPLETE, SERVER_ABORT, RequestRecord
from .workloads.base import Job, Reply, RequestSpec

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in common_pb2.FinishReason.items()}
_GUARD_S = 10.0  # beyond the gRPC deadline, the client's own guard against a stream that never ends


@dataclass(frozen=True)
class LoadSpec:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_prompts: int | None = None  # measured jobs (conversations, for multi-turn)
    duration: float | None = None  # seconds of sending, after the warm-up
    warmup: int = 0  # jobs
    warmup_seconds: float = 0.0
    request_timeout: float = 300.0
    drain_timeout: float | None = None  # duration runs; None = request_timeout + a margin
    seed: int = 0  # the arrival process's; the workload has its own

    def __post_init__(self) -> None:
        ArrivalProcess(self.request_rate, self.burstiness)  # validates both
        if (self.num_prompts is None) == (self.duration is None):
            raise ValueError("limit the run by a number of prompts or by a duration (one of them)")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if self.duration is not None and math.isinf(self.request_rate) and self.max_concurrency is None:
            raise ValueError("a duration-limited run at an infinite rate needs --max-concurrency (or a --request-rate)")
        if self.warmup < 0 or self.warmup_seconds < 0:
            raise ValueError("warm-up must be >= 0")
        if not self.request_timeout > 0:
            raise ValueError(f"request timeout must be > 0 seconds, got {self.request_timeout}")

    @property
    def arrivals(self) -> ArrivalProcess:
        return ArrivalProcess(self.request_rate, self.burstiness)

    def to_json(self) -> dict:
        return {
            "request_rate": self.request_rate if math.isfinite(self.request_rate) else "inf",
            "burstiness": self.burstiness if math.isfinite(self.burstiness) else "inf",
            "arrivals": self.arrivals.name,
            "max_concurrency": self.max_concurrency,
            "num_prompts": self.num_prompts,
            "duration_limit_s": self.duration,
            "warmup": self.warmup,
            "warmup_seconds": self.warmup_seconds,
            "request_timeout_s": self.request_timeout,
            "seed": self.seed,
        }


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    measured_start: float  # seconds from the run's start
    measured_end: float | None  # the last measured request's end; None when none ended
    started_at: str  # ISO 8601, UTC
    wall_seconds: float
    client_cpu_seconds: float  # this process's user + system CPU time during the run
    interrupted: bool = False

    @property
    def duration(self) -> float | None:
        if self.measured_end is None or self.measured_end <= self.measured_start:
            return None
        return self.measured_end - self.measured_start


class LoadRunner:
    """One run. `stats()` may be polled while it runs (progress); `stop()` interrupts it."""

    def __init__(self, target, jobs: Iterator[Job], spec: LoadSpec, run_id: str = "bench"):
        self.target = target
        self.jobs = jobs
        self.spec = spec
        self.run_id = run_id
        self.records: list[RequestRecord] = []
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._closed = False  # no new conversation turns (see `_closing`)
        self._send_until: float | None = None  # duration runs: when the sending window closes
        self._t0 = time.perf_counter()  # reset when the run starts
        self.jobs_started = self.jobs_done = 0
        self.measured_jobs_done = 0
        self.in_flight = self.num_ok = self.num_failed = self.num_warmup = 0

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def elapsed(self) -> float:
        return self._now()

    def stats(self) -> dict:
        """Counters for a progress display (measured requests only, except `warmup`)."""
        return {"jobs_done": self.measured_jobs_done, "ok": self.num_ok, "failed": self.num_failed, "in_flight": self.in_flight, "warmup": self.num_warmup}

    @property
    def _closing(self) -> bool:
        """True once no conversation may start another turn: stopped, drained, or past the window."""
        return self._closed or (self._send_until is not None and self._now() >= self._send_until)

    def stop(self) -> None:
        """Stop sending and cancel every job in flight. Safe to call from a signal handler."""
        self._stop.set()
        self._closed = True
        for task in list(self._tasks):
            task.cancel()

    async def run(self) -> RunOutcome:
        s = self.spec
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        cpu0 = _cpu_seconds()
        self._t0 = time.perf_counter()
        offsets = s.arrivals.offsets(np.random.default_rng([s.seed, 1]))
        semaphore = asyncio.Semaphore(s.max_concurrency) if s.max_concurrency else None
        send_until = self._send_until = None if s.duration is None else s.warmup_seconds + s.duration
        # the measured window opens at the start (as vLLM's duration), or where the warm-up ends:
        # at --warmup-seconds, or when the first job after the --warmup ones is sent
        measured_start = None if s.warmup or s.warmup_seconds else 0.0
        shift = 0.0  # how far the arrival clock moved on while the warm-up jobs finished
        index = 0
        while not self._stop.is_set():
            if s.num_prompts is not None and index >= s.warmup + s.num_prompts:
                break
            offset = next(offsets) + shift
            if index == s.warmup and s.warmup:
                if not await self._finish_warmup():
                    break
                shift = self._now() - offset
                offset += shift
                send_until = self._send_until = None if send_until is None else send_until + shift
            if send_until is not None and offset >= send_until:
                break
            if not await self._sleep_until(offset):
                break
            if semaphore is not None:
                if not await self._acquire(semaphore, send_until):
                    break
            now = self._now()
            warmup = index < s.warmup or now < s.warmup_seconds
            if not warmup and measured_start is None:
                measured_start = now if s.warmup else s.warmup_seconds
            job = next(self.jobs, None)
            if job is None:  # the workloads here are endless; a finite one simply ends the run
                if semaphore is not None:
                    semaphore.release()
                break
            self._spawn(self._run_job(job, index, warmup, offset, semaphore))
            index += 1
        await self._drain()
        for r in self.records:  # anything still without a status never finished
            if r.status is None:
                r.status, r.error = CANCELLED, r.error or "still running when the run ended"
                r.end = r.end if r.end is not None else self._now()
        ends = [r.end for r in self.records if not r.warmup and r.end is not None]
        return RunOutcome(
            records=self.records,
            measured_start=measured_start if measured_start is not None else self._now(),
            measured_end=max(ends) if ends else None,
            started_at=started_at,
            wall_seconds=self._now(),
            client_cpu_seconds=_cpu_seconds() - cpu0,
            interrupted=self._stop.is_set(),
        )

    # ---- dispatch ------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.jobs_started += 1

    async def _finish_warmup(self) -> bool:
        """Wait for the warm-up jobs (all the jobs sent so far) to end; False when stopped meanwhile.
        Each has its request deadline, so this ends."""
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            while self._tasks and not self._stop.is_set():
                await asyncio.wait(self._tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        return not self._stop.is_set()

    async def _sleep_until(self, offset: float) -> bool:
        """Wait until `offset` seconds into the run; False when stopped meanwhile."""
        delay = offset - self._now()
        if delay > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                pass
        return not self._stop.is_set()

    async def _acquire(self, semaphore: asyncio.Semaphore, until: float | None) -> bool:
        """Take a concurrency slot; False (holding none) when stopped or when the sending window
        closes (`until`, seconds into the run) first."""
        acquire = asyncio.ensure_future(semaphore.acquire())
        stopper = asyncio.ensure_future(self._stop.wait())
        timeout = None if until is None else max(0.0, until - self._now())
        await asyncio.wait({acquire, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not acquire.done():
            acquire.cancel()
            await asyncio.gather(acquire, return_exceptions=True)
        got = acquire.done() and not acquire.cancelled()
        if got and (self._stop.is_set() or (until is not None and self._now() >= until)):
            semaphore.release()
            return False
        return got

    async def _drain(self) -> None:
        """Wait for the jobs in flight (count-limited: all of them; duration-limited: up to the
        drain timeout), then cancel what is left."""
        s = self.spec
        limit = None if s.duration is None else (s.drain_timeout if s.drain_timeout is not None else s.request_timeout + _GUARD_S)
        deadline = None if limit is None else time.perf_counter() + limit
        stop_waiter = asyncio.create_task(self._stop.wait())
        try:
            while self._tasks and not self._stop.is_set():
                remaining = None if deadline is None else deadline - time.perf_counter()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.wait(self._tasks | {stop_waiter}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_waiter.cancel()
        self._closed = True
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_GUARD_S)

    async def _run_job(self, job: Job, job_index: int, warmup: bool, scheduled: float, semaphore: asyncio.Semaphore | None) -> None:
        """Run one job's turns in order; a failed turn ends the job."""
        try:
            previous: Reply | None = None
            first = True
            while (spec := job.next_request(previous)) is not None:
                if not first:
                    if spec.delay > 0:
                        await asyncio.sleep(spec.delay)
                    if self._closing:
                        break
                    scheduled = self._now()  # later turns are sent when due, never queued
                record = self._new_record(spec, job_index, warmup, scheduled)
                await self._send(spec, record)
                if not record.success:
                    break
                previous = Reply(record.output_token_ids, record.text)
                first = False
        finally:
            if semaphore is not None:
                semaphore.release()
            self.jobs_done += 1
            if not warmup:
                self.measured_jobs_done += 1

    def _new_record(self, spec: RequestSpec, job_index: int, warmup: bool, scheduled: float) -> RequestRecord:
        index = len(self.records)
        record = RequestRecord(
            index=index, request_id=f"{self.run_id}-{index}", job=job_index, warmup=warmup, scheduled=scheduled,
            prompt_kind=spec.prompt_kind, tags=dict(spec.tags), expected_prompt_tokens=spec.num_prompt_tokens, max_tokens=spec.max_tokens,
        )  # fmt: skip
        self.records.append(record)
        return record

    # ---- one stream ----------------------------------------------------------------------------

    async def _send(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Stream one request, filling `record`. Never raises except CancelledError (re-raised
        after the record says CANCELLED and the call is cancelled, which cancels it server-side)."""
        timeout = self.spec.request_timeout
        call = None
        self.in_flight += 1
        record.send = self._now()
        try:
            async with asyncio.timeout(timeout + _GUARD_S):
                call = self.target.generate(spec, record.request_id, record.index, timeout)
                async for chunk in call:
                    t = self._now()
                    if chunk.token_ids:
                        record.chunk_times.append(t)
                        record.chunk_tokens.append(len(chunk.token_ids))
                        record.output_token_ids.extend(chunk.token_ids)
                    if chunk.text:
                        record.output_text_parts.append(chunk.text)
                    if chunk.finish_reason:
                        record.finish_reason = FINISH_NAMES.get(chunk.finish_reason, str(chunk.finish_reason))
                        if chunk.HasField("usage"):
                            u = chunk.usage
                            record.prompt_tokens, record.cached_prompt_tokens, record.completion_tokens = (
                                u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens
                            )  # fmt: skip
            record.end = self._now()
            if record.finish_reason in ("stop", "length"):
                record.status = "OK"
            elif record.finish_reason == "abort":
                record.status, record.error = SERVER_ABORT, "the server aborted the request (finish_reason ABORT)"
            else:
                record.status, record.error = INCOMPLETE, "the stream closed without a finish reason"
        except grpc.aio.AioRpcError as e:
            record.end = self._now()
            record.status, record.error = e.code().name, e.details() or ""
        except TimeoutError:
            record.end = self._now()
            record.status, record.error = "DEADLINE_EXCEEDED", f"no end of stream {timeout + _GUARD_S:.0f}s after sending (client guard)"
        except ValueError as e:  # the target cannot express this request (text to a worker)
            record.end = self._now()
            record.status, record.error = "CLIENT_ERROR", str(e)
        except asyncio.CancelledError:
            record.end = self._now()
            record.status, record.error = CANCELLED, "cancelled by the client"
            raise
        finally:
            self.in_flight -= 1
            if record.warmup:
                self.num_warmup += 1
            elif record.success:
                self.num_ok += 1
            else:
                self.num_failed += 1
            if call is not None and record.status != "OK":
                call.cancel()


def _cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
