"""Looking at what a test left on the S3 server and on the local disk."""

from __future__ import annotations

import os
from pathlib import Path


def objects(uri: str) -> dict[str, int]:
    """key -> size of every object under `s3://bucket/prefix` (directory markers included)."""
    import boto3

    name, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def scheme_named_folders(root: Path) -> list[Path]:
    """Local folders named like a URI scheme (`s3:`): what a URI read as a local path creates."""
    return [p for p in root.rglob("*:") if p.is_dir()]
