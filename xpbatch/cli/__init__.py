"""The ``xpbatch`` command: parse, build a config, call one stage function, print its summary.

- :mod:`~xpbatch.cli.main`: the commands.
- :mod:`~xpbatch.cli.options`: click options generated from the config fields.
- :mod:`~xpbatch.cli.bench`: ``xpbatch bench ...``.
- :mod:`~xpbatch.cli.info`: ``xpbatch info``, what a store, catalogue or model file holds.

Only this layer imports click; heavy imports are deferred so ``xpbatch --help`` is instant.
"""
