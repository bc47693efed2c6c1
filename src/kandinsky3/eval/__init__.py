"""Evaluations: text→image alignment with the world judge, reconstruction and image metrics."""
