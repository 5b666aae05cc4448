"""lemoe-store: a git-like, versioned store for lifelong model editing of LLMs (LEMoE adaptors)."""

__version__ = "0.1.0"


def load_version(path, rev=None, device="auto"):
    """(model, tokenizer) of an exported version folder, or of `rev` in the store at `path` (see `export`)."""
    from .export import load_version as _load_version

    return _load_version(path, rev, device)
