"""Reading custom-resource YAML files: the same files kubectl applies, read locally."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_resource(path: Path, *, kind: str, error: type[ValueError]) -> dict[str, Any]:
    """The one document of ``kind`` in the YAML file at ``path``; ``error`` says what is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"cannot read {kind} file {path}: {exc.strerror}") from exc
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from exc
    found = [d for d in documents if isinstance(d, dict) and d.get("kind") == kind]
    if len(found) != 1:
        raise error(f"{path} must hold exactly one {kind}, found {len(found)}")
    resource: dict[str, Any] = found[0]
    return resource
