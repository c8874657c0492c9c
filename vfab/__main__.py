"""`python -m vfab` is the `vfab` command."""

from vfab.cli import main

main()
