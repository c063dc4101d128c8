"""The OpenAPI document served at /openapi.json, checked against a running node.

schemathesis generates requests for every documented operation (valid ones and,
for /rpc/call, invalid ones too) and checks each reply against the document:
no 5xx, a documented status, the documented content type, and a body that
matches the documented schema.

schemathesis' own pytest integration (`from_fixture` + `parametrize`) fails on
pytest 9 (it sets `request.node._nodeid`), so each operation is driven here
with a plain hypothesis `@given` over the operation's strategy.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from importlib import resources

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import Bigpipe, base_config, consumer_entry, free_port, unique

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 30
PACKAGED = (resources.files("bigpipe") / "openapi.json").read_bytes()
DOCUMENT = json.loads(PACKAGED)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
OPERATIONS = [(m, p) for p, item in DOCUMENT["paths"].items() for m in METHODS if m in item]
# README's endpoints, and the methods each answers.
EXPECTED = {
    "/rpc/call": {"post"},
    "/rpc/calls": {"post"},
    "/rpc/call/{id}": {"get"},
    "/stats": {"get"},
    "/metrics": {"get"},
    "/dashboard": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
    "/openapi.json": {"get"},
    "/rpc/server/mock": set(METHODS),  # ANY
    "/admin/dlq": {"get"},
    "/admin/dlq/show": {"get"},
    "/admin/dlq/redrive": {"post"},
    "/admin/replay": {"post"},
}


@pytest.fixture(scope="module")
async def node(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bigpipe]:
    """A node with one consumer group, so /stats has every section filled in."""
    topic = unique("openapi")
    config = base_config(
        kafka,
        topic,
        free_port(),
        partitions=1,
        consumers=[consumer_entry(topic, unique("g"))],
    )
    bigpipe = await Bigpipe(config, tmp_path_factory.mktemp("openapi")).start()
    yield bigpipe
    assert await bigpipe.stop() == 0, bigpipe.log_tail()


@pytest.fixture(scope="module")
def api_schema(node: Bigpipe) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{node.url}/openapi.json")


def test_openapi_json_is_served_and_lists_every_endpoint(node: Bigpipe) -> None:
    with urllib.request.urlopen(f"{node.url}/openapi.json", timeout=10) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "application/json"
        served = response.read()
    assert served == PACKAGED
    document = json.loads(served)
    assert document["openapi"].startswith(("3.0.", "3.1."))
    documented = {
        path: {m for m in METHODS if m in item} for path, item in document["paths"].items()
    }
    assert documented == EXPECTED


def test_openapi_document_is_valid(api_schema: schemathesis.BaseSchema) -> None:
    api_schema.validate()  # against the OpenAPI meta-schema


@pytest.mark.parametrize(
    ("method", "path"), OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in OPERATIONS]
)
def test_operation_conforms(
    api_schema: schemathesis.BaseSchema, node: Bigpipe, method: str, path: str
) -> None:
    operation = api_schema[path][method.upper()]
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    if "requestBody" in DOCUMENT["paths"][path][method]:
        strategy = st.one_of(strategy, operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def conforms(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=node.url, checks=CHECKS)

    conforms()
