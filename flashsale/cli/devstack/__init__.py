"""The embedded development stack (``flashsale dev``): binaries, processes, pings, the stack."""
