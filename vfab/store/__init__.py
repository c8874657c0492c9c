"""The job store: SQLite through twisted.enterprise.adbapi, with migrations."""
