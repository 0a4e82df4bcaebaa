"""Model architecture written from scratch: normalisation, attention, a small transformer."""
