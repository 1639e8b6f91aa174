"""The four Lightning callbacks, one a file as Lightning lays out its own, and the one module that
touches Lightning internals (``lightning_plumbing``)."""
