"""`python -m lemoe_store` runs the CLI."""

from .cli import main

main()
