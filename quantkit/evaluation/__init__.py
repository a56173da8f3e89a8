"""quantkit eval: every variant of a model measured the same way against the same baseline."""
