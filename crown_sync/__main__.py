"""``python -m crown_sync``: the same command line as the ``crown-sync`` console script."""

from crown_sync.cli import main

if __name__ == "__main__":
    main()
