"""``python -m xmodal.commands ...``: the ``xmodal`` console script."""

from xmodal.commands.main import main

main()
