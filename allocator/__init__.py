"""The Redis access layer: every binding of the Lua scripts, the per-SKU allocators, and the
allocator service (admission pumps, hold sweeper, outbox relay)."""
