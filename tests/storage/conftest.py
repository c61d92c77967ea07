"""A real S3-protocol server for the tests: moto's server on 127.0.0.1, one per test session.

`bucket` gives each test module a fresh bucket and points the standard environment variables at the
server for that module only (pyarrow's S3 filesystem reads `AWS_ENDPOINT_URL`, the keys and the region from them; a
local Ray started by the job passes the driver's environment on to its workers, so they read them too).
"""

from __future__ import annotations

import logging
import uuid

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "ovis-batch-test",
    "AWS_SECRET_ACCESS_KEY": "ovis-batch-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_endpoint) -> dict[str, str]:
    """The environment of this module's tests (and of the jobs they start) pointing at the server."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, **S3_ENV}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        yield env


@pytest.fixture(scope="module")
def bucket(s3_env) -> str:
    """`s3://<a new bucket>`, empty; shared by the tests of one module (each uses its own prefix)."""
    import boto3

    name = f"ovis-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"
