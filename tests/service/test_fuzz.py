"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis), against a keyed server.

Every operation gets generated requests, valid and invalid; the server must answer each with a
documented status and never with a 500. Bounded: a fixed number of examples per operation, on loopback.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance
from service_harness import ServerProcess, module_server, write_key_file

KEY = "pt-fuzz-key-0123456789"
MAX_EXAMPLES = 40  # per operation


@pytest.fixture(scope="module")
def fuzzed_server(request, tmp_path_factory):
    keys = write_key_file(tmp_path_factory.mktemp("fuzz-keys") / "keys.txt", [f"{KEY} fuzzer"])
    # One slot and no retries: the few generated specs that are valid queue up behind one worker.
    yield from module_server(request, tmp_path_factory, "--api-key-file", str(keys), "--max-retries", "0",
                             "--max-upload-mb", "1", "--max-body-mb", "1", api_key=KEY)


def test_the_api_never_answers_500_and_keeps_to_its_schema(fuzzed_server: ServerProcess):
    # schemathesis' own pytest plugin does not run under pytest 9; its Python API does the same work.
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12  # every route of the API is in its schema
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    answered: dict[str, set[int]] = {}

    for operation in operations:
        @given(case=st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                              operation.as_strategy(GenerationMode.NEGATIVE)))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def fuzz(case) -> None:
            response = case.call_and_validate(base_url=fuzzed_server.url, timeout=30, checks=checks,
                                              headers={"Authorization": f"Bearer {KEY}"})
            answered.setdefault(case.operation.label, set()).add(response.status_code)

        fuzz()

    # The key was accepted and requests got past validation: most operations answered 2xx at least once.
    succeeded = [label for label, codes in answered.items() if any(200 <= code < 300 for code in codes)]
    assert len(succeeded) >= 6, answered
    assert not any(401 in codes or 403 in codes for codes in answered.values()), answered


def test_the_fuzzed_server_is_still_healthy_and_every_job_it_queued_can_be_cancelled(fuzzed_server: ServerProcess):
    with fuzzed_server.client() as client:
        assert client.ready()
        for job in client.list_jobs(state=["queued", "running"], limit=500).jobs:
            client.cancel(job.id)
        assert client.list_jobs(state=["queued"], limit=1).total == 0
