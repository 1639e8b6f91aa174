"""The four Lightning callbacks, one a file as Lightning lays out its own."""
