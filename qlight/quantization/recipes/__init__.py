"""Quantization recipes: the :class:`~qlight.quantization.recipes.base.Recipe` protocol and its
registry (``base``), float casts, weight-only integers, static PT2E graphs and mixed precision, each
registering the names it reads (``qlight.quantization`` imports them all); what mixed precision builds
on (layer sensitivity, bit allocation, plans) and torchao's integer weights in either grouping (``intx``)."""
