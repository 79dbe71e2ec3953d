"""``posttrain rl run``: the whole online loop from one config (trajectory API, inference server, environments, trainer) under one supervisor."""
