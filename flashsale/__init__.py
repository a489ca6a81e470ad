"""Flash-sale allocation engine: the shared core, the ground floor every other package stands
on (settings, errors, key layout, record codecs, events, the order model, the payment client,
tokens, client builders and probes, migrations), and the composition root, ``flashsale.cli``
(the command line, the supervisor, the dev stack), the one place that imports every floor.
"""

__version__ = "0.1.0"
