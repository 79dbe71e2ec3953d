"""The trainer side of weight sync: strategies that keep an inference server on the trainer's weights (restart, LoRA hot-swap, one shared copy, broadcast), and their benchmark."""
