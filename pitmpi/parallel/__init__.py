"""Parallel training: communicators, partition, and the training methods."""
