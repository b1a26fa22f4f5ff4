"""Reading custom-resource YAML files: the same files kubectl applies, read locally.

A file is checked in the order that costs least first, and every refusal names the file and, where
there is one, the line (``FILE:LINE: problem``):
- its size, before a byte is parsed: a 50 MB policy once cost 80 s and 1.9 GB of memory before
  its rejection; no resource of ours comes near ``MAX_RESOURCE_BYTES``;
- UTF-8, strictly (the line of the first bad byte);
- YAML, with a loader that refuses a key given twice in one mapping: PyYAML's own keeps the last
  one silently, so a second ``risk:`` block replaced the first unseen (kubectl refuses it too);
- exactly one document of the expected kind.

``ResourceFile`` keeps the parsed YAML nodes beside the document, so a later check (the model's
validation, an unknown symbol) can point at the line of the field it refuses (``line_of``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_RESOURCE_BYTES = 1024 * 1024


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping may not give one key twice."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise ConstructorError(
                    None, None, f"duplicate key {key!r} in one mapping", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep=deep)
        return mapping


@dataclass(frozen=True)
class ResourceFile:
    """One resource document read from ``path``, with its YAML node for locating fields."""

    path: Path
    document: dict[str, Any]
    node: Node

    def line_of(self, location: Sequence[str | int]) -> int:
        """The 1-based line of the deepest part of ``location`` (a field path) in the file."""
        node = self.node
        for part in location:
            child = _child(node, part)
            if child is None:
                break
            node = child
        return node.start_mark.line + 1

    def problem(self, location: Sequence[str | int], message: str) -> str:
        """``FILE:LINE: message``, the line being that of the field at ``location``."""
        return f"{self.path}:{self.line_of(location)}: {message}"


def _child(node: Node, part: str | int) -> Node | None:
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == part:
                found: Node = value_node
                return found
    if isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        child: Node = node.value[part]
        return child
    return None


def read_resource(path: Path, *, kind: str, error: type[ValueError]) -> dict[str, Any]:
    """The one document of ``kind`` in the YAML file at ``path``; ``error`` says what is wrong."""
    return read_resource_file(path, kind=kind, error=error).document


def read_resource_file(path: Path, *, kind: str, error: type[ValueError]) -> ResourceFile:
    """The one document of ``kind`` in ``path`` and its node; ``error`` says what is wrong."""
    text = _read_text(path, kind=kind, error=error)
    loader = _UniqueKeyLoader(text)
    found: list[tuple[dict[str, Any], Node]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            document = loader.construct_document(node)
            if node is not None and isinstance(document, dict) and document.get("kind") == kind:
                found.append((document, node))
    except yaml.MarkedYAMLError as exc:
        raise error(_yaml_problem(path, exc)) from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: the file is not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    if len(found) != 1:
        raise error(f"{path} must hold exactly one {kind}, found {len(found)}")
    document, node = found[0]
    return ResourceFile(path=path, document=document, node=node)


def _read_text(path: Path, *, kind: str, error: type[ValueError]) -> str:
    """The file's text, refused before parsing when it is too large or not UTF-8."""
    try:
        with path.open("rb") as file:
            # Read one byte past the cap rather than trust a size that stat may not know
            # (a pipe, /dev/zero).
            data = file.read(MAX_RESOURCE_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read {kind} file {path}: {exc.strerror}") from exc
    if len(data) > MAX_RESOURCE_BYTES:
        raise error(
            f"{path}: larger than {MAX_RESOURCE_BYTES} bytes, too large for a {kind}; not parsed"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from exc


def _yaml_problem(path: Path, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    line = f":{mark.line + 1}" if mark is not None else ""
    what = " ".join(part for part in (exc.context, exc.problem) if part)
    return f"{path}{line}: the file is not valid YAML: {what or exc}"
