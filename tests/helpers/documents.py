"""Checks of generated documents: every ``$ref`` resolves, an AsyncAPI 3 document has
the structure the specification requires."""

from __future__ import annotations

from typing import Any


def resolve(document: dict[str, Any], ref: str) -> Any:
    """The object a local ``$ref`` (``#/a/b``) points to in ``document``; fails if none."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve (no {part!r})"
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    """Every ``$ref`` value anywhere in ``node``."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append(value)
            else:
                found += refs(value)
    elif isinstance(node, list):
        for value in node:
            found += refs(value)
    return found


def check_refs_resolve(document: dict[str, Any]) -> None:
    for ref in refs(document):
        resolve(document, ref)


def check_asyncapi(document: dict[str, Any]) -> None:
    """The structure AsyncAPI 3.0.0 requires, and every reference resolving inside it."""
    assert document["asyncapi"] == "3.0.0"
    assert isinstance(document["info"]["title"], str) and document["info"]["title"]
    assert isinstance(document["info"]["version"], str) and document["info"]["version"]
    assert document["channels"] and document["operations"]
    for key, channel in document["channels"].items():
        assert key.replace("_", "").replace("-", "").replace(".", "").isalnum(), key
        address = channel["address"]
        assert address is None or isinstance(address, str)
        if address:
            # Each {param} of the address is a declared parameter, and no other.
            names = {part.split("}")[0] for part in address.split("{")[1:]}
            assert set(channel.get("parameters", {})) == names, (address, channel.get("parameters"))
        for message in channel["messages"].values():
            assert "payload" in resolve(document, message["$ref"])
    for operation in document["operations"].values():
        assert operation["action"] in {"send", "receive"}
        channel_ref = operation["channel"]["$ref"]
        resolve(document, channel_ref)
        for message in operation["messages"]:
            # An operation's messages are those of its channel (AsyncAPI 3.0.0, Operation Object).
            assert message["$ref"].startswith(channel_ref + "/messages/"), message
            resolve(document, message["$ref"])
    check_refs_resolve(document)
