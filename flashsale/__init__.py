"""Flash-sale allocation engine: the shared core.

Settings, the CLI, the Redis key layout, event schemas, migrations and sale administration.
"""

__version__ = "0.1.0"
