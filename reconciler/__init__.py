"""Redis against Postgres: the checks that find drift and repair it, the pass that runs them,
and the post-sale audit."""
