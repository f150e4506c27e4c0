"""The command layer: the ``xmodal`` console script and its verbs, their argument parsers and runners.

:mod:`xmodal.commands.main` dispatches ``xmodal VERB ...``: Lightning's verbs (fit, validate, test, predict) to
:mod:`~xmodal.commands.lightning`, the others to one module each. The library functions they run live below this
layer, which nothing else imports.
"""
