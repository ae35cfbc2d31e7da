"""Unit tests of the image pipeline."""
