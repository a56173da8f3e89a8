"""Output formats: one writer module per format."""
