"""Developer tooling, run from the repository's root and never installed: `python -m devtools.team_stack`."""
