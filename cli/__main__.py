"""`python -m cli ...` is the `llmops` command."""

from cli.main import main

main()
