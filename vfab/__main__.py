"""`python -m vfab` is the `vfab` command."""

from vfab.cli import main

# Guarded: the planning process is spawned and re-imports the main module.
if __name__ == "__main__":
    main()
