"""Hand-written CPU kernels, built on first use, for what the libraries do slowly (see each module's docstring)."""
