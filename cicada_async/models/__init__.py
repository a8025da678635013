"""The make-model catalogue: real architectures with random weights."""
