"""The worker's side of a torchrun run: process group (runtime), FSDP2 sharding (fsdp), sharded
checkpoints (checkpoint). The command that starts the ranks is :mod:`posttrain.launchers.torchrun`."""
