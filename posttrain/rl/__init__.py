"""Online RL: an Atropos-compatible GRPO trainer, environments, an inference server and weight sync.

The pieces talk HTTP (or shared memory / torch.distributed for weight sync), so each can run in its own
process or on its own machine: the Atropos trajectory API (atroposlib's ``run-api``), environments built
on atroposlib's ``BaseEnv``, posttrain's inference server (OpenAI and vLLM shapes), and the trainer.
"""
