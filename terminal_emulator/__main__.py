"""``python -m terminal_emulator`` runs the ``iso-terminal`` command line."""

from terminal_emulator.cli import main

if __name__ == "__main__":
    main()
