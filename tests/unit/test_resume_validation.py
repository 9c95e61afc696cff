"""A decode worker refuses a migrated request's resume_token_ids that it cannot run, naming the field
(they are fed to the model: an id outside the vocabulary would kill the engine thread)."""

from __future__ import annotations

import pytest

from protos.tandem.v1 import common_pb2, worker_pb2
from services.decode.service import resume_problem

VOCAB, MAX_LEN = 100, 64


def req(resume, prompt=(1, 2, 3), max_tokens=None, handle=False):
    r = worker_pb2.WorkerGenerateRequest(prompt_token_ids=list(prompt), resume_token_ids=list(resume))
    if max_tokens is not None:
        r.sampling.CopyFrom(common_pb2.SamplingParams(max_tokens=max_tokens))
    if handle:
        r.kv_handle.request_id = "x"
    return r


@pytest.mark.parametrize(
    "request_, problem",
    [
        (req([5, 6]), None),
        (req([5, 6], max_tokens=3), None),
        (req([5, 100]), "resume_token_ids[1] = 100 is outside the vocabulary"),
        (req([5], handle=True), "cannot be combined with kv_handle"),
        (req([5] * 61), "max_model_len"),
        (req([5, 6, 7], max_tokens=3), "already max_tokens"),
    ],
)
def test_resume_problems_name_the_field(request_, problem):
    got = resume_problem(request_, VOCAB, MAX_LEN)
    assert (got is None) if problem is None else (problem in got)
