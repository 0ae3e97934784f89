"""The ops endpoint's OpenAPI document, and schemathesis run against a real node with it."""

import sys
from pathlib import Path

import trio

from server.ops import create_ops_app
from tests.helpers import ADMIN, RunningServer, run_server

SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")


async def test_the_document_is_served_without_a_token(tmp_path: Path) -> None:
    async with run_server(tmp_path, max_text_chars=100) as server, server.http(admin=False) as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    text = document["components"]["schemas"]["NewMessage"]["properties"]["text"]
    assert text["maxLength"] == 100  # this node's limit


async def test_the_document_describes_every_route(server: RunningServer) -> None:
    routes = {
        (rule.rule.replace("<", "{").replace(">", "}"), method.lower())
        for rule in create_ops_app(server.node).url_map.iter_rules()
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }
    async with server.http(admin=False) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    described = {
        (path, method) for path, item in paths.items() for method in item if method != "parameters"
    }
    assert routes == described
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if path.startswith("/admin/"):
                assert operation["security"] == [{"adminToken": []}], (path, method)
                assert {"400", "401", "403", "500"} <= set(operation["responses"])


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    server: RunningServer, tmp_path: Path
) -> None:
    """Every check schemathesis has (5xx, status codes, content types, response schemas,
    refusal of invalid input, acceptance of valid input, methods, auth), with a fixed
    seed and a bounded number of cases per operation."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "run",
        f"{server.ops_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN}",
        "--checks",
        "all",
        "--max-examples",
        "30",
        "--seed",
        "1",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--report-dir",
        str(tmp_path / "report"),
        "--output-truncate",
        "true",
        "--no-color",
    ]
    with trio.fail_after(300):  # a guard against a hang, not a measure
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert "No issues found" in output, output
