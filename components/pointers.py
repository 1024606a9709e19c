"""Pointer artifacts: big data stays at its URI; KFP passes a small JSON file that names it."""

import json


def write_pointer(artifact, uri: str) -> None:
    """Make a KFP output artifact point to ``uri`` (in its metadata and in its file)."""
    artifact.metadata["uri"] = uri
    with open(artifact.path, "w") as f:
        json.dump({"uri": uri}, f)


def read_pointer(artifact) -> str:
    """The URI a pointer artifact names; errors name the artifact when it is not a pointer."""
    uri = artifact.metadata.get("uri")
    if uri:
        return str(uri)
    try:
        with open(artifact.path) as f:
            return str(json.load(f)["uri"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"artifact {artifact.name!r} at {artifact.path} is not a pointer to a URI: {e}") from e
