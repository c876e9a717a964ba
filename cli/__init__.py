"""The `spkd` command: one entry point for people (docs/architecture.md)."""
