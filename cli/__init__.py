"""The `spkd` command: one entry point for people (DESIGN.md section 2)."""
