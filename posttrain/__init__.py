"""posttrain: post-training for large language models on TRL, from one JobSpec."""

__version__ = "0.1.0"
