"""Property-based fuzzing of the HTTP API from its OpenAPI schema: no input gives a 5xx.

Cases come from schemathesis' Hypothesis strategies (valid bodies and, in the negative
mode, bodies that break the schema), drawn inside a plain Hypothesis test so the app can
be built from a pytest fixture.
"""

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from serving.cascade import CascadeConfig  # noqa: E402
from serving.service import ServiceConfig, create_app  # noqa: E402

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CASES = [("POST", "/v1/recommend", POSITIVE), ("POST", "/v1/recommend", NEGATIVE),
         ("POST", "/v1/retrieve", POSITIVE), ("POST", "/v1/retrieve", NEGATIVE),
         ("GET", "/v1/models", POSITIVE), ("GET", "/healthz", POSITIVE), ("GET", "/readyz", POSITIVE)]
EXAMPLES = int(os.environ.get("RECFUNNEL_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(ranked_workdir):
    app = create_app(ServiceConfig(ranked_workdir, poll_interval=0, max_k=50,
                                   cascade=CascadeConfig(retrieval_candidates=100, preranker_candidates=50)))
    app.state.watcher.refresh()  # the ASGI transport does not run the lifespan
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_input_makes_the_service_fail(api_schema, method, path, mode):
    operation = api_schema[path][method]
    statuses = []

    @settings(max_examples=EXAMPLES if method == "POST" else 3, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        case = data.draw(operation.as_strategy(generation_mode=mode))
        response = case.call()
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text[:500])
        if mode == POSITIVE:
            case.validate_response(response)

    check()
    assert statuses
    if mode == NEGATIVE:
        assert all(400 <= s < 500 for s in statuses), statuses
