"""Fuzzing the HTTP API over fake engines, from the server's own OpenAPI document: 1,500
generated requests over every operation, none may get a 5xx, every error must have the
OpenAI body, and the server is healthy at the end. (tests/integration/test_fuzz.py does
the same against the real engine.)"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests import fuzz
from tests.unit.conftest import ADMIN_KEY

EXAMPLES = 1500


def test_generated_requests_never_get_a_5xx(client):
    openapi = client.get("/openapi.json").json()
    operations = fuzz.operations(openapi)
    assert len(operations) >= 13 and sum(op.body is not None for op in operations) >= 5
    statuses: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzz.requests(openapi, ["alpha", "beta", "tiny-base", "tiny-base:alpha"]))
    def one(request):
        method, path, content, headers = request
        response = client.request(method, path, content=content, headers={**headers, "authorization": f"Bearer {ADMIN_KEY}"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (method, path, content[:300] if content else None, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text

    one()
    print("statuses:", dict(sorted(statuses.items())))
    assert sum(statuses.values()) >= EXAMPLES
    assert statuses.get(200, 0) > 50  # the generator reaches the handlers, not only the 4xx paths
    assert client.get("/health").status_code == 200
