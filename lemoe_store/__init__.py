"""lemoe-store: a git-like, versioned store for lifelong model editing of LLMs (LEMoE adaptors)."""

__version__ = "0.1.0"
