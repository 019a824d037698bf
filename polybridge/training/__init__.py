"""Training: the embedded default (backbone and native encoders) and, later, the common branch trainer."""
