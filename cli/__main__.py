"""``python -m chatserver_cli`` is the ``chat`` command."""

from chatserver_cli.main import main

main()
