"""Simulated workers: the real workers' protocol and the real engine's scheduling, with a clock
instead of a model (see docs/architecture.md, "Simulated workers").

    fleet.py      SimFleet: many workers in one process (`python -m loadtest.sim.fleet`)
    worker.py     SimWorker: one prefill or decode worker's gRPC services, etcd registration
    host.py       SimHost: the tandem.v1.Worker service (load, KV events) over a SimEngine
    leases.py     SimLeases: a prefill's pinned blocks, released by a decode worker's token
    engine.py     SimEngine: the step loop (requests in, outputs out, steps timed)
    scheduler.py  SimScheduler: services/engine/scheduler.py's decisions
    kv_cache.py   SimKVCache: services/engine/block_pool.py + kv_cache_manager.py, without tensors
    request.py    SimRequest and the engine's outputs (plain data)
    timing.py     TimingModel: what a step costs, fitted to the real engine

DESIGN §2 forbids loadtest importing the engine, so scheduler.py and kv_cache.py mirror it;
tests/unit/test_sim_matches_engine.py drives both with one trace and fails when they part.
"""
