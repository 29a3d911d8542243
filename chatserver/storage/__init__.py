"""Persistence: tables, the repository, the group-committing writer, engines and migrations."""
