"""The integer grid everything else stands on: torchao's integer weights at a bit-width and grouping
(``intx``) and the bytes they take in qlight's files (``sizes``)."""
