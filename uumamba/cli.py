"""``python -m uumamba.cli`` and older imports: the command line lives in
:mod:`uumamba.commands`."""

from uumamba.commands import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
